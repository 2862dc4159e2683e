"""gguf_quantize writes llama.cpp's GGUF block bytes: Q8_0 equal to gguf.quants.quantize byte for byte,
Q4_K decoded by gguf's own dequantizer to within 4-bit error, and as accurate as llama.cpp's algorithm."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tokenmill.model.gguf_dequant import dequantize
from tokenmill.model.gguf_quantize import SUPPORTED, quantize

Q8_0, Q4_K = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _round_trip(x: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    return dequantize(quantize(x, qtype), qtype, tuple(x.shape))


def _near_ties(rng: np.random.Generator) -> np.ndarray:
    """Blocks with amax 127 (so d = 1 and x / d = x exactly) holding k + 0.5 and its float32 neighbours:
    where round-half-away-from-zero shortcuts such as trunc(t + 0.5) go wrong (0.49999997 + 0.5 == 1)."""
    ties = rng.integers(0, 127, 248).astype(np.float32) + np.float32(0.5)
    ties[:3] = 0.5
    step = rng.choice([-1.0, 0.0, 1.0], 248).astype(np.float32)
    ties = np.where(step == 0, ties, np.nextafter(ties, ties + step)) * rng.choice([-1, 1], 248)
    blocks = np.concatenate([np.full((8, 1), 127, np.float32), ties.reshape(8, 31)], axis=1)
    return blocks.reshape(-1)


def _q8_0_inputs() -> np.ndarray:
    """Gaussian rows spanning 1e-6..1e6 in scale, an all-zero block, exact .5 ties and their neighbours,
    huge rows."""
    rng = _rng(1)
    x = rng.standard_normal((64, 256)) * 10.0 ** rng.uniform(-6, 6, (64, 1))
    x[0, 32:64] = 0.0
    x[1] = rng.integers(-254, 255, 256) / 2  # amax 127 -> d = 1: every odd value is a rounding tie
    x[2] = _near_ties(rng)
    x[3] = rng.standard_normal(256) * 1e6  # d up to ~3e4: near the top of fp16
    return x.astype(np.float32)


def test_supported_names():
    assert SUPPORTED == {"q8_0": Q8_0, "q4_k": Q4_K}


def test_q8_0_bytes_equal_gguf_reference():
    x = _q8_0_inputs()
    ours = quantize(torch.from_numpy(x), Q8_0)
    assert ours.dtype == torch.uint8 and ours.shape == (64, 256 // 32 * 34)
    np.testing.assert_array_equal(ours.numpy(), quants.quantize(x, Q8_0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_q8_0_half_inputs_match_reference_on_widened_values(dtype):
    x = torch.from_numpy(_rng(2).standard_normal((16, 128)).astype(np.float32)).to(dtype)
    np.testing.assert_array_equal(quantize(x, Q8_0).numpy(), quants.quantize(x.float().numpy(), Q8_0))


def test_q8_0_round_trip_error_is_half_a_step():
    """|x - d16 q| <= d / 2 + 127 |d - d16|: the rounding plus the fp16 rounding of the scale."""
    x = torch.from_numpy(_q8_0_inputs())
    y = _round_trip(x, Q8_0)
    blocks, err = x.double().view(-1, 32), (y.double() - x.double()).view(-1, 32)
    d = blocks.abs().amax(-1) / 127
    d16 = d.half().double()
    bound = d / 2 + 127 * (d - d16).abs()
    assert (err.abs().amax(-1) <= bound * (1 + 1e-6)).all()


def test_chunk_seams_change_nothing():
    """Tensors spanning several chunks quantize exactly like their rows one at a time."""
    x = torch.from_numpy(_rng(3).standard_normal((600, 1024)).astype(np.float32))
    for qtype in (Q8_0, Q4_K):
        whole = quantize(x, qtype)
        parts = torch.cat([quantize(x[i : i + 150], qtype) for i in range(0, 600, 150)])
        assert torch.equal(whole, parts), qtype.name


def test_input_and_thread_count_are_left_alone():
    x, threads = torch.randn(8, 512), torch.get_num_threads()
    before = x.clone()
    quantize(x, Q8_0), quantize(x, Q4_K)
    assert torch.equal(x, before) and torch.get_num_threads() == threads


def _q4_k_cases() -> dict[str, np.ndarray]:
    rng = _rng(4)
    return {
        "normal": rng.standard_normal((64, 1024)),
        "student_t3": rng.standard_t(3, (64, 1024)),
        "row_scales": rng.standard_normal((64, 1024)) * 10.0 ** rng.uniform(-3, 3, (64, 1)),
        "positive": rng.uniform(0, 1, (64, 1024)),
        "negative": rng.uniform(-1, -0.5, (64, 1024)),
    }


@pytest.mark.parametrize("name", list(_q4_k_cases()))
def test_q4_k_round_trip_error_per_sub_block(name):
    """Ideal uniform 4-bit rounding gives rms = span / 15 / sqrt(12) = 0.019 span; the 6-bit scale coding and
    clipped outliers add a little on top, never much."""
    x = torch.from_numpy(_q4_k_cases()[name].astype(np.float32))
    err = (_round_trip(x, Q4_K) - x).view(-1, 32)
    sub = x.view(-1, 32)
    span = sub.amax(-1) - sub.amin(-1)
    assert (err.square().mean(-1).sqrt() <= 0.05 * span).all()
    assert (err.abs().amax(-1) <= 0.2 * span).all()


def test_q4_k_gaussian_error_is_what_4_bits_give():
    x = torch.from_numpy(_rng(5).standard_normal((128, 1024)).astype(np.float32))
    err = _round_trip(x, Q4_K) - x
    assert err.square().mean().sqrt() <= 0.075 * x.square().mean().sqrt()  # measured 0.072, llama.cpp 0.0716
    span = x.view(-1, 32).amax(-1) - x.view(-1, 32).amin(-1)
    assert (err.view(-1, 32).abs().amax(-1) <= 0.1 * span).all()


def test_q4_k_sub_blocks_of_unequal_scale_are_bounded_by_the_super_block():
    """Sub-blocks 100x smaller than their neighbours share the 6-bit scale grid, so their error is bounded
    relative to the super-block, as in llama.cpp."""
    rng = _rng(6)
    x = rng.standard_normal((32, 8, 32)) * 10.0 ** rng.uniform(-1, 1, (32, 8, 1))
    x = torch.from_numpy(x.astype(np.float32).reshape(32, 256))
    err = (_round_trip(x, Q4_K) - x).abs()
    span = x.amax(-1) - x.amin(-1)
    assert (err.amax(-1) <= 0.1 * span).all()


def test_q4_k_gguf_dequantizer_reads_our_layout():
    """gguf's independent Q4_K decoder agrees with ours and recovers the data: the packing is llama.cpp's."""
    x = torch.from_numpy(_rng(7).standard_normal((32, 512)).astype(np.float32) * 0.02)
    raw = quantize(x, Q4_K)
    assert raw.dtype == torch.uint8 and raw.shape == (32, 512 // 256 * 144)
    theirs = quants.dequantize(raw.numpy(), Q4_K).reshape(32, 512)
    np.testing.assert_array_equal(theirs, dequantize(raw, Q4_K, (32, 512)).numpy())
    assert np.sqrt(((theirs - x.numpy()) ** 2).mean()) <= 0.075 * x.square().mean().sqrt().item()


def test_q4_k_largest_scale_and_min_code_to_63():
    """ggml codes each super-block's scales and mins as 6-bit fractions of the largest, so the largest is 63;
    decoding with gguf's get_scale_min checks the high-bit packing of sub-blocks 4..7 too."""
    x = torch.from_numpy(_rng(8).standard_normal((64, 256)).astype(np.float32))
    x[:, 128:160] *= 4  # sub-block 4 holds each super-block's largest scale and min (its high bits are packed)
    blocks = quantize(x, Q4_K).numpy()
    sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])
    assert (sc.max(-1) == 63).all() and (mn.max(-1) == 63).all()
    assert (sc.argmax(-1) == 4).all() and (mn.argmax(-1) == 4).all()


