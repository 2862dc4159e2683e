"""Rotary position embeddings (neox / rotate-half layout, as in HF checkpoints), with rope scaling.

Supported rope types: default, linear, llama3, dynamic (treated as default within the trained length).
One instance per distinct (head_dim, base, scaling): Gemma 3 builds two (local and global bases).
The cos/sin table is built lazily on the device of first use, so models can be built on the meta device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.layers.norm import RMSNorm

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_parameters(config: Any) -> dict:
    """Normalise transformers v4 (rope_theta + rope_scaling) and v5 (rope_parameters) configs to one dict."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    return out


def _inv_freq(head_dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params["rope_type"]
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    elif kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type={kind!r}: must be one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    return inv


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [T, Hq, D] and k [T, Hkv, D] at integer positions [T]."""

    def __init__(self, head_dim: int, max_position: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.params = params
        self._attention_scaling = 1.0
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._memo: tuple | None = None
        self.cpu_kernels: CpuKernels | None = None

    def use_cpu_kernels(self, kernels: CpuKernels | None) -> None:
        """Float32 CPU steps norm and rotate q and k in one native call (rotate_qkv)."""
        self.cpu_kernels = kernels

    def _cos_sin(self, device: torch.device, dtype: torch.dtype, needed: int) -> torch.Tensor:
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached.shape[0] < needed:
            length = max(self.max_position, needed)
            inv = _inv_freq(self.head_dim, self.params)
            freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            # [L, 2, D]: one gather per step fetches both cos and sin.
            cached = torch.stack([emb.cos(), emb.sin()], dim=1).to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ([-sin_lo, sin_hi]) [T, 1, D] for these positions. Every layer of a step passes the same positions tensor,
        so the gather is done once per step (memoised on the tensor's identity)."""
        memo = self._memo
        if memo is not None and memo[0] is positions and memo[1] == dtype:
            return memo[2], memo[3]
        table = self._cos_sin(positions.device, dtype, 0)
        cs = table[positions]  # [T, 2, D]
        cos, sin = cs[:, 0].unsqueeze(1).contiguous(), cs[:, 1].unsqueeze(1)
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one roll instead of slice/neg/cat.
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self._memo = (positions, dtype, cos, sin)
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions, _math_dtype(q.dtype))
        return _apply(q, cos, sin), _apply(k, cos, sin)

    def rotate_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                   q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq*D], k [T, Hkv*D], v of a fused [T, (Hq + 2 Hkv) * D] projection output, q and k first normed
        per head by q_norm / k_norm when given (Gemma 3, Qwen3), then rotated. Float32 on CPU: one native call
        in place on qkv (a fresh projection output); otherwise the PyTorch ops."""
        t, d = qkv.shape[0], self.head_dim
        q_size, kv_size = num_heads * d, num_kv_heads * d
        weights = (None, None) if q_norm is None else (q_norm.native_weight, k_norm.native_weight)
        kernels = self.cpu_kernels
        if (kernels is not None and qkv.dtype is torch.float32 and qkv.is_cpu and qkv.dim() == 2 and qkv.stride(1) == 1
                and (q_norm is None or (weights[0] is not None and weights[1] is not None and q_norm.eps == k_norm.eps))):
            cos, sin = self.cos_sin(positions, torch.float32)
            kernels.decode_ops.qk_norm_rope(qkv, num_heads, num_kv_heads, d, *weights, 0.0 if q_norm is None else q_norm.eps,
                                 cos, sin)
            return qkv[:, :q_size], qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]
        v = qkv[:, q_size + kv_size :]
        if q_norm is not None:
            q = q_norm(qkv[:, :q_size].reshape(t, num_heads, d))
            k = k_norm(qkv[:, q_size : q_size + kv_size].reshape(t, num_kv_heads, d))
            q, k = self(positions, q, k)
            return q.reshape(t, -1), k.reshape(t, -1), v
        # q and k heads are adjacent in the fused output: rotate them in one pass.
        qk = self.apply(positions, qkv[:, : q_size + kv_size].view(t, num_heads + num_kv_heads, d)).view(t, -1)
        return qk[:, :q_size], qk[:, q_size:], v

    def apply(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RoPE on one [T, H, D] tensor (e.g. q and k heads side by side: one pass instead of two)."""
        cos, sin = self.cos_sin(positions, _math_dtype(x.dtype))
        return _apply(x, cos, sin)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs rotate in float32 (one rounding at the end instead of three on the way); CPUs
    have no half-precision arithmetic to save anyway."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    if x.dtype == cos.dtype:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
    xf = x.to(cos.dtype)
    return torch.addcmul(xf * cos, xf.roll(xf.shape[-1] // 2, dims=-1), signed_sin).to(x.dtype)
