"""Vectorised quantization of dense 2-D float weights into GGUF Q8_0 / Q4_K block bytes.

The inverse of gguf_dequant: `quantize(weight, qtype)` returns the bytes llama.cpp would store for the
tensor (rows contiguous, blocks in ggml-quants.c's layout), so tokenmill can write GGUF files and test
its dequantizer and quantized kernels against data it made itself.

* Q8_0 equals `gguf.quants.quantize` byte for byte: d = amax / 127 stored as fp16, q = x * (1 / d)
  rounded half away from zero (gguf's np_roundf), in the same float32 order. The rounding is done as
  trunc(t + copysign(0.5 - 2^-25, t)), equal to np_roundf on every float32 |t| < 128 (checked
  exhaustively) in three passes instead of seven.
* Q4_K follows llama.cpp's `quantize_row_q4_K_ref` (gguf-py has no Q4_K quantizer): each sub-block of 32
  gets an affine fit x ~ scale * q - offset, q in 0..15, scale and offset >= 0, chosen the way
  `make_qkx2_quants` does it: weights rms(x) + |x|, a min-max fit on [min(x, 0), max(x)], and a sweep of
  nearby q ranges, each refit by weighted least squares; the lowest weighted error wins. The eight scales
  and offsets of a super-block are then coded as 6-bit multiples of fp16 d / dmin and the quants
  recomputed against the coded values. llama.cpp sweeps 21 ranges 14.0..16.0; 8 ranges 14.0..15.75
  give an RMS error within 0.4% of a numpy port of llama.cpp's (0.0718 vs 0.0716 of rms(x) on Gaussian
  weights) in about half the time a 21-range sweep takes here.

Everything is whole-tensor torch arithmetic over many blocks at once, never a Python loop per block.
Rows go through in chunks (512K weights for Q8_0, 256K for Q4_K), and every big temporary lives in one
scratch buffer allocated per call (fresh MB-sized tensors per op cost more in page faults than the
arithmetic), so memory beyond the output stays ~20 MB for any tensor size or input dtype: bf16/fp16
inputs are widened to float32 a chunk at a time. The work runs on one torch thread: these are many
small element-wise ops, and on a busy 2-core machine OpenMP's second thread makes them 2-8x slower.

Measured on 2 CPU cores (AMD EPYC, torch 2.13, machine shared with other jobs, load average 2-7), 168M
weights, float32 or bf16 input: Q8_0 of 262144 x 640 in 0.45-1.0 s; Q4_K of 65536 x 2560 (640 is not a
multiple of 256) in 5.0-9.6 s, once 15 s while other jobs held both cores. Peak memory beyond input and
output: 10-20 MB (Q8_0), ~22 MB (Q4_K).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.model.gguf_dequant import one_torch_thread

SUPPORTED = {"q8_0": GGMLQuantizationType.Q8_0, "q4_k": GGMLQuantizationType.Q4_K}

_SUB = 32  # Q8_0 block and Q4_K sub-block length
# Largest float32 below 0.5: t + copysign(it, t) then truncation rounds half away from zero exactly.
_HALF_DOWN = 0.5 - 2.0**-25
# make_qkx2_quants-style sweep of q ranges: candidate i quantizes with inverse scale _SWEEP[i] / range.
# It includes 15.0, whose q also serve the plain min-max candidate.
_SWEEP = tuple(15 + 0.25 * i for i in range(-4, 4))
_PIECE = 1 << 15  # weights per pass of the candidate sweep: its [4, S, piece] floats stay cache-sized


class _Kind(NamedTuple):
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (x [n, block], out [n, bytes], scratch)
    chunk: int  # weights per chunk
    scratch_per_weight: int  # float32 scratch: this many per chunk weight ...
    scratch_fixed: int  # ... plus this many


def quantize(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """[rows, k] float -> uint8 [rows, k / block_elems * block_bytes] (GGUF bytes, rows contiguous).

    ValueError naming the problem when k is not a multiple of the block size (32 for Q8_0, 256 for
    Q4_K) or the type is not Q8_0/Q4_K."""
    qtype, kind = _resolve(qtype)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if weight.dim() != 2:
        raise ValueError(f"gguf_quantize: weight must be 2-D [rows, k], got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    if k == 0 or k % block_elems:
        raise ValueError(f"gguf_quantize: row length k={k} is not a multiple of the {qtype.name} block size "
                         f"{block_elems}")
    out = torch.empty(rows, k // block_elems * block_bytes, dtype=torch.uint8)
    step = max(1, kind.chunk // k)
    # Every big temporary lives in one buffer for the whole call: fresh MB-sized tensors per op cost
    # more in page faults than the arithmetic.
    scratch = torch.empty(kind.scratch_per_weight * step * k + kind.scratch_fixed)
    with torch.inference_mode(), one_torch_thread():
        for start in range(0, rows, step):
            x = weight[start : start + step].to(device="cpu", dtype=torch.float32).reshape(-1, block_elems)
            kind.fn(x, out[start : start + step].view(-1, block_bytes), scratch)
    return out


def _resolve(qtype: GGMLQuantizationType) -> tuple[GGMLQuantizationType, _Kind]:
    kinds = {
        GGMLQuantizationType.Q8_0: _Kind(_q8_0, 1 << 19, 2, 0),
        GGMLQuantizationType.Q4_K: _Kind(_q4_k, 1 << 18, 3, 4 * len(_SWEEP) * _PIECE),
    }
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"gguf_quantize: unknown GGML type {qtype!r} (supported: Q8_0, Q4_K)") from None
    if qtype not in kinds:
        raise ValueError(f"gguf_quantize: cannot quantize to {qtype.name} (supported: Q8_0, Q4_K)")
    return qtype, kinds[qtype]


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 1] float32 -> [n, 2] uint8: fp16, little-endian as GGUF stores it."""
    return v.to(torch.float16).view(torch.uint8).view(-1, 2)


