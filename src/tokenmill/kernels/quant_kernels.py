"""Typed wrappers over the quantized-weight kernels of the native library (csrc/quant_gemm.cpp).

`linear` runs one layer (its block parts, checked once into a `plan`) by one of two products, picked by the
caller by row count (layers/quantized.py):
- int8: activations quantized once per layer to 8-bit blocks (what `quantize_activations` computes alone),
  integer dot products per block, block scales in float32 (decode: reads the blocks once, ~4-7x fewer bytes
  than float32);
- panels: weights dequantized on the fly into float32 panels for the panel GEMM microkernel (prefill and large
  batches: float32 arithmetic on exact activations, no dense copy kept).
Oracle: kernels/quant_reference.py.
"""

from __future__ import annotations

import ctypes

import torch

from tokenmill.kernels.quant_format import QuantizedTensor, has_kernel

_p, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def bind(f, argtypes: list, restype=ctypes.c_int):
    """A ctypes function of the library with its argument and result types set (restype None: void)."""
    f.restype = restype
    f.argtypes = argtypes
    return f


class QuantActivations:
    """x [m, k] quantized to int8 blocks of 32: q [m, k] int8; d, sums [m, k/32] float32 (the block's scale, and
    the scale times the sum of its quants)."""

    __slots__ = ("d", "k", "q", "rows", "sums")

    def __init__(self, q: torch.Tensor, d: torch.Tensor, sums: torch.Tensor):
        self.q, self.d, self.sums = q, d, sums
        self.rows, self.k = q.shape


