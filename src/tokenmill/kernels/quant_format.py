"""A weight kept as GGUF blocks: the bytes, the block type and the logical [rows, k] shape.

Rows are output features (one row of blocks each), k the input features; every row holds k / block_elems
blocks of block_bytes, back to back, exactly as a GGUF file stores a 2-D tensor. Slicing or reordering rows
is slicing or reordering `blocks` (llama.cpp's q/k row permutation is undone that way, with no dequantizing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


# The native kernels' id for a layout with rows interleaved in groups of GROUP_ROWS (the GGML id plus this).
INTERLEAVED = 256
GROUP_ROWS = 8


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """Invariant: blocks is a CPU uint8 tensor [rows, row_bytes] with row_bytes == k / block_elems * block_bytes
    of qtype; rows back to back as GGUF stores them, or, when `interleaved`, rows in groups of 8 interleaved
    (`interleave`: Q8_0 / Q5_0, the layouts of csrc/quant_x8.h)."""

    blocks: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # (rows, k), torch order like the dense weight it stands for
    interleaved: bool = False

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
        if self.interleaved:
            raise ValueError("QuantizedTensor.with_rows: the rows are interleaved; slice the GGUF layout instead")
        return QuantizedTensor(blocks.contiguous(), self.qtype, (blocks.shape[0], self.shape[1]))

    @property
    def kernel_type(self) -> int:
        """The type id the native kernels dispatch on (the layout included)."""
        return int(self.qtype) + (INTERLEAVED if self.interleaved else 0)

    def can_interleave(self) -> bool:
        return self.qtype in INTERLEAVED_TYPES and self.shape[0] % GROUP_ROWS == 0 and not self.interleaved

    def interleave(self) -> QuantizedTensor:
        """The same weight with rows interleaved in groups of 8 (same bytes in all; csrc/quant_x8.h): per group
        and block of 32 columns, the 8 rows' f16 scales, then the quants in chunks of 4 weights of each row in
        turn (Q8_0: a byte each; Q5_0: nibbles of chunks 2p and 2p + 1 in one byte, then a 32-bit word of 5th
        bits per chunk)."""
        if not self.can_interleave():
            names = "/".join(t.name for t in INTERLEAVED_TYPES)
            raise ValueError(f"QuantizedTensor.interleave: needs {names} with rows a multiple of {GROUP_ROWS}, got "
                             f"{self.qtype.name} {self.shape}{' (already interleaved)' if self.interleaved else ''}")
        rows, k = self.shape
        nb, nbytes = k // 32, GGML_QUANT_SIZES[self.qtype][1]
        # numpy's buffer, not torch's: numpy asks the kernel for transparent huge pages (madvise), as the loader's
        # copies of the GGUF tensors get them; the LM head streamed through 4 kB pages ran ~25% slower at 1 row.
        out = torch.from_numpy(np.empty(tuple(self.blocks.shape), dtype=np.uint8))
        step = 1024 * GROUP_ROWS  # a few MB at a time: the load's peak memory grows by the copy alone
        for r0 in range(0, rows, step):
            b = self.blocks[r0 : r0 + step].view(-1, GROUP_ROWS, nb, nbytes)
            g = b.shape[0]
            packed = out[r0 : r0 + step].view(g, nb, GROUP_ROWS * nbytes)
            packed[..., :16] = b[..., :2].permute(0, 2, 1, 3).reshape(g, nb, 16)
            if self.qtype == GGMLQuantizationType.Q8_0:
                packed[..., 16:] = _chunked(b[..., 2:]).reshape(g, nb, 256)
                continue
            qs = b[..., 6:]
            u = torch.cat([qs & 15, qs >> 4], dim=-1).view(g, GROUP_ROWS, nb, 4, 2, 4)  # weight 8p + 4 half + t
            nibbles = u[..., 0, :] | (u[..., 1, :] << 4)  # [g, rows, nb, p, t]
            packed[..., 16:144] = nibbles.permute(0, 2, 3, 1, 4).reshape(g, nb, 128)
            high = _bits(b[..., 2:6])  # [g, rows, nb, 32]: weight w's 5th bit
            packed[..., 144:] = _pack_bits(_chunked(high).reshape(g, nb, 8, 32)).reshape(g, nb, 32)
        return QuantizedTensor(out, self.qtype, self.shape, True)

    def gguf_blocks(self) -> torch.Tensor:
        """The blocks in GGUF's layout, [rows, row_bytes] (`blocks` itself unless interleaved)."""
        if not self.interleaved:
            return self.blocks
        rows, k = self.shape
        nb, g, nbytes = k // 32, rows // GROUP_ROWS, GGML_QUANT_SIZES[self.qtype][1]
        packed = self.blocks.view(g, nb, GROUP_ROWS * nbytes)
        scales = packed[..., :16].reshape(g, nb, GROUP_ROWS, 2).permute(0, 2, 1, 3)
        if self.qtype == GGMLQuantizationType.Q8_0:
            fields = [scales, _unchunked(packed[..., 16:].reshape(g, nb, 8, GROUP_ROWS, 4))]
        else:
            nibbles = packed[..., 16:144].reshape(g, nb, 4, GROUP_ROWS, 4).permute(0, 3, 1, 2, 4)  # [g, rows, nb, p, t]
            u = torch.stack([nibbles & 15, nibbles >> 4], dim=-2).reshape(g, GROUP_ROWS, nb, 32)
            high = _unchunked(_bits(packed[..., 144:].reshape(g, nb, 8, 4)).reshape(g, nb, 8, GROUP_ROWS, 4))
            fields = [scales, _pack_bits(high), u[..., :16] | (u[..., 16:] << 4)]
        return torch.cat(fields, dim=-1).reshape(rows, -1).contiguous()


# The block types that interleave (csrc/quant_x8.h has their kernels).
INTERLEAVED_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0)


def _chunked(q: torch.Tensor) -> torch.Tensor:
    """[g, rows, nb, 32] per-row values -> [g, nb, chunk, rows, 4]: chunk i holds values 4i..4i+3 of each row."""
    g, rows, nb, _ = q.shape
    return q.reshape(g, rows, nb, 8, 4).permute(0, 2, 3, 1, 4)


def _unchunked(c: torch.Tensor) -> torch.Tensor:
    """The inverse of _chunked: [g, nb, chunk, rows, 4] -> [g, rows, nb, 32]."""
    g, nb, _, rows, _ = c.shape
    return c.permute(0, 3, 1, 2, 4).reshape(g, rows, nb, 32)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> [..., 8 n] of 0/1, little-endian (bit t of byte m is element 8 m + t)."""
    return ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of _bits."""
    weights = torch.tensor([1 << t for t in range(8)], dtype=torch.uint8)
    return (bits.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def has_kernel(qtype: int) -> bool:
    return qtype in KERNEL_TYPES