def test_q4_k_zero_and_constant_blocks():
    x = torch.zeros(6, 256)
    x[1] = 0.75  # constant positive: min offset 0, q = 15
    x[2] = -0.3  # constant negative: scale 0, the offset carries it
    x[3] = torch.linspace(-2, 2, 256)
    x[3, 64:96] = 0.0  # an all-zero sub-block inside a busy super-block
    x[4] = torch.arange(8).repeat_interleave(32) - 3.5  # a different constant per sub-block
    y = _round_trip(x, Q4_K)
    assert torch.equal(y[0], torch.zeros(256)) and torch.equal(y[5], torch.zeros(256))
    assert torch.equal(y[3, 64:96], torch.zeros(32))
    assert ((y[1:3] - x[1:3]).abs() <= 1e-3 * x[1:3].abs()).all()  # only the fp16 rounding of d or dmin
    assert (y[3] - x[3]).abs().max() <= 4 / 15
    assert (y[4] - x[4]).abs().max() <= 0.05 * 3.5


@pytest.mark.parametrize("sign", [1, -1])
def test_q4_k_nearly_constant_sub_blocks(sign):
    """Sub-blocks whose q come out all equal make the least-squares determinant pure rounding noise; such
    fits must not win (they did, up to 0.013 max|x|). What is left is the 6-bit coding of the scale or
    offset: half a step of 1/63 of the super-block's largest, plus fp16 rounding of d."""
    rng = _rng(0)
    c = sign * rng.uniform(0.01, 10, (4096, 8, 1))
    x = c * (1 + 1e-6 * rng.standard_normal((4096, 8, 32)))
    x = torch.from_numpy(x.astype(np.float32).reshape(-1, 256))
    err = (_round_trip(x, Q4_K) - x).abs().amax(-1)
    assert (err <= (0.5 / 63 + 1e-3) * x.abs().amax(-1)).all()


