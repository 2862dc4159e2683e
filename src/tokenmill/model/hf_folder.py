"""Load a Hugging Face model folder: config.json, *.safetensors (single or sharded + index), tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.linear import prepare_linears_for_cpu
from tokenmill.layers.quantized import describe, has_block_parts, keep_dense_for_batches
from tokenmill.model.loader import (
    LoadedModel,
    choose_dtype,
    resolve_device,
    resolve_max_model_len,
)
from tokenmill.model.registry import resolve_architecture

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def load_hf_folder(cfg: ModelConfig) -> LoadedModel:
    folder = Path(cfg.model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"model={cfg.model!r}: folder has no config.json (is it a Hugging Face model folder?)")
    raw = json.loads(config_path.read_text())
    arch, cls = resolve_architecture(raw.get("architectures"))
    config = load_config(folder, raw)
    device = resolve_device(cfg.device)
    dtype, dtype_reason = choose_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(Path(cfg.tokenizer) if cfg.tokenizer else folder)
    quantize = None
    if cfg.quantization in ("q8_0", "q4_k"):
        if device.type != "cpu":
            raise ValueError(f"quantization={cfg.quantization!r}: block weights run on CPU only (no CUDA kernels yet); "
                             "use quantization=none on CUDA")
        from tokenmill.model.quantize_at_load import quantize_dense_model

        def quantize(model: torch.nn.Module) -> None:
            quantize_dense_model(model, cfg.quantization, safetensors_files(folder))

    model = build_model(cls, config, dtype, device, iter_safetensors(folder), quantize, cfg.dense_batch_weights)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        max_model_len=resolve_max_model_len(cfg.max_model_len, getattr(config, "max_position_embeddings", None)),
        eos_token_ids=eos_token_ids(folder, raw, tokenizer),
        bos_token_id=raw.get("bos_token_id", getattr(tokenizer, "bos_token_id", None)),
        chat_template=resolve_chat_template(cfg.chat_template, tokenizer),
        dtype=dtype,
        dtype_reason=dtype_reason,
        device=device,
        vocab_size=int(config.vocab_size),
        task=getattr(cls, "TASK", "generate"),
        path=str(folder),
        quantization=f"{cfg.quantization} at load ({describe(model)})" if quantize else "none",
    )


def load_config(folder: Path, raw: dict) -> Any:
    """transformers' config object (normalises rope fields across versions); a namespace if it is unknown."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError):
        return SimpleNamespace(**raw)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir() or not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"tokenizer: no tokenizer files in {str(path)!r} (looked for {', '.join(_TOKENIZER_FILES)}); "
            "pass tokenizer=<folder with a tokenizer>"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def resolve_chat_template(override: str | None, tokenizer: Any) -> str | None:
    """An explicit template (a file path or inline jinja) wins over the tokenizer's own."""
    if override:
        p = Path(override)
        return p.read_text() if p.is_file() else override
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def eos_token_ids(folder: Path, raw: dict, tokenizer: Any) -> list[int]:
    """Union of generation_config.json, config.json and the tokenizer's eos ids, in that order."""
    found: list[int] = []
    gen = folder / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None,
               raw.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)]
    for value in sources:
        for tid in value if isinstance(value, list) else [value]:
            if isinstance(tid, int) and tid not in found:
                found.append(tid)
    return found


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so only one tensor is held besides the model."""
    from safetensors import safe_open

    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files (the index's shards, or every *.safetensors), checked to exist."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"model={str(folder)!r}: shards listed in {index.name} are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model={str(folder)!r}: no *.safetensors weights found (only safetensors is supported)")
    return [folder / name for name in files]


def build_model(cls: type, config: Any, dtype: torch.dtype, device: torch.device, weights,
                quantize: Callable[[torch.nn.Module], None] | None = None,
                dense_batches: bool = False) -> torch.nn.Module:
    """Construct on the meta device (no random init), materialise on `device`, fill every parameter; then
    `quantize` (if given) may turn dense matrices into blocks before the layouts are prepared."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device=device)
    loaded = model.load_weights(weights)
    expected = model.expected_weights() if hasattr(model, "expected_weights") else set()
    missing = sorted(expected - set(loaded))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s) for {cls.__name__}: {shown}")
    if quantize is not None:
        quantize(model)
    if dense_batches:
        keep_dense_for_batches(model)
    return finalize_model(model)


def finalize_model(model: torch.nn.Module) -> torch.nn.Module:
    """After weights are in: CPU-friendly linear layouts (oneDNN-packed in float32; the LM head picks its own
    layout on first use, see layers/lm_head.py). GGUF blocks kept as stored get their native kernels now, so
    the model runs as loaded; without a C++ compiler they are dequantized (the exact path). The GGUF loader
    calls this too."""
    kernels = None
    if any(has_block_parts(m) for m in model.modules()):
        from tokenmill.kernels.cpu_kernels import load_cpu_kernels

        kernels = load_cpu_kernels()
        if kernels is None:
            log.warning("quantized weights: no native CPU kernels (no compiler, or TOKENMILL_CPU_KERNELS=0), "
                        "so the blocks are dequantized to the model dtype")
    prepare_linears_for_cpu(model, kernels)
    if kernels is not None:
        for module in model.modules():
            if getattr(module, "accepts_quantized", False):  # the LM head: blocks of its own or of the embedding
                module.use_cpu_kernels(kernels)
    return model.eval()
