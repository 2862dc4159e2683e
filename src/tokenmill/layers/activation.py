"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels


class SiluAndMul(nn.Module):
    """x = [gate | up] -> silu(gate) * up (Llama, Qwen)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)  # x is a fresh projection output: reuse its memory


class GeluTanhAndMul(nn.Module):
    """x = [gate | up] -> gelu_tanh(gate) * up (Gemma)."""

    def __init__(self):
        super().__init__()
        self.cpu_kernels: CpuKernels | None = None

    def use_cpu_kernels(self, kernels: CpuKernels | None) -> None:
        """Float32 / bf16 CPU inputs go through the native fused kernel (torch's GELU(tanh) is slow on CPU)."""
        self.cpu_kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cpu_kernels is not None and x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu
                and x.dim() == 2 and x.stride(1) == 1):
            return self.cpu_kernels.gelu_tanh_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return GeluTanhAndMul()
    raise ValueError(f"unsupported hidden_act={name!r}: must be one of silu, gelu_pytorch_tanh")
