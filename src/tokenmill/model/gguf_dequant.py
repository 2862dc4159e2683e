"""Vectorised dequantization of GGUF tensor blocks to float32 torch tensors.

Each function takes the raw bytes of whole blocks as a uint8 tensor [n_blocks, type_size] and returns
float32 [n_blocks, block_size]; the layouts follow ggml-quants.c (and gguf.quants, the reference the
tests compare against bit for bit). Work is done with whole-tensor bit operations, never per element,
and in row chunks so a 167M-element embedding never needs more than one chunk of temporaries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256
_CHUNK_BLOCKS = 1 << 16


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, ..., k] uint8 -> [n, ..., 2, k]: low nibbles first, then high nibbles (ggml's order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """[n, ..., k] uint8 -> [n, ..., count, k]: field i is (b >> (i * width)) & mask."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8).view(count, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return d * blocks[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32).float() - 8.0
    return d * q


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    qh = _bits(blocks[:, 2:6], 1, 8).transpose(-1, -2).reshape(-1, 32)  # bit j of the little-endian u32
    ql = _nibbles(blocks[:, 6:]).reshape(-1, 32)
    return d * ((ql | (qh << 4)).float() - 16.0)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit (scale, min) pairs -> two [n, 8] float32 tensors."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32).float()
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scales(blocks[:, 4:16])
    qh = _bits(blocks[:, 16:48], 1, 8)  # [n, 8, 32]: sub-block i takes bit i of each qh byte
    ql = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = (ql | (qh << 4)).float()
    out = (d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)
    return out.reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    qh = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 2, 4).reshape(-1, 8, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    q = ((ql | (qh << 4)).to(torch.int16) - 32).float().reshape(-1, 16, 16)
    return ((d * scales).unsqueeze(-1) * q).reshape(-1, QK_K)


_BLOCK_FNS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
SUPPORTED_TYPES = tuple(_PLAIN) + tuple(_BLOCK_FNS)


def dequantize(raw: np.ndarray | torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF tensor bytes -> a `dtype` tensor of `shape` (torch order)."""
    ggml_type = GGMLQuantizationType(ggml_type)
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))  # memmaps are read-only
    if ggml_type in _PLAIN:
        return raw.view(_PLAIN[ggml_type]).reshape(shape).to(dtype)
    fn = _BLOCK_FNS.get(ggml_type)
    if fn is None:
        names = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"model: GGUF tensor type {ggml_type.name} is not supported (supported: {names})")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.view(-1, type_size)
    out = torch.empty(blocks.shape[0], block_size, dtype=dtype)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = fn(blocks[start:stop])
    return out.reshape(shape)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Dequantization (and quantization: gguf_quantize) is many small element-wise ops: with 2 threads on a busy 2-core machine OpenMP
    waits cost 4x (measured 14.9 s vs 3.6 s for Gemma 3 270M); one thread is never much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
