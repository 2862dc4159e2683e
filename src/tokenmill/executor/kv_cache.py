"""The KV cache tensors' dtype (--kv-cache-dtype) and their allocation."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.config import check_kv_cache_dtype

_KV_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """auto: the model dtype; float32 / bfloat16 (also fp32 / bf16) explicitly."""
    if check_kv_cache_dtype(name) == "auto":
        return model_dtype
    return _KV_DTYPES[name]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor for the KV cache. On CPU its pages come from calloc: zero and untouched until a block is
    first written, so start-up does not spend seconds faulting in GiBs the first requests never use (the
    auto-sized 4 GiB cache of the default model took 8.4 s in torch.zeros) and RSS grows with what is used."""
    if device.type != "cpu" or dtype not in _NUMPY_STORAGE:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_STORAGE[dtype])).view(dtype)