def test_q4_k_half_inputs_quantize_their_float32_values():
    x = torch.randn(16, 512).to(torch.bfloat16)
    assert torch.equal(quantize(x, Q4_K), quantize(x.float(), Q4_K))


# llama.cpp's algorithm (quantize_row_q4_K_ref with make_qkx2_quants(15, rmin=-1, rdelta=0.1, nstep=20)),
# re-derived in plain numpy, one sub-block at a time: the yardstick for the vectorised fit's accuracy.
def _llama_fit(x: np.ndarray) -> tuple[float, float]:
    w = np.sqrt((x * x).mean()) + np.abs(x)
    lo, hi = min(x.min(), 0.0), x.max()
    if hi == lo:
        return 0.0, -lo
    q = np.clip(np.rint(15 / (hi - lo) * (x - lo)), 0, 15)
    best = ((w * ((hi - lo) / 15 * q + lo - x) ** 2).sum(), (hi - lo) / 15, lo)
    for i in range(21):
        q = np.clip(np.rint((14 + 0.1 * i) / (hi - lo) * (x - lo)), 0, 15)
        sw, sl, sl2, sx, sxl = w.sum(), (w * q).sum(), (w * q * q).sum(), (w * x).sum(), (w * q * x).sum()
        det = sw * sl2 - sl * sl
        if det <= 0:
            continue
        scale, mn = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        if mn > 0:
            scale, mn = sxl / sl2, 0.0
        best = min(best, ((w * (scale * q + mn - x) ** 2).sum(), scale, mn))
    return best[1], -best[2]


def _llama_q4_k_round_trip(block: np.ndarray) -> np.ndarray:
    x = block.reshape(8, 32)
    sc, mn = np.array([_llama_fit(s) for s in x], dtype=np.float32).T
    ls = np.minimum(np.rint(sc * (63 / sc.max() if sc.max() > 0 else 0)), 63)
    lm = np.minimum(np.rint(mn * (63 / mn.max() if mn.max() > 0 else 0)), 63)
    d, dmin = np.float32(np.float16(sc.max() / 63)), np.float32(np.float16(mn.max() / 63))
    eff_d, eff_m = (d * ls)[:, None], (dmin * lm)[:, None]
    q = np.where(eff_d > 0, np.clip(np.rint((x + eff_m) / np.where(eff_d > 0, eff_d, 1)), 0, 15), 0)
    return (eff_d * q - eff_m).reshape(-1)


@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_q4_k_as_accurate_as_llama_cpp_algorithm(dist):
    rng = _rng(9)
    x = (rng.standard_normal((8, 1024)) if dist == "normal" else rng.standard_t(3, (8, 1024))).astype(np.float32)
    ref = np.concatenate([_llama_q4_k_round_trip(b) for b in x.reshape(-1, 256)]).reshape(x.shape)
    ours = _round_trip(torch.from_numpy(x), Q4_K).numpy()
    ours_rms, ref_rms = (np.sqrt(((y - x) ** 2).mean()) for y in (ours, ref))
    assert ours_rms <= 1.02 * ref_rms  # measured 1.002-1.004


@pytest.mark.parametrize("qtype,k", [(Q8_0, 48), (Q4_K, 128), (Q4_K, 288), (Q8_0, 0)])
def test_row_length_not_a_block_multiple(qtype, k):
    with pytest.raises(ValueError, match=rf"k={k} is not a multiple of the {qtype.name} block size"):
        quantize(torch.zeros(2, k), qtype)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F16])
def test_unsupported_type(qtype):
    with pytest.raises(ValueError, match=f"cannot quantize to {qtype.name}"):
        quantize(torch.zeros(2, 256), qtype)


def test_unknown_type_and_bad_shape():
    with pytest.raises(ValueError, match="unknown GGML type 999"):
        quantize(torch.zeros(2, 256), 999)
    with pytest.raises(ValueError, match="must be 2-D"):
        quantize(torch.zeros(256), Q8_0)
