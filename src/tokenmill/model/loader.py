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
from tokenmill.kernels.cpu_features import cpu_features

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
    dtype_reason: str = ""  # why this dtype (logged at start, shown by /version and /v1/models)
    quantization: str = "none"  # how the weights are held, e.g. "gguf blocks (Q5_0 x90, ...)"


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


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and why. auto: CUDA -> bf16 (fp16 without bf16 support); CPU -> bf16 where the CPU
    multiplies bf16 natively (AMX / AVX512-BF16: 2.5-6x fp32 on our shapes), for every checkpoint, quantized
    GGUF included; float32 elsewhere (bf16 matmul is emulated there, ~100x slower). float32 is the exact path
    that matches transformers token for token."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"invalid dtype={name!r}: must be auto, {', '.join(DTYPES)}")
        return DTYPES[name], f"dtype={name} requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA device with bf16 support"
        return torch.float16, "auto: CUDA device without bf16 support"
    cpu = cpu_features()
    if cpu.native_bf16:
        return torch.bfloat16, f"auto: this CPU multiplies bf16 natively ({cpu.describe()}); --dtype float32 for the exact path"
    return torch.float32, (f"auto: this CPU has no native bf16 ({cpu.describe()}; bf16 matmuls would be emulated), "
                           "so float32")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    return choose_dtype(name, device)[0]


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
