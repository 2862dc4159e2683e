"""Fused linear layers and the weight-loading helpers that fill their shards.

The checkpoint keeps q/k/v (and gate/up) as separate tensors; we fuse them into one matmul because on CPU
one larger GEMM beats three small ones. Each fused layer knows where each named shard lives.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from tokenmill.kernels.cpu_features import host_cpu_features
from tokenmill.kernels.cpu_kernels import CpuKernels, PanelWeight
from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.layers.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    densify,
    dequantized,
    has_block_parts,
    interleave_rows,
    load_quantized,
    quantized_parts,
    wants_dense_copy,
)


class FusedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards (e.g. q, k, v)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, loaded: torch.Tensor | QuantizedTensor, is_bias: bool = False) -> None:
        offset, size = self.shard_offsets[shard]
        target = self.bias if is_bias else self.weight
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard!r}: checkpoint has {tuple(loaded.shape)}, expected first dim {size}")
        if isinstance(loaded, QuantizedTensor):
            load_quantized(self, loaded, target, shard)
            return
        with torch.no_grad():
            target[offset : offset + size].copy_(loaded)


def copy_weight(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, casting dtype; shape mismatches name the tensor."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"weight {name!r}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """Same [out, in] values stored transposed. F.linear then multiplies x by a contiguous [in, out] matrix,
    which MKL runs faster on CPU than the row-major layout for decode-sized batches (used where oneDNN
    packing is unavailable, e.g. bfloat16 on CPU)."""
    return weight.detach().t().contiguous().t()


class PackedLinear:
    """x @ W^T (+ b) with W prepacked once for oneDNN (CPU; float32, or bf16 where the CPU multiplies bf16
    natively: AMX tiles / AVX512-BF16 underneath): no per-call repacking of the weight.

    Measured over the 72 layer matmuls of Gemma 3 270M (2 threads, weights cold in cache as in a real
    step): 1.4x MKL's column-major layout at 64 rows, 1.2-2.7x from 2 to 512 rows, equal at 2048, ~1.25x
    slower at 1 row (oneDNN's fixed per-call cost); on the 262k-column LM head ~1.6x at 32-64 rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 64):
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)
        self.bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


class PanelLinear:
    """x @ W^T (+ b) for bf16 weights on CPUs without native bf16: the native panel GEMM reads the bf16 panels
    (half the bytes of float32), accumulates in float32 and the output is rounded to bf16 once, the same math
    as a bf16 GEMM with float32 accumulation. torch's own bf16 matmul is emulated there, ~100x slower."""

    def __init__(self, kernels: CpuKernels, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.kernels = kernels
        self.out_features = weight.shape[0]
        self.weight: PanelWeight = kernels.pack_panels(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernels.panel_gemm(x, self.weight)
        if self.bias is not None:
            out += self.bias
        return self.kernels.to_bf16(out) if x.dtype == torch.bfloat16 else out.to(x.dtype)


def try_pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear | None:
    """A PackedLinear when oneDNN runs this weight well (CPU float32, or bf16 on a CPU with native bf16), else
    None (callers pick another layout)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16:
        if not (host_cpu_features().native_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
    elif weight.dtype != torch.float32:
        return None
    try:
        packed = PackedLinear(weight, bias)
        probe = torch.zeros(2, weight.shape[1], dtype=weight.dtype)
        if packed(probe).shape != (2, weight.shape[0]):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


def prepare_linears_for_cpu(model: nn.Module, kernels: CpuKernels | None = None, final: bool = False) -> None:
    """Give every CPU nn.Linear (and block-quantized embedding) its fastest weight layout; the original weight is
    then released (same memory).

    Block weights (layers/quantized.py): QuantizedLinear / QuantizedEmbedding over the native kernels; without
    kernels they are dequantized into the dense weight, which then takes the dense route below (the loader
    passes kernels when the model holds blocks, so this is decided at load).
    float32: oneDNN-packed. bf16: oneDNN-packed where the CPU multiplies bf16 natively, else the native bf16
    panel GEMM (`kernels`), else (final, no kernels) column-major for MKL. Called at load (kernels not built
    yet: bf16 layers without native support wait) and by the model runner with its kernels
    (final=True)."""
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or module.weight.device.type != "cpu" \
                or getattr(module, "_cpu_ready", False):
            continue
        method = _quantized_method(module, kernels)
        if method is None and isinstance(module, nn.Linear):
            method = _dense_method(module.weight, module.bias, kernels)
            if method is None:
                if final:
                    module.weight = nn.Parameter(column_major(module.weight), requires_grad=False)
                    module._cpu_ready = True
                continue
        if method is None:
            continue
        module.forward = method  # instance attribute: module(x) now calls the prepared method
        module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
        module._cpu_ready = True


def _dense_method(weight: torch.Tensor, bias: torch.Tensor | None,
                  kernels: CpuKernels | None) -> PackedLinear | PanelLinear | None:
    """oneDNN-packed (float32, or bf16 on native-bf16 CPUs), else the bf16 panel GEMM (with kernels), else None."""
    method = try_pack(weight, bias)
    if method is None and weight.dtype == torch.bfloat16 and kernels is not None:
        method = PanelLinear(kernels, weight, bias)
    return method


def _quantized_method(module: nn.Module, kernels: CpuKernels | None) -> QuantizedLinear | QuantizedEmbedding | None:
    """The block-weight method for `module`, or None for the dense route (blocks, if any, dequantized into the
    weight first: some shards arrived dense, or there are no native kernels)."""
    if not has_block_parts(module):
        return None
    parts = quantized_parts(module)
    if parts is None or kernels is None:  # some shards dense, or no native kernels: the exact dense path
        densify(module, module.weight)
        return None
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(kernels.quant, parts[0][1], module.weight.dtype)
    parts = interleave_rows(module)  # Q8_0 / Q5_0: 8 rows per vector (decode rows 1.3-2x, quant_rows.py)
    dense = None
    if wants_dense_copy(module):  # --dense-batch-weights: the dense layout of this weight, for big batches
        weight = dequantized(parts, module.weight.dtype)
        method = _dense_method(weight, module.bias, kernels) or partial(
            torch.nn.functional.linear, weight=column_major(weight), bias=module.bias)

        def dense(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            return method(x)

    return QuantizedLinear(kernels.quant, parts, module.bias, dense=dense)
