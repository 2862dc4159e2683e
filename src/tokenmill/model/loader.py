"""load_model(ModelConfig) -> LoadedModel: dispatch on what `model` names, resolve dtype and device.

  None            -> the packaged default model (model.default_model)
  *.gguf file     -> model.gguf_loader
  a folder        -> model.hf_folder (config.json + safetensors + tokenizer)
  any other name  -> model.discovery (local Hugging Face cache, offline), then dispatched again
The three non-folder routes are imported lazily: they are separate modules with their own dependencies.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run: weights on `device` in `dtype`, its tokenizer and generation facts."""

    model: Any  # nn.Module with forward / compute_logits / kv_cache_groups / kv_layer_shapes
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    arch: str
    max_model_len: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    chat_template: str | None
    dtype: torch.dtype
    device: torch.device
    vocab_size: int
    task: str = "generate"
    path: str | None = None  # the file or folder the weights came from


def load_model(cfg: ModelConfig) -> LoadedModel:
    if cfg.model is None:
        from tokenmill.model.default_model import default_model_path

        return load_model(dataclasses.replace(cfg, model=str(default_model_path())))
    path = Path(os.path.expanduser(cfg.model))
    if path.is_file() and path.suffix == ".gguf":
        from tokenmill.model.gguf_loader import load_gguf

        return load_gguf(dataclasses.replace(cfg, model=str(path)))
    if path.is_dir():
        from tokenmill.model.hf_folder import load_hf_folder

        return load_hf_folder(dataclasses.replace(cfg, model=str(path)))
    if path.exists():
        raise ValueError(f"model={cfg.model!r}: is a file but not a .gguf; pass a Hugging Face folder or a .gguf file")
    if _looks_like_path(cfg.model):
        raise ValueError(f"model={cfg.model!r}: no such file or folder")
    from tokenmill.model.discovery import resolve_model

    resolved = str(resolve_model(cfg.model))
    return load_model(dataclasses.replace(cfg, model=resolved))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.sep + os.sep in name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"invalid device={name!r}: must be auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); otherwise bf16 matmul is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """auto: CUDA -> bf16 (fp16 without bf16 support); CPU -> the checkpoint's half dtype only with native
    bf16, else float32 (emulated bf16 matmul is ~100x slower than fp32)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"invalid dtype={name!r}: must be auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if checkpoint_dtype in (torch.bfloat16, torch.float16) and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_max_model_len(requested: int | None, model_max: int | None) -> int:
    if requested is None:
        if not model_max:
            raise ValueError("max_model_len: the model config has no max_position_embeddings; pass max_model_len")
        return int(model_max)
    if requested < 1:
        raise ValueError(f"invalid max_model_len={requested}: must be >= 1")
    if model_max and requested > model_max:
        raise ValueError(f"invalid max_model_len={requested}: must be <= the model's maximum ({model_max})")
    return int(requested)
