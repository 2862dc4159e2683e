"""Plain-PyTorch oracles of the quantized-weight kernels (csrc/quant_gemm.cpp, kernels/quant_kernels.py).

The weights' dequantized values come from model/gguf_dequant.py (itself checked bit for bit against gguf's
numpy reference). A product over blocks equals, in exact arithmetic, the float64 product of the dequantized
activations and weights: sum_i (s q_i - m)(dx qx_i) = dx (s sum q qx - m sum qx), so that is the oracle;
the kernel may differ only by float32 rounding of the scale products and of the accumulation.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.model.gguf_dequant import dequantize


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [m, k] -> (q int8 [m, k], d [m, k/32], sums [m, k/32] = d * sum of the block's quants).
    Scale amax / 127 per block of 32, q = round(x / scale) half to even (the kernel's rounding)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    d = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv.unsqueeze(-1))
    return q.to(torch.int8).reshape(m, k), d, d * q.sum(dim=-1)


def dequantize_weight(weight: QuantizedTensor) -> torch.Tensor:
    """float32 [rows, k]."""
    return dequantize(weight.gguf_blocks(), weight.qtype, weight.shape)


def gemm_int8(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """float64 [m, n]: what quant_linear_int8 computes for float32 x, before float32 rounding."""
    q, d, _ = quantize_activations(x)
    m, k = q.shape
    x_hat = (q.double().reshape(m, k // 32, 32) * d.double().unsqueeze(-1)).reshape(m, k)
    return x_hat @ dequantize_weight(weight).double().T


def gemm_panels(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """float64 [m, n]: x @ dequantize(W).T on the float32 activations."""
    return x.double() @ dequantize_weight(weight).double().T
