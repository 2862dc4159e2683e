"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x = [gate | up] -> silu(gate) * up (Llama, Qwen)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)  # x is a fresh projection output: reuse its memory


class GeluTanhAndMul(nn.Module):
    """x = [gate | up] -> gelu_tanh(gate) * up (Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return GeluTanhAndMul()
    raise ValueError(f"unsupported hidden_act={name!r}: must be one of silu, gelu_pytorch_tanh")
