"""load_gguf(ModelConfig) -> LoadedModel: a llama.cpp / Ollama GGUF file as a tokenmill model.

Header parse (gguf_reader, < 1 s), config from metadata (gguf_names), tensors dequantized one at a time
straight into the model's parameters (gguf_dequant, about 2 s for Gemma 3 270M Q4_K_M), tokenizer from
the hash-keyed cache (gguf_tokenizer). With quantization=auto on CPU, 2-D tensors of the block types the native
kernels read (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) stay as stored (layers/quantized.py): decode reads ~4x fewer
bytes per token. quantization=none dequantizes everything into the model dtype (the exact path).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.config import ModelConfig
from tokenmill.kernels.quant_format import QuantizedTensor, has_kernel
from tokenmill.layers.quantized import describe
from tokenmill.model.cache_dir import file_hash
from tokenmill.model.gguf_dequant import dequantize, one_torch_thread
from tokenmill.model.gguf_names import (
    build_hf_config,
    fix_tensor,
    hf_architecture,
    hf_tensor_name,
)
from tokenmill.model.gguf_reader import GGUFFile, read_gguf
from tokenmill.model.gguf_tokenizer import GEMMA_CHAT_TEMPLATE, load_gguf_tokenizer
from tokenmill.model.hf_folder import build_model, load_tokenizer, resolve_chat_template
from tokenmill.model.loader import (
    LoadedModel,
    choose_dtype,
    resolve_device,
    resolve_max_model_len,
)
from tokenmill.model.registry import resolve_architecture

# Ids llama.cpp treats as end-of-generation besides EOS, when the file names them.
_EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def load_gguf(cfg: ModelConfig) -> LoadedModel:
    path = Path(cfg.model)
    if not path.is_file():
        raise ValueError(f"model={cfg.model!r}: no such GGUF file")
    gguf = read_gguf(path)
    arch, cls = resolve_architecture([hf_architecture(gguf)])
    config = build_hf_config(gguf)
    device = resolve_device(cfg.device)
    dtype, dtype_reason = choose_dtype(cfg.dtype, device)
    if cfg.quantization in ("q8_0", "q4_k"):
        raise ValueError(f"quantization={cfg.quantization!r} quantizes a dense checkpoint at load; {path.name} is "
                         "already quantized: use auto (keep its blocks) or none (dequantize them)")
    # Blocks stay blocks on CPU (the native kernels); CUDA has no block kernels yet, so it gets the dense weights.
    keep_blocks = cfg.quantization == "auto" and device.type == "cpu"
    # The tokenizer (seconds: a 33 MB tokenizer.json for Gemma) loads in a thread while weights dequantize.
    with ThreadPoolExecutor(max_workers=1) as pool:
        if cfg.tokenizer:
            tok_future = pool.submit(load_tokenizer, Path(cfg.tokenizer))
        else:
            tok_future = pool.submit(load_gguf_tokenizer, path, file_hash(path))
        with one_torch_thread():
            model = build_model(cls, config, dtype, device, iter_gguf_weights(gguf, config, keep_blocks),
                                dense_batches=cfg.dense_batch_weights)
        tokenizer = tok_future.result()
    template = resolve_chat_template(cfg.chat_template, tokenizer)
    if template is None and gguf.architecture == "gemma3":
        template = GEMMA_CHAT_TEMPLATE
    if template is not None:
        tokenizer.chat_template = template
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        max_model_len=resolve_max_model_len(cfg.max_model_len, config.max_position_embeddings),
        eos_token_ids=eos_token_ids(gguf, tokenizer),
        bos_token_id=config.bos_token_id,
        chat_template=template,
        dtype=dtype,
        dtype_reason=dtype_reason,
        device=device,
        vocab_size=int(config.vocab_size),
        task="generate",
        path=str(path),
        quantization=_describe_weights(model, cfg.quantization, device),
    )


def iter_gguf_weights(gguf: GGUFFile, config: Any, keep_blocks: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(HF name, tensor) per GGUF tensor, un-permuted, one at a time: float32 (dequantized), or with keep_blocks
    a QuantizedTensor for every 2-D tensor of a type the native kernels read (rows permuted as whole blocks)."""
    arch = gguf.architecture
    for name, info in gguf.tensors.items():
        hf_name = hf_tensor_name(arch, name)
        if hf_name is None:
            continue
        if keep_blocks and len(info.shape) == 2 and has_kernel(info.ggml_type):
            raw = torch.from_numpy(np.array(info.data, dtype=np.uint8, copy=True))  # memmaps are read-only
            qt = QuantizedTensor.from_bytes(raw, info.ggml_type, tuple(int(d) for d in info.shape))
            yield hf_name, qt.with_rows(fix_tensor(arch, name, qt.blocks, config))
            continue
        tensor = dequantize(info.data, info.ggml_type, info.shape)
        yield hf_name, fix_tensor(arch, name, tensor, config)


def _describe_weights(model: torch.nn.Module, method: str, device: torch.device) -> str:
    blocks = describe(model)
    if blocks:
        return f"gguf blocks ({blocks})"
    if method == "auto" and device.type != "cpu":
        return "none (dequantized: no block kernels on this device yet)"
    return "none (dequantized)"


def eos_token_ids(gguf: GGUFFile, tokenizer: Any) -> list[int]:
    """EOS plus end-of-turn ids: for Gemma `<end_of_turn>` ends a chat reply (HF's generation config
    lists [1, 106] for Gemma 3), so a served chat stops there instead of running to max_tokens."""
    ids: list[int] = []
    for key in _EOG_KEYS:
        value = gguf.metadata.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if gguf.architecture == "gemma3":
        turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(turn, int) and turn != tokenizer.unk_token_id and turn not in ids:
            ids.append(turn)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
