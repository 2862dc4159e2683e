"""Weights kept as GGUF blocks: how a module holds them, the linear method over them, the embedding lookup.

A loader hands a module a QuantizedTensor instead of a dense tensor (`load_quantized`; a fused q/k/v or
gate/up layer gets one per shard, and the shards may differ in type, as in llama.cpp's mixes). The module
keeps its dense parameter unwritten until the model runner prepares it (`layers/linear.py:
prepare_linears_for_cpu`), which then installs one of:
- `QuantizedLinear`: x @ W.T over the blocks (native kernels; the model code calls the module as before);
- `QuantizedEmbedding`: the token lookup dequantizes only the rows it gathers;
- or, without native kernels, `densify`: the blocks dequantized into the dense parameter (the exact path).
The LM head reads a tied embedding's blocks through QuantizedLinear too (layers/lm_head.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.kernels.quant_kernels import QuantKernels
from tokenmill.model.gguf_dequant import dequantize

_ATTR = "quantized_parts"
# Rows up to which the 8-bit activation kernel runs; above it, weights are dequantized into float32 panels for
# the panel GEMM (exact activations). The int8 kernel reads each weight once for any row count, and a decode step
# of up to this many rows runs every layer in one native call (layers/decode_step.py). One layer of the default
# model as it is held (Q5_0 / Q8_0 rows interleaved by 8, Q4_K / Q6_K plain), int8 vs panels, AVX2 EPYC
# (benchmarks/quant_rows.py `crossover`): 1.27 / 1.15 / 1.02x at 16 / 32 / 64 rows on 2 threads, 1.46 / 1.33 /
# 1.20x on 1 (a Llama-1B-shaped layer of plain Q4_K / Q6_K blocks, scratch timing: 1.25x at 16 rows, 1.09x at 32).
# With the fused step up to 32 rows, a 32-sequence decode forward took 65 instead of 97 ms and W1 (32 concurrent,
# benchmarks/default_model_throughput.py) ran 126-137 instead of 121 tok/s. Steps over 32 rows (prefill chunks,
# bigger batches) keep float32 activations; one sequence's decode with up to 15 speculative drafts
# (metadata.MAX_DECODE_QUERIES) stays on the int8 kernel, where a row's result does not depend on the row count.
INT8_MAX_ROWS = 32
# An LM head in the plain layout (Q6_K, as in llama.cpp's Q4_K_M mixes of larger models) switches to the panels
# above 16 rows: its 8-bit product is 0.93-0.94 / 0.67-0.83x the panels at 32 / 64 rows (a Q6_K head of 32k x
# 2048, benchmarks/quant_rows.py `head_crossover`). A head with rows interleaved by 8 (Q8_0 / Q5_0, csrc/quant_x8.h)
# keeps INT8_MAX_ROWS: the default model's 262k x 640 Q8_0 head at 16 / 32 / 64 rows ran 30.7 / 60.8 / 131 ms
# against 46.7 / 83.7 / 144 in a quiet spell (1.52 / 1.38 / 1.10x), 1.31 / 1.07 / 0.88x in a busy one. A head's
# rows are one per sequence in a step (1 + k when verifying drafts).
PLAIN_HEAD_INT8_MAX_ROWS = 16


def load_quantized(module: nn.Module, weight: QuantizedTensor, param: torch.Tensor, shard: str | None = None) -> None:
    """Give `module` a block weight for `param` (or for one shard of it). Modules that cannot run blocks (any
    but linear, embedding and LM head layers) get the dequantized values at once."""
    if weight.shape[1] != param.shape[-1] or (shard is None and tuple(param.shape) != weight.shape):
        raise ValueError(f"quantized weight of shape {weight.shape} for a parameter of shape {tuple(param.shape)}")
    if isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "accepts_quantized", False):
        module.__dict__.setdefault(_ATTR, {})[shard] = weight
        return
    with torch.no_grad():
        param.copy_(dequantize(weight.gguf_blocks(), weight.qtype, weight.shape))


def has_block_parts(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_ATTR))


def quantized_parts(module: nn.Module) -> list[tuple[int, QuantizedTensor]] | None:
    """(first output row, blocks) per part when every row of the module's weight arrived as blocks, else None."""
    parts = module.__dict__.get(_ATTR)
    if not parts:
        return None
    if None in parts:  # the whole matrix as one block tensor (a fused layer quantized at load, or any other)
        return [(0, parts[None])]
    offsets = getattr(module, "shard_offsets", None)
    if offsets is None or set(parts) != set(offsets):
        return None
    return [(offsets[s][0], parts[s]) for s in offsets]