class LinearPlan:
    """A layer's block parts and their kernel arguments as C arrays, built once (layers/quantized.py)."""

    def __init__(self, parts: list[tuple[int, QuantizedTensor]], k: int):
        self.parts, self.k = parts, k
        self.width = max(off + w.shape[0] for off, w in parts)

        def arr(ctype, values):
            return (ctype * len(values))(*values)

        self.types = arr(ctypes.c_int, [w.kernel_type for _, w in parts])
        self.pointers = arr(ctypes.c_int64, [w.blocks.data_ptr() for _, w in parts])  # the parts keep them alive
        self.rows = arr(ctypes.c_int64, [w.shape[0] for _, w in parts])
        self.row_bytes = arr(ctypes.c_int64, [w.blocks.shape[1] for _, w in parts])
        self.cols = arr(ctypes.c_int64, [off for off, _ in parts])
        self._scratch: dict[int, tuple[torch.Tensor, int, int, int]] = {}

    def scratch(self, m: int) -> tuple[torch.Tensor, int, int, int]:
        """The int8 product's scratch for m rows (quants, block scales, block sums: memory and pointers), made
        once per row count and reused: a layer's calls never overlap (one model runs one step at a time)."""
        got = self._scratch.get(m)
        if got is None:
            nb = m * (self.k // 32)
            mem = torch.empty(m * self.k + 8 * nb, dtype=torch.int8)
            got = self._scratch[m] = (mem, mem.data_ptr(), mem.data_ptr() + m * self.k, mem.data_ptr() + m * self.k + 4 * nb)
        return got


class QuantKernels:
    def __init__(self, lib: ctypes.CDLL):
        self._quantize = bind(lib.quantize_act_q8, [_p, _i64, _i64, _i64, _p, _p, _p, _int], None)
        self._panels = bind(lib.quant_gemm_panels, [_int, _p, _i64, _i64, _i64, _p, _i64, _i64, _p, _i64, _int])
        self._dequant = bind(lib.quant_dequant_rows, [_int, _p, _i64, _p, _i64, _i64, _p, _int])
        self._linear_int8 = bind(lib.quant_linear_int8, [_p, _i64, _i64, _i64, _p, _p, _p, _int, _p, _p, _p, _p, _p,
                                                          _p, _i64, _int])

    def quantize_activations(self, x: torch.Tensor) -> QuantActivations:
        """A CPU float32 [m, k] (k a multiple of 32, rows contiguous) as 8-bit blocks (round half to even)."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] % 32 or x.stride(1) != 1:
            raise ValueError("quantize_activations: x must be CPU float32 [m, k] with k % 32 == 0, rows contiguous")
        m, k = x.shape
        q = torch.empty((m, k), dtype=torch.int8)
        d = torch.empty((m, k // 32), dtype=torch.float32)
        sums = torch.empty((m, k // 32), dtype=torch.float32)
        self._quantize(x.data_ptr(), m, k, x.stride(0), q.data_ptr(), d.data_ptr(), sums.data_ptr(),
                       torch.get_num_threads())
        return QuantActivations(q, d, sums)

    def plan(self, parts: list[tuple[int, QuantizedTensor]]) -> LinearPlan:
        """Check a layer's parts once (types with kernels, equal k) and keep their kernel arguments."""
        k = parts[0][1].shape[1]
        for _, weight in parts:
            self._check(weight, k)
        return LinearPlan(parts, k)

    def linear(self, x: torch.Tensor, plan: LinearPlan, out: torch.Tensor, int8: bool) -> None:
        """out[:, off : off + rows_i] = x @ W_i.T for every part of the plan. int8: x quantized once and all parts
        in one native call (decode runs ~70 of these per token, so the per-call cost matters); else the panels,
        part by part. x CPU float32 [m, k] with contiguous rows; out [m, >= plan.width] likewise."""
        m, k = x.shape
        if k != plan.k:
            raise ValueError(f"quantized linear: x has {k} features, the weights {plan.k}")
        if x.dtype != torch.float32 or x.stride(1) != 1 or out.dtype != torch.float32 or out.stride(1) != 1 \
                or out.shape[0] != m or out.shape[1] < plan.width or out.device.type != "cpu" or x.device.type != "cpu":
            raise ValueError(f"quantized linear: x must be CPU float32 [m, {plan.k}] and out [m, >= {plan.width}], "
                             "both with contiguous rows")
        threads = torch.get_num_threads()
        if int8:
            q = torch.empty((m, k), dtype=torch.int8)
            ds = torch.empty(2 * m * (k // 32), dtype=torch.float32)  # block scales, then block sums
            rc = self._linear_int8(x.data_ptr(), m, k, x.stride(0), q.data_ptr(), ds.data_ptr(),
                                   ds.data_ptr() + 4 * m * (k // 32), len(plan.parts), plan.types, plan.pointers,
                                   plan.rows, plan.row_bytes, plan.cols, out.data_ptr(), out.stride(0), threads)
            if rc != 0:
                raise ValueError("quantized linear: a part has a block type without a kernel")
            return
        for off, weight in plan.parts:
            self._panels(weight.kernel_type, x.data_ptr(), m, k, x.stride(0), weight.blocks.data_ptr(), weight.shape[0],
                         weight.blocks.shape[1], out.data_ptr() + 4 * off, out.stride(0), threads)

    def linear_int8_rows(self, x: torch.Tensor, plan: LinearPlan, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T by the int8 product into `out` or a fresh float32 [m, plan.width]: the decode path, without
        linear()'s checks, for a caller that made sure x is a CPU float32 [m, plan.k] with m >= 1, contiguous,
        and out (if given) a contiguous CPU float32 [m, plan.width] (layers/quantized.py). A decode step runs ~70
        of these: linear() costs ~3x the native call in Python."""
        m = x.shape[0]
        if out is None:
            out = torch.empty((m, plan.width), dtype=torch.float32)
        _, q, d, sums = plan.scratch(m)
        self._linear_int8(x.data_ptr(), m, plan.k, plan.k, q, d, sums, len(plan.parts), plan.types, plan.pointers,
                          plan.rows, plan.row_bytes, plan.cols, out.data_ptr(), plan.width, torch.get_num_threads())
        return out

    def dequantize_rows(self, weight: QuantizedTensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 [len(rows), k]: the given rows of W (an embedding lookup that dequantizes only what it reads)."""
        self._check(weight, weight.shape[1])
        ids = rows.reshape(-1).to(torch.int64).contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise IndexError(f"dequantize_rows: row ids must be in [0, {weight.shape[0]})")
        out = torch.empty((ids.numel(), weight.shape[1]), dtype=torch.float32)
        self._dequant(weight.kernel_type, weight.blocks.data_ptr(), weight.blocks.shape[1], ids.data_ptr(), ids.numel(),
                      weight.shape[1], out.data_ptr(), torch.get_num_threads())
        return out.view(*rows.shape, weight.shape[1])

    @staticmethod
    def _check(weight: QuantizedTensor, k: int) -> None:
        if not has_kernel(weight.qtype):
            raise ValueError(f"quantized gemm: no kernel for {weight.qtype.name}")
        if k != weight.shape[1] or weight.blocks.dtype != torch.uint8 or not weight.blocks.is_contiguous():
            raise ValueError(f"quantized gemm: x has {k} features, the {weight.qtype.name} weight {weight.shape}")
