"""A weight kept as GGUF blocks: the bytes, the block type and the logical [rows, k] shape.

Rows are output features (one row of blocks each), k the input features; every row holds k / block_elems
blocks of block_bytes, back to back, exactly as a GGUF file stores a 2-D tensor. Slicing or reordering rows
is slicing or reordering `blocks` (llama.cpp's q/k row permutation is undone that way, with no dequantizing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# The block types with native kernels (csrc/quant_gemm.cpp), by GGML type id.
KERNEL_TYPES = (
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """Invariant: blocks is a CPU uint8 tensor [rows, row_bytes] with rows contiguous and
    row_bytes == k / block_elems * block_bytes of qtype."""

    blocks: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # (rows, k), torch order like the dense weight it stands for

    @staticmethod
    def from_bytes(raw: torch.Tensor, qtype: int, shape: tuple[int, int]) -> QuantizedTensor:
        """raw: the tensor's bytes (any shape, uint8) in GGUF order; shape: (rows, k)."""
        qtype = GGMLQuantizationType(qtype)
        rows, k = shape
        elems, nbytes = GGML_QUANT_SIZES[qtype]
        if k % elems:
            raise ValueError(f"{qtype.name} tensor of shape {shape}: rows of {k} are not whole {elems}-blocks")
        blocks = raw.reshape(rows, k // elems * nbytes)
        return QuantizedTensor(blocks if blocks.is_contiguous() else blocks.contiguous(), qtype, (rows, k))

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def with_rows(self, blocks: torch.Tensor) -> QuantizedTensor:
        """The same type and k over other rows of blocks (a slice or a permutation of this tensor's)."""
        return QuantizedTensor(blocks.contiguous(), self.qtype, (blocks.shape[0], self.shape[1]))


def has_kernel(qtype: int) -> bool:
    return qtype in KERNEL_TYPES
