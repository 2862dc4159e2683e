"""--quantization q8_0 | q4_k for dense (safetensors) checkpoints: their matrices as GGUF blocks, at load.

Every linear layer (fused q/k/v and gate/up as one matrix), the token embedding and an untied LM head are
quantized with model/gguf_quantize.py into the block layout llama.cpp would store, then held exactly like
a GGUF file's blocks (layers/quantized.py), so the same native kernels serve both. q4_k needs rows of a
multiple of 256; narrower matrices (e.g. Gemma 3 270M's 640-wide ones) take q8_0, as llama.cpp falls back
to another type for such shapes. 1-D tensors (norms, biases) stay dense.

The blocks are cached under the tokenmill cache dir, keyed by the checkpoint files' sha256, the method and
the model dtype, so a later start reads them instead of quantizing again (Q4_K takes seconds per 100M weights).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.layers.quantized import load_quantized
from tokenmill.model.cache_dir import file_hash, get_or_build
from tokenmill.model.gguf_quantize import SUPPORTED, quantize

_VERSION = "1"
_BLOCKS = "blocks.safetensors"
_TYPES = "types.json"


def block_type(method: str, k: int) -> GGMLQuantizationType | None:
    """The type a [rows, k] matrix gets under `method`: the method's own, else Q8_0 when k does not tile into
    its blocks, else None (kept dense)."""
    for qtype in (SUPPORTED[method], GGMLQuantizationType.Q8_0):
        if k % GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
    return None


def targets(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> module, for the matrices that get quantized."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "accepts_quantized", False):
            found[name] = module
    return found


def quantize_dense_model(model: nn.Module, method: str, source_files: list[Path]) -> None:
    """Replace the model's matrices by `method` blocks (cached by the source files' content)."""
    modules = targets(model)
    dtype = next(model.parameters()).dtype
    key = hashlib.sha256("|".join([_VERSION, method, str(dtype), *(file_hash(f) for f in sorted(source_files)),
                                   *sorted(modules)]).encode()).hexdigest()

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        blocks, types = {}, {}
        for name, module in modules.items():
            qtype = block_type(method, module.weight.shape[1])
            if qtype is not None:
                blocks[name] = quantize(module.weight.detach(), qtype)
                types[name] = qtype.name
        save_file(blocks, str(tmp / _BLOCKS))
        (tmp / _TYPES).write_text(json.dumps(types))

    folder = get_or_build("quantized", key, build)
    from safetensors.torch import load_file

    blocks = load_file(str(folder / _BLOCKS))
    for name, qtype in json.loads((folder / _TYPES).read_text()).items():
        module = modules[name]
        qt = QuantizedTensor(blocks[name].contiguous(), GGMLQuantizationType[qtype], tuple(module.weight.shape))
        load_quantized(module, qt, module.weight)
