"""RMSNorm, computed in float32 like the reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels


class RMSNorm(nn.Module):
    """y = x / rms(x) * (weight + weight_offset).

    weight_offset is 0 for Llama/Qwen and 1 for Gemma (which stores weight - 1). Llama casts back to the
    input dtype before multiplying by the weight, Gemma multiplies in float32 first; `gemma_style` picks the
    order so bf16 results match the reference implementation bit for bit.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0, gemma_style: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.weight_offset = weight_offset
        self.gemma_style = gemma_style
        self.cpu_kernels: CpuKernels | None = None
        self.native_weight: torch.Tensor | None = None  # weight + offset, for the native kernel

    def use_cpu_kernels(self, kernels: CpuKernels | None) -> None:
        """Route float32 / bf16 CPU inputs through the native one-pass kernel (called once, after loading)."""
        usable = kernels is not None and self.weight.device.type == "cpu"
        self.cpu_kernels = kernels if usable else None
        self.native_weight = (self.weight.detach().float() + self.weight_offset).contiguous() if usable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.cpu_kernels is not None and (dtype is torch.float32 or dtype is torch.bfloat16) and x.is_cpu:
            # bf16: the same float32 math and roundings as the formula below, in one pass
            round_first = dtype == torch.bfloat16 and not self.gemma_style
            return self.cpu_kernels.rms_norm(x, self.native_weight, self.eps, round_first)
        if dtype == torch.float32 and not self.weight_offset:
            # Same math in one fused op (fewer passes over memory); half dtypes keep the reference rounding.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma_style:
            return (xf * (self.weight.float() + self.weight_offset)).to(dtype)
        w = self.weight + self.weight_offset if self.weight_offset else self.weight
        return w * xf.to(dtype)

    def add_to(self, x: torch.Tensor, y: torch.Tensor, next_norm: RMSNorm | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x + self(y), next_norm(x + self(y)) or None): a residual add of a normed sublayer output (Gemma's
        sandwich norms), fused with the next sublayer's input norm; one native pass for float32 CPU tensors."""
        kernels = self.cpu_kernels
        if (kernels is not None and x.dtype is torch.float32 and y.dtype is torch.float32 and x.is_cpu
                and x.is_contiguous() and y.is_contiguous() and x.shape == y.shape
                and (next_norm is None or (next_norm.native_weight is not None and next_norm.eps == self.eps))):
            return kernels.decode_ops.add_rms_norm(x, y, self.native_weight, self.eps,
                                        None if next_norm is None else next_norm.native_weight)
        out = x + self(y)
        return out, None if next_norm is None else next_norm(out)
