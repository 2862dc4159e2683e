"""Typed wrappers over the small per-layer decode steps of the native library (csrc/decode_ops.cpp): q/k norm +
RoPE in place, Gemma's residual add + next norm, the K/V cache write. A decode step runs each once per layer on a
few rows, so the checks read only cheap tensor attributes. Oracles: the PyTorch layers (layers/norm.py,
layers/rotary.py) and kernels/reference.py write_kv (tests/model/test_decode_ops.py)."""

from __future__ import annotations

import ctypes

import torch

from tokenmill.kernels.quant_kernels import bind

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class DecodeOps:
    def __init__(self, lib: ctypes.CDLL):
        self._qk_norm_rope = bind(lib.qk_norm_rope_f32, [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _f32, _p, _p, _i64,
                                                         _int], None)
        self._add_rms_norm = bind(lib.add_rms_norm_f32, [_p, _p, _i64, _i64, _p, _p, _f32, _p, _p, _int], None)
        kv_args = [_p, _p, _i64, _i64, _i64, _i64, _p, _i64, _p, _p]
        self._write_kv = {(torch.float32, torch.float32): bind(lib.write_kv_f32, kv_args),
                          (torch.float32, torch.bfloat16): bind(lib.write_kv_f32_to_bf16, kv_args),
                          (torch.bfloat16, torch.bfloat16): bind(lib.write_kv_bf16, kv_args)}

    def add_rms_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                     next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x + rms_norm(y) * weight, and rms_norm of that sum * next_weight when given) for contiguous CPU float32
        x and y of one shape [..., n]; weights float32 [n] holding any offset. Fresh outputs; x is not changed."""
        n = x.shape[-1]
        for name, t in (("x", x), ("y", y)):
            if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous() or t.shape != x.shape:
                raise ValueError(f"add_rms_norm: {name} must be a contiguous CPU float32 tensor shaped like x")
        for w in (weight, next_weight):
            if w is not None and (w.dtype is not torch.float32 or w.shape != (n,) or not w.is_contiguous()):
                raise ValueError(f"add_rms_norm: weights must be contiguous float32 [{n}]")
        out = torch.empty_like(x)
        normed = None if next_weight is None else torch.empty_like(x)
        self._add_rms_norm(x.data_ptr(), y.data_ptr(), x.numel() // n if n else 0, n, weight.data_ptr(),
                           None if next_weight is None else next_weight.data_ptr(), eps, out.data_ptr(),
                           None if normed is None else normed.data_ptr(), torch.get_num_threads())
        return out, normed

    def qk_norm_rope(self, x: torch.Tensor, num_q_heads: int, num_k_heads: int, head_dim: int,
                     q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                     signed_sin: torch.Tensor) -> None:
        """In place on x [T, >= (Hq + Hk) * D] (float32, contiguous rows: a fused q/k/v projection output whose
        first columns are the q heads then the k heads): RMSNorm each head by q_weight / k_weight (float32 [D],
        offsets included; both None: no norm), then RoPE (rotate-half layout) with cos / signed_sin [T, D] or
        [T, 1, D] (layers/rotary.py: signed_sin = [-sin_lo, sin_hi])."""
        t, d = x.shape[0], head_dim
        weights = (q_weight, k_weight)
        if x.dim() != 2 or x.dtype is not torch.float32 or not x.is_cpu or x.stride(1) != 1 \
                or x.shape[1] < (num_q_heads + num_k_heads) * d or d % 2:
            raise ValueError(f"qk_norm_rope: x must be CPU float32 [T, >= {(num_q_heads + num_k_heads) * d}] with "
                             "contiguous rows and an even head_dim")
        if (q_weight is None) != (k_weight is None) or any(
                w is not None and (w.dtype is not torch.float32 or w.shape != (d,) or not w.is_contiguous())
                for w in weights):
            raise ValueError(f"qk_norm_rope: q_weight and k_weight must both be float32 [{d}] or both None")
        for name, c in (("cos", cos), ("signed_sin", signed_sin)):
            if c.dtype is not torch.float32 or not c.is_contiguous() or c.numel() != t * d:
                raise ValueError(f"qk_norm_rope: {name} must be contiguous float32 [{t}, {d}]")
        self._qk_norm_rope(x.data_ptr(), t, x.stride(0), num_q_heads, num_k_heads, d,
                           None if q_weight is None else q_weight.data_ptr(),
                           None if k_weight is None else k_weight.data_ptr(), eps, cos.data_ptr(),
                           signed_sin.data_ptr(), d, torch.get_num_threads())

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> bool:
        """kernels/reference.py write_kv natively (k / v [T, Hkv, D] or [T, Hkv * D] with contiguous rows; caches
        [N, bs, Hkv, D] contiguous; slots int64 [T] in range). False, with nothing written, for a dtype pair it
        does not cover (the caller falls back to the reference)."""
        fn = self._write_kv.get((k.dtype, k_cache.dtype))
        width = k_cache.shape[2] * k_cache.shape[3]
        t = k.shape[0]
        if fn is None or v.dtype is not k.dtype or v_cache.dtype is not k_cache.dtype or not k.is_cpu \
                or not k_cache.is_cpu or not k_cache.is_contiguous() or not v_cache.is_contiguous():
            return False
        k2, v2 = k.reshape(t, -1), v.reshape(t, -1)
        if k2.shape[1] != width or v2.shape[1] != width or k2.stride(1) != 1 or v2.stride(1) != 1 \
                or slots.dtype is not torch.int64 or slots.numel() != t or not slots.is_contiguous():
            raise ValueError(f"write_kv: k / v must be [{t}, {width}] rows and slots int64 [{t}]")
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        if fn(k2.data_ptr(), v2.data_ptr(), t, k2.stride(0), v2.stride(0), width, slots.data_ptr(), num_slots,
              k_cache.data_ptr(), v_cache.data_ptr()):
            raise IndexError(f"write_kv: a slot is outside the cache's [0, {num_slots})")
        return True
