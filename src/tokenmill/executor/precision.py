"""The numeric choices a runner made (compute dtype and why, KV cache dtype, CPU kernel variant), in one
place: the runner logs them at start and the server reports them on /version and /v1/models."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.kernels.cpu_features import host_cpu_features


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_info(loaded: Any, kv_dtype: torch.dtype, cpu_kernels: Any) -> dict[str, str | None]:
    on_cpu = loaded.device.type == "cpu"
    return {
        "dtype": dtype_name(loaded.dtype),
        "dtype_reason": loaded.dtype_reason or "set by the caller",
        "quantization": getattr(loaded, "quantization", "none"),
        "kv_cache_dtype": dtype_name(kv_dtype),
        "device": str(loaded.device),
        "cpu": host_cpu_features().describe() if on_cpu else None,
        "cpu_kernels": cpu_kernels.variant if cpu_kernels is not None else None,
    }


def describe_precision(info: dict[str, str | None]) -> str:
    where = f"CPU {info['cpu']}, native kernels: {info['cpu_kernels'] or 'off'}" if info["cpu"] else info["device"]
    return (f"dtype {info['dtype']} ({info['dtype_reason']}); weights {info['quantization']}; "
            f"KV cache {info['kv_cache_dtype']}; {where}")