def _q8_0(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """[n, 32] float32 -> out [n, 34]: fp16 d, then 32 int8 quants. scratch: 2 floats per weight."""
    t, half = scratch[: 2 * x.numel()].view(2, *x.shape)
    d = torch.abs(x, out=t).amax(-1, keepdim=True) / 127
    torch.mul(x, torch.where(d == 0, 0.0, 1.0 / d), out=t)
    t += torch.copysign(torch.tensor(_HALF_DOWN), t, out=half)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:].view(torch.int8).copy_(t)  # float -> int8 truncates toward zero


def _q4_k(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """[n, 256] float32 -> out [n, 144]: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles.
    scratch: 3 floats per weight plus the candidate buffer."""
    sub = x.view(-1, _SUB)
    scale, offset = _fit_sub_blocks(sub, scratch)
    d, dmin, ls, lm = _code_scales(scale.view(-1, 8), offset.view(-1, 8))
    eff_d = (d.float() * ls).view(-1, 1)
    eff_m = (dmin.float() * lm).view(-1, 1)
    t = torch.add(sub, eff_m, out=scratch[: x.numel()].view_as(sub))
    t.mul_(torch.where(eff_d == 0, 0.0, 1.0 / eff_d)).round_().clamp_(0, 15)
    q = t.to(torch.uint8).view(-1, 4, 2, _SUB)
    out[:, 0:2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(dmin)
    out[:, 4:16] = _pack_scales(ls.to(torch.uint8), lm.to(torch.uint8))
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).view(-1, 128)


def _fit_sub_blocks(x: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 32] -> (scale [n], offset [n]), both >= 0, minimising sum w (scale * q - offset - x)^2.

    make_qkx2_quants' arithmetic, vectorised: weights w = rms(x) + |x|, range [min(x, 0), max(x)] mapped
    to unit in [0, 1]; per sweep step the weighted sums of q, q^2 and q x; then `_best_fit`."""
    m = x.numel()
    w, wx, unit = scratch[: 3 * m].view(3, *x.shape)
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).mul_(_SUB**-0.5)
    torch.abs(x, out=w).add_(rms)
    torch.mul(w, x, out=wx)
    lo = x.amin(-1, keepdim=True).clamp_(max=0)
    span = x.amax(-1, keepdim=True) - lo
    torch.sub(x, lo, out=unit).mul_(torch.where(span > 0, 1.0 / span, 0.0))
    steps = _candidate_sums(unit.view(1, -1), w.view(1, -1), wx.view(1, -1), scratch[3 * m :])
    totals = w.sum(-1), wx.sum(-1), torch.mul(wx, x, out=unit).sum(-1)  # unit is spent: reuse it
    scale, mn = _best_fit(totals, steps, lo.view(-1), span.view(-1))
    return scale, -mn


def _best_fit(totals: tuple[torch.Tensor, ...], steps: tuple[torch.Tensor, ...], lo: torch.Tensor,
              span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (w, w x, w x^2) [n] and per sweep step (w q, w q^2, w q x) [S, n] -> the best (scale, min) [n].

    Candidates: each step's weighted least-squares fit, plus the plain min-max fit (span / 15, lo) on the
    15.0 step's q; the smallest weighted squared error, expanded in the sums, wins. Steps whose q are
    (nearly) all equal have a determinant that is only rounding noise: they are left out, since their
    noise-sized fits would make the expanded error meaningless."""
    sw, swx, swx2 = totals
    scale, mn, det = _least_squares(sw, swx, *steps)
    usable = det > 1e-4 * sw * steps[1]
    plain = _SWEEP.index(15.0)
    sl, sl2, sxl = (torch.cat((s, s[plain : plain + 1])) for s in steps)
    scale, mn = torch.cat((scale, (span / 15).view(1, -1))), torch.cat((mn, lo.view(1, -1)))
    err = scale * (scale * sl2 + 2 * mn * sl - 2 * sxl) + mn * (mn * sw - 2 * swx) + swx2
    usable = torch.cat((usable, torch.ones_like(usable[:1]))) & ~err.isnan()
    best = torch.where(usable, err, torch.inf).min(0, keepdim=True).indices  # argmin(0) is ~15x slower
    return scale.gather(0, best).view(-1), mn.gather(0, best).view(-1)


def _candidate_sums(unit: torch.Tensor, w: torch.Tensor, wx: torch.Tensor,
                    scratch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per sweep step i and sub-block: q = min(round(unit * _SWEEP[i]), 15), then sums of w q, w q^2, w x q.

    unit, w, wx are [1, m] (m = 32 * sub-blocks); the sums come back [S, m / 32] each. The [4, S, piece]
    products live in `scratch`, piece by piece so they stay cache-sized. Flat 2-D operands keep the
    broadcasts cheap (a [n, 1, 32] x [n, S, 32] broadcast is ~10x slower), and one matrix-vector
    product does all the 32-wide sums."""
    m, steps = unit.shape[1], len(_SWEEP)
    nmax, ones = torch.tensor(_SWEEP).view(-1, 1), torch.ones(_SUB)
    sums = torch.empty(3, steps, m // _SUB)
    for a in range(0, m, _PIECE):
        b = min(a + _PIECE, m)
        buf = scratch[: 4 * steps * (b - a)].view(4, steps, b - a)
        q, prods = buf[0], buf[1:]
        torch.mul(nmax, unit[:, a:b], out=q).round_().clamp_(max=15)
        torch.mul(q, w[:, a:b], out=prods[0])
        torch.mul(prods[0], q, out=prods[1])
        torch.mul(q, wx[:, a:b], out=prods[2])
        sums[:, :, a // _SUB : b // _SUB] = (prods.view(-1, _SUB) @ ones).view(3, steps, -1)
    return sums[0], sums[1], sums[2]


def _least_squares(sw: torch.Tensor, swx: torch.Tensor, sl: torch.Tensor, sl2: torch.Tensor,
                   sxl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted fit x ~ scale * q + mn from the sums (w, w x, w q, w q^2, w q x); mn clipped to <= 0."""
    det = sw * sl2 - sl * sl
    scale = (sw * sxl - swx * sl) / det
    mn = (sl2 * swx - sl * sxl) / det
    pos = mn > 0
    return torch.where(pos, sxl / sl2, scale), torch.where(pos, 0.0, mn), det


def _code_scales(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[n, 8] float scales/offsets -> fp16 d, dmin [n, 1] and their 6-bit multiples ls, lm [n, 8] (float)."""
    max_s, max_m = scale.amax(-1, keepdim=True), offset.amax(-1, keepdim=True)
    ls = (scale * torch.where(max_s > 0, 63 / max_s, 0.0)).round_().clamp_(0, 63)
    lm = (offset * torch.where(max_m > 0, 63 / max_m, 0.0)).round_().clamp_(0, 63)
    return (max_s / 63).to(torch.float16), (max_m / 63).to(torch.float16), ls, lm


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[n, 8] uint8 6-bit scales and mins -> [n, 12] bytes, the inverse of ggml's get_scale_min_k4:
    bytes 0-3 scales 0-3, 4-7 mins 0-3 (top 2 bits: the high bits of scales/mins 4-7), 8-11 low nibbles
    of scales 4-7 | low nibbles of mins 4-7 << 4."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat(
        (lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)), dim=-1
    )
