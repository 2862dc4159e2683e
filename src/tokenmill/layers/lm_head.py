"""The LM head: hidden states -> float32 logits over the vocabulary, with its own weight or the tied embedding.

It is the widest matmul of a small model (Gemma 3 270M: 640 x 262,144, 62% of decode FLOPs), and its weight is
read once per step, so its layout is chosen once, on first use:
- CPU float32 with the native kernels: the weight repacked into column panels for `panel_gemm`
  (csrc/panel_gemm.cpp; 1.1-1.7x oneDNN's prepacked linear at 1-128 rows, benchmarks/lm_head_gemm.py);
- CPU bf16 where the CPU multiplies bf16 natively (AMX / AVX512-BF16): oneDNN-packed bf16 (the logits are
  rounded to bf16 once, then widened to float32, as vLLM's bf16 heads do);
- CPU bf16 elsewhere with the kernels: bf16 panels, float32 accumulation and float32 logits (half the bytes);
- CPU float32 without kernels: oneDNN-packed; other CPU cases: column-major for MKL; GPUs: the weight as is;
- GGUF blocks (its own or the tied embedding's; Q8_0 / Q5_0 rows interleaved by 8 at load): QuantizedLinear
  (layers/quantized.py), with 8-bit activations up to INT8_MAX_ROWS (32) rows when interleaved, else 16.
An untied head releases its own weight once repacked (memory stays the same); a tied head keeps the
embedding it shares, which the input lookup still needs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.layers.linear import column_major, try_pack
from tokenmill.layers.quantized import (
    INT8_MAX_ROWS,
    PLAIN_HEAD_INT8_MAX_ROWS,
    QuantizedLinear,
    densify,
    dequantized,
    interleave_rows,
    quantized_parts,
    wants_dense_copy,
)


class LMHead(nn.Module):
    accepts_quantized = True  # its own weight (or the tied embedding's) may arrive as GGUF blocks

    def __init__(self, hidden_size: int, vocab_size: int, tied: nn.Embedding | None = None):
        super().__init__()
        # A tuple, so the shared embedding is not registered twice (state dict, parameters, .to()).
        self._tied = (tied,) if tied is not None else ()
        self.weight = None if tied is not None else nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._project: Callable[..., torch.Tensor] | None = None
        self._writes_out = False

    def _source(self) -> torch.Tensor:
        return (self._tied[0].weight if self._tied else self.weight).detach()

    def use_cpu_kernels(self, kernels: CpuKernels | None) -> None:
        """Called once after loading (before the first step) by the model runner."""
        if self._project is None:
            self._prepare(kernels)

    def _prepare(self, kernels: CpuKernels | None) -> None:
        owner = self._tied[0] if self._tied else self
        parts = quantized_parts(owner)
        if parts is not None and kernels is not None:  # the blocks: 8-bit dot products for decode
            parts = interleave_rows(owner)  # Q8_0 / Q5_0 rows interleaved by 8 (csrc/quant_x8.h)
            dense = None
            if wants_dense_copy(owner):  # --dense-batch-weights: float32 panels for steps with many sequences
                panels = kernels.pack_panels(dequantized(parts, torch.float32))

                def dense(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
                    return kernels.panel_gemm(x, panels, out=out)

            int8_rows = INT8_MAX_ROWS if all(qt.interleaved for _, qt in parts) else PLAIN_HEAD_INT8_MAX_ROWS
            self._project = QuantizedLinear(kernels.quant, parts, keep_float32=True, int8_max_rows=int8_rows, dense=dense)
            self._writes_out = True
            if not self._tied:
                self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            return
        if parts is not None:  # no native kernels: the dequantized (exact) weight
            densify(owner, owner.weight)
        weight = self._source()
        if weight.device.type != "cpu":
            self._project = partial(torch.nn.functional.linear, weight=weight)
        elif weight.dtype == torch.bfloat16 and (packed := try_pack(weight)) is not None:
            self._project = packed
        elif weight.dtype in (torch.float32, torch.bfloat16) and kernels is not None:
            self._project = partial(kernels.panel_gemm, weight=kernels.pack_panels(weight.contiguous()))
            self._writes_out = True
        else:
            self._project = try_pack(weight) or partial(torch.nn.functional.linear, weight=column_major(weight))
        if not self._tied and weight.device.type == "cpu":  # the head holds its own copy now
            self.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> logits [T, V] float32. `out` ([T, V] float32) is a buffer the logits may be
        written into (the native path does, sparing a fresh allocation per step); use the returned tensor."""
        if self._project is None:
            self._prepare(None)
        if self._writes_out:
            return self._project(hidden, out=out)
        return self._project(hidden).float()
