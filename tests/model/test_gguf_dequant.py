"""Our vectorised torch dequantization equals gguf's reference (gguf.quants.dequantize) bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from tokenmill.model.gguf_dequant import SUPPORTED_TYPES, dequantize

# Byte offsets of the fp16 scale fields in each block: random bytes there could be NaN/inf, so they get
# real fp16 values; every other byte (quants, packed 6-bit scales, high bits) stays uniformly random.
_F16_FIELDS = {
    GGMLQuantizationType.Q8_0: [0], GGMLQuantizationType.Q4_0: [0], GGMLQuantizationType.Q5_0: [0],
    GGMLQuantizationType.Q4_K: [0, 2], GGMLQuantizationType.Q5_K: [0, 2], GGMLQuantizationType.Q6_K: [208],
}
_PLAIN = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        raw[:, off : off + 2] = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_TYPES if t not in _PLAIN], ids=lambda t: t.name)
def test_block_types_match_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 300
    raw = _random_blocks(qtype, n_blocks, rng)
    ref = quants.dequantize(raw, qtype).reshape(-1)
    ours = dequantize(raw, qtype, (n_blocks * block_size,)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_chunked_path_matches_reference(monkeypatch):
    """Tensors bigger than one chunk are processed in pieces; the seams must not shift anything."""
    import tokenmill.model.gguf_dequant as dq

    monkeypatch.setattr(dq, "_CHUNK_BLOCKS", 7)
    qtype = GGMLQuantizationType.Q6_K
    raw = _random_blocks(qtype, 50, np.random.default_rng(1))
    np.testing.assert_array_equal(dequantize(raw, qtype, (50, 256)).numpy(), quants.dequantize(raw, qtype).reshape(50, 256))


@pytest.mark.parametrize("qtype", sorted(_PLAIN), ids=lambda t: t.name)
def test_plain_types_match_gguf_reference(qtype):
    x = np.random.default_rng(0).standard_normal((24, 64)).astype(np.float32)
    raw = quants.quantize(x, qtype).view(np.uint8).reshape(-1)
    ref = quants.dequantize(raw, qtype).reshape(24, 64)
    ours = dequantize(raw, qtype, (24, 64))
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_quantize_then_dequantize_is_close():
    """Q8_0 through gguf's quantizer and our dequantizer reproduces the data to 8-bit precision."""
    x = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    raw = quants.quantize(x, GGMLQuantizationType.Q8_0)
    back = dequantize(raw.reshape(-1), GGMLQuantizationType.Q8_0, (8, 128)).numpy()
    assert np.abs(back - x).max() <= np.abs(x).max() / 127


def test_unsupported_type_names_the_supported_ones():
    raw = np.zeros(GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][1], dtype=np.uint8)
    with pytest.raises(ValueError, match="Q2_K is not supported.*Q4_K"):
        dequantize(raw, GGMLQuantizationType.Q2_K, (256,))


def test_output_dtype():
    raw = np.zeros(GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][1], dtype=np.uint8)
    assert dequantize(raw, GGMLQuantizationType.Q8_0, (32,), dtype=torch.bfloat16).dtype == torch.bfloat16
