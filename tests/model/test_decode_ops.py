"""The small native decode steps (kernels/csrc/decode_ops.cpp) against their PyTorch oracles, in every variant
this machine runs: q/k norm + RoPE in place on a fused projection output, and the K/V cache write."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_cpu_kernels import cpu_kernels  # noqa: F401 (the per-variant fixture)
from tokenmill.kernels.reference import write_kv
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding


def _norms(d: int, offset: float, seed: int) -> tuple[RMSNorm, RMSNorm]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        norm = RMSNorm(d, 1e-6, weight_offset=offset, gemma_style=offset != 0.0)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(d, generator=g) * 0.3)
        out.append(norm)
    return out[0], out[1]


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("heads", [(4, 1, 256), (2, 2, 8), (3, 1, 48)])
def test_qk_norm_rope_matches_pytorch(cpu_kernels, with_norm, rows, heads):  # noqa: F811
    hq, hk, d = heads
    torch.manual_seed(rows * 7 + d)
    qkv = torch.randn(rows, (hq + 2 * hk) * d) * 3
    positions = torch.randint(0, 500, (rows,))
    rotary = RotaryEmbedding(d, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    q_norm, k_norm = _norms(d, 1.0, seed=d) if with_norm else (None, None)
    want = rotary.rotate_qkv(positions, qkv.clone(), hq, hk, q_norm, k_norm)  # PyTorch: no kernels attached yet

    for norm in (q_norm, k_norm):
        if norm is not None:
            norm.use_cpu_kernels(cpu_kernels)
    rotary.use_cpu_kernels(cpu_kernels)
    x = qkv.clone()
    got = rotary.rotate_qkv(positions, x, hq, hk, q_norm, k_norm)
    assert got[0].data_ptr() == x.data_ptr()  # in place on the projection output
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x[:, (hq + hk) * d :], qkv[:, (hq + hk) * d :], atol=0, rtol=0)  # v untouched


def test_qk_norm_rope_refuses_bad_arguments(cpu_kernels):  # noqa: F811
    x, cs = torch.zeros(2, 3 * 8), torch.zeros(2, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match="x must be CPU float32"):
        cpu_kernels.decode_ops.qk_norm_rope(torch.zeros(2, 16), 2, 1, 8, w, w, 1e-6, cs, cs)
    with pytest.raises(ValueError, match="both be float32"):
        cpu_kernels.decode_ops.qk_norm_rope(x, 2, 1, 8, w, None, 1e-6, cs, cs)
    with pytest.raises(ValueError, match="cos must be contiguous"):
        cpu_kernels.decode_ops.qk_norm_rope(x, 2, 1, 8, w, w, 1e-6, torch.zeros(1, 8), cs)


@pytest.mark.parametrize(("src", "cache"), [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("rows", [1, 5])
def test_write_kv_matches_reference(cpu_kernels, src, cache, rows):  # noqa: F811
    torch.manual_seed(rows)
    hkv, d, blocks, bs = 2, 16, 6, 4
    fused = torch.randn(rows, 3 * hkv * d).to(src)  # k and v as strided views of a fused output, like the models
    k, v = fused[:, hkv * d : 2 * hkv * d].view(rows, hkv, d), fused[:, 2 * hkv * d :].view(rows, hkv, d)
    slots = torch.randperm(blocks * bs)[:rows]
    want_k, want_v = torch.zeros(blocks, bs, hkv, d, dtype=cache), torch.zeros(blocks, bs, hkv, d, dtype=cache)
    write_kv(want_k, want_v, k, v, slots)
    got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
    assert cpu_kernels.decode_ops.write_kv(got_k, got_v, k, v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_write_kv_declines_other_dtypes_and_refuses_bad_slots(cpu_kernels):  # noqa: F811
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k = torch.ones(1, 1, 8)
    assert not cpu_kernels.decode_ops.write_kv(kc.half(), vc.half(), k.half(), k.half(), torch.tensor([0]))
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_kernels.decode_ops.write_kv(kc, vc, k, k, torch.tensor([8]))
    assert not kc.any()  # nothing written
    with pytest.raises(ValueError, match="slots int64"):
        cpu_kernels.decode_ops.write_kv(kc, vc, k, k, torch.tensor([0, 1]))


@pytest.mark.parametrize("with_next", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 130])
def test_add_rms_norm_equals_the_pytorch_ops(cpu_kernels, with_next, rows):  # noqa: F811
    """Gemma's residual add of a normed sublayer output, fused with the next norm: the same float32 values."""
    torch.manual_seed(rows)
    x, y = torch.randn(rows, 640) * 4, torch.randn(rows, 640)
    norm, nxt = _norms(640, 1.0, seed=rows)
    want = norm.add_to(x, y, nxt if with_next else None)  # PyTorch ops: no kernels attached yet
    norm.use_cpu_kernels(cpu_kernels)
    nxt.use_cpu_kernels(cpu_kernels)
    want_native_norm = x + norm(y)  # the native RMSNorm alone, then torch's add
    got = norm.add_to(x, y, nxt if with_next else None)
    assert torch.equal(got[0], want_native_norm)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if with_next:
        assert torch.equal(got[1], nxt(got[0]))
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    else:
        assert got[1] is None