def interleave_rows(module: nn.Module) -> list[tuple[int, QuantizedTensor]] | None:
    """quantized_parts(module), each Q8_0 / Q5_0 part (rows a multiple of 8) repacked in place of its GGUF layout
    into rows interleaved by 8 (same bytes; QuantizedTensor.interleave): their int8 product gives 8 output
    columns per vector (csrc/quant_x8.h). A tied embedding's lookup reads the new layout too."""
    parts = quantized_parts(module)
    if parts is None:
        return None
    packed = {id(qt): qt.interleave() for _, qt in parts if qt.can_interleave()}
    if not packed:
        return parts
    stored = module.__dict__[_ATTR]
    for key, qt in stored.items():
        stored[key] = packed.get(id(qt), qt)
    lookup = module.__dict__.get("forward")
    if isinstance(lookup, QuantizedEmbedding):
        lookup.weight = packed.get(id(lookup.weight), lookup.weight)
    return [(off, packed.get(id(qt), qt)) for off, qt in parts]


def densify(module: nn.Module, weight: torch.Tensor) -> None:
    """Dequantize every block part of `module` into `weight` (its dense parameter) and forget the blocks."""
    parts = module.__dict__.pop(_ATTR, None) or {}
    offsets = getattr(module, "shard_offsets", None)
    with torch.no_grad():
        _write_parts(weight, [(0 if shard is None else offsets[shard][0], qt) for shard, qt in parts.items()])


def _write_parts(weight: torch.Tensor, parts: list[tuple[int, QuantizedTensor]]) -> torch.Tensor:
    """Each part's dequantized rows into `weight` from its first row on; returns `weight`."""
    for off, qt in parts:
        weight[off : off + qt.shape[0]] = dequantize(qt.gguf_blocks(), qt.qtype, qt.shape)
    return weight


def describe(model: nn.Module) -> str:
    """'Q5_0 x90, Q8_0 x10, ...' over the block weights the model holds, or '' when it holds none."""
    counts: dict[str, int] = {}
    for module in model.modules():
        for qt in (module.__dict__.get(_ATTR) or {}).values():
            counts[qt.qtype.name] = counts.get(qt.qtype.name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def keep_dense_for_batches(model: nn.Module) -> None:
    """Mark every block weight of `model` to get a dense copy for steps over INT8_MAX_ROWS rows (a plain-layout
    LM head: PLAIN_HEAD_INT8_MAX_ROWS), the --dense-batch-weights choice: batched throughput of the dense path for
    the dense path's memory."""
    for module in model.modules():
        if module.__dict__.get(_ATTR):
            module.__dict__["dense_batches"] = True


def wants_dense_copy(module: nn.Module) -> bool:
    return bool(module.__dict__.get("dense_batches"))


def dequantized(parts: list[tuple[int, QuantizedTensor]], dtype: torch.dtype) -> torch.Tensor:
    """The parts as one dense [rows, k] tensor of `dtype`."""
    width = max(off + qt.shape[0] for off, qt in parts)
    return _write_parts(torch.empty((width, parts[0][1].shape[1]), dtype=dtype), parts)


DenseRoute = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class QuantizedLinear:
    """x @ W.T (+ b) with W as block parts stacked along the output rows; float32 out (x's dtype for linears).

    Up to `int8_max_rows` rows: activations quantized once to 8 bits, shared by every part, integer dot products.
    More rows: `dense(x, out)` when the layer keeps a dense copy (--dense-batch-weights), else each part
    dequantized panel by panel into float32 for the panel GEMM (exact activations, no copy kept)."""

    def __init__(self, kernels: QuantKernels, parts: list[tuple[int, QuantizedTensor]], bias: torch.Tensor | None = None,
                 keep_float32: bool = False, int8_max_rows: int = INT8_MAX_ROWS, dense: DenseRoute | None = None):
        self.kernels = kernels
        self.dense = dense
        self.plan = kernels.plan(parts)
        self.in_features = self.plan.k
        self.out_features = self.plan.width
        self.bias = None if bias is None else bias.detach().float()
        self.keep_float32 = keep_float32
        self.int8_max_rows = int8_max_rows

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if (self.bias is None and x.dtype is torch.float32 and x.dim() == 2 and x.is_cpu and x.is_contiguous()
                and x.shape[1] == self.in_features and 0 < x.shape[0] <= self.int8_max_rows
                and (out is None or (out.dtype is torch.float32 and out.is_cpu and out.is_contiguous()
                                     and out.shape == (x.shape[0], self.out_features)))):
            return self.kernels.linear_int8_rows(x, self.plan, out)  # a decode step: the lean path
        lead = x.shape[:-1]
        if self.dense is not None and x.numel() > self.int8_max_rows * self.in_features:
            return self.dense(x.reshape(-1, self.in_features), out).view(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        rows = x2.shape[0]
        if out is None:
            out = torch.empty((rows, self.out_features), dtype=torch.float32)
        if rows:
            self.kernels.linear(x2, self.plan, out, int8=rows <= self.int8_max_rows)
        if self.bias is not None:
            out += self.bias
        out = out.view(*lead, self.out_features)
        return out if self.keep_float32 or x.dtype == torch.float32 else out.to(x.dtype)


class QuantizedEmbedding:
    """ids -> rows of the embedding in `dtype`, dequantizing only the gathered rows."""

    def __init__(self, kernels: QuantKernels, weight: QuantizedTensor, dtype: torch.dtype):
        self.kernels, self.weight, self.dtype = kernels, weight, dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.dequantize_rows(self.weight, ids).to(self.dtype)
