"""Native CPU kernels (kernels/csrc/*.cpp) against their plain-PyTorch oracles."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.model.test_paged_attention import MIXES, MQ_MIXES, PROPS, SEQS, _case
from tokenmill.kernels.cpu_features import host_cpu_features
from tokenmill.kernels.cpu_kernels import X86_VARIANTS, load_cpu_kernels, variants_for
from tokenmill.kernels.paged_attention import paged_attention
from tokenmill.kernels.reference import paged_attention_reference

# Every instruction-set variant this machine can execute (AVX-512, AVX2 and the x86-64 baseline on an AVX-512
# machine; AVX2 and baseline on an AVX2 one): the narrower paths are tested wherever the suite runs.
RUNNABLE = [v.name for v in variants_for(host_cpu_features())]
BF16_ULP = 2.0**-7  # relative spacing of bf16 values: one rounding step


@pytest.fixture(scope="module", params=RUNNABLE)
def cpu_kernels(request):
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the native CPU kernels cannot be built here")
    kernels = load_cpu_kernels(request.param)
    assert kernels is not None, f"a C++ compiler is present but the {request.param} kernels failed to build"
    assert kernels.variant == request.param
    return kernels


def test_build_key_covers_every_source_and_header():
    """The cached library is keyed by the bytes of _SOURCES + _HEADERS: a file left out would let an edit to it
    run a stale build."""
    from tokenmill.kernels import cpu_kernels

    csrc = cpu_kernels._SOURCES[0].parent
    assert {p.name for p in cpu_kernels._SOURCES} == {p.name for p in csrc.glob("*.cpp")}
    assert {p.name for p in cpu_kernels._HEADERS} == {p.name for p in csrc.glob("*.h")}


def test_default_variant_is_the_widest_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CPU_KERNELS", raising=False)
    assert load_cpu_kernels().variant == RUNNABLE[0]
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", RUNNABLE[-1])
    assert load_cpu_kernels().variant == RUNNABLE[-1]
    missing = [v.name for v in X86_VARIANTS if v.name not in RUNNABLE]
    for name in missing + ["avx9000"]:  # never loaded on a CPU without its instructions: a clear error instead
        with pytest.raises(ValueError, match="this CPU runs the variants"):
            load_cpu_kernels(name)


@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("window", [None, 4, 11])
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("heads", [(4, 2, 8), (4, 1, 32), (3, 3, 16), (6, 1, 40)])
def test_native_decode_matches_reference(cpu_kernels, block_size, window, mix, heads):
    """The native decode kernel inside the fast path (mixed batches: decodes go native, prefills to SDPA)."""
    num_heads, kv_heads, dim = heads
    q, k, v, kc, vc, meta = _case(block_size, window, MIXES[mix], heads=num_heads, kv_heads=kv_heads, dim=dim, seed=mix)
    scale = dim**-0.5
    want = paged_attention_reference(q, kc, vc, meta, scale, window)
    got = paged_attention(q, k, v, kc, vc, meta, scale, cpu_kernels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("heads", [(4, 1, 32), (6, 1, 40), (3, 3, 16)])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_native_decode_reads_a_bf16_cache(cpu_kernels, block_size, window, mix, heads, q_dtype):
    """bf16 K/V caches (float32 or bf16 queries): the same float32 math as the oracle on the widened cache."""
    num_heads, kv_heads, dim = heads
    q, k, v, kc, vc, meta = _case(block_size, window, MIXES[mix], heads=num_heads, kv_heads=kv_heads, dim=dim, seed=mix)
    q, k, v, kc, vc = q.to(q_dtype), k.to(q_dtype), v.to(q_dtype), kc.bfloat16(), vc.bfloat16()
    scale = dim**-0.5
    want = paged_attention_reference(q.float(), kc.float(), vc.float(), meta, scale, window)
    got = paged_attention(q, k, v, kc, vc, meta, scale, cpu_kernels)
    assert got.dtype == q_dtype
    if q_dtype == torch.float32 and not meta.plan(q.dtype).prefills and not meta.plan(q.dtype).fresh_groups:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # prefills attend to this step's fresh (unrounded) K/V, bf16 outputs round once
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=BF16_ULP)
    plan = meta.plan(q.dtype)
    if plan.decode_token_idx is not None:  # the decode rows alone: exact up to the output's own rounding
        idx = plan.decode_token_idx
        torch.testing.assert_close(got.float()[idx], want[idx].to(q_dtype).float(), atol=1e-5, rtol=BF16_ULP)


@pytest.mark.parametrize(("block_size", "window", "mix", "heads"), [
    *[(bs, w, mix, h) for bs in (16, 5) for w in (None, 4, 11) for mix in range(len(MQ_MIXES))
      for h in ((6, 1, 40), (4, 2, 8))],
    (16, None, 0, (4, 1, 256)), (16, 11, 2, (4, 1, 256)),  # Gemma 3 270M's shapes: global and sliding layers
])
def test_native_multi_query_decode_matches_reference(cpu_kernels, block_size, window, mix, heads):
    """Several queries per sequence (speculative verification) in the native kernel, beside plain decodes."""
    num_heads, kv_heads, dim = heads
    q, k, v, kc, vc, meta = _case(block_size, window, MQ_MIXES[mix], heads=num_heads, kv_heads=kv_heads, dim=dim,
                                  seed=mix)
    assert meta.plan(q.dtype).decode_q_start is not None
    want = paged_attention_reference(q, kc, vc, meta, dim**-0.5, window)
    torch.testing.assert_close(paged_attention(q, k, v, kc, vc, meta, dim**-0.5, cpu_kernels), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("mix", range(len(MQ_MIXES)))
def test_native_multi_query_decode_reads_a_bf16_cache(cpu_kernels, window, mix):
    q, k, v, kc, vc, meta = _case(16, window, MQ_MIXES[mix], heads=4, kv_heads=1, dim=32, seed=mix)
    q, k, v, kc, vc = q.bfloat16(), k.bfloat16(), v.bfloat16(), kc.bfloat16(), vc.bfloat16()
    want = paged_attention_reference(q.float(), kc.float(), vc.float(), meta, 32**-0.5, window)
    got = paged_attention(q, k, v, kc, vc, meta, 32**-0.5, cpu_kernels)
    idx = meta.plan(q.dtype).decode_token_idx  # decode rows read the same (bf16) cache as the oracle
    torch.testing.assert_close(got.float()[idx], want[idx].bfloat16().float(), atol=1e-5, rtol=BF16_ULP)


@given(seqs=SEQS, block_size=st.sampled_from([1, 3, 16]), window=st.sampled_from([None, 1, 2, 5, 16]),
       heads=st.sampled_from([(4, 2, 8), (4, 1, 24), (3, 3, 16)]), seed=st.integers(0, 2**16))
@settings(PROPS, max_examples=20)
def test_native_matches_reference_on_random_steps(cpu_kernels, seqs, block_size, window, heads, seed):
    q, k, v, kc, vc, meta = _case(block_size, window, seqs, heads=heads[0], kv_heads=heads[1], dim=heads[2], seed=seed)
    want = paged_attention_reference(q, kc, vc, meta, 0.3, window)
    torch.testing.assert_close(paged_attention(q, k, v, kc, vc, meta, 0.3, cpu_kernels), want, atol=1e-5, rtol=1e-5)


def test_native_decode_rejects_bad_inputs(cpu_kernels):
    q = torch.randn(2, 4, 8)
    kc = torch.randn(3, 4, 2, 8)
    blocks = torch.tensor([[1], [2]])
    pos = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="q must be a contiguous CPU torch.float32"):
        cpu_kernels.decode_attention(q.double(), kc, kc, blocks, pos, pos, pos + 1, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernels.decode_attention(torch.randn(2, 4, 16), kc, kc, blocks, pos, pos, pos + 1, 1.0)
    with pytest.raises(ValueError, match="blocks must be"):
        cpu_kernels.decode_attention(q, kc, kc, blocks[:1], pos, pos, pos + 1, 1.0)
    # several rows per sequence: q_start [B + 1] must rise from 0 to the number of rows
    rows = torch.randn(5, 4, 8)
    lo, ctx = torch.zeros(5, dtype=torch.long), torch.tensor([2, 3, 4, 3, 4])
    ok = cpu_kernels.decode_attention(rows, kc, kc, blocks, pos, lo, ctx, 1.0, torch.tensor([0, 3, 5]))
    assert ok.shape == rows.shape and torch.isfinite(ok).all()
    for bad in ([0, 3, 6], [1, 3, 5], [0, 6, 5]):
        with pytest.raises(ValueError, match="q_start must rise from 0 to 5"):
            cpu_kernels.decode_attention(rows, kc, kc, blocks, pos, lo, ctx, 1.0, torch.tensor(bad))
    with pytest.raises(ValueError, match="lo/ctx"):
        cpu_kernels.decode_attention(rows, kc, kc, blocks, pos, lo[:2], ctx, 1.0, torch.tensor([0, 3, 5]))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1000), (2, 262_145), (4, 512), (1, 513)])
def test_native_argmax_matches_torch(cpu_kernels, shape):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g)
    torch.testing.assert_close(cpu_kernels.argmax_rows(x), x.argmax(-1), rtol=0, atol=0)
    # strided rows (a row subset of a wider buffer) and a maximum at the very end
    wide = torch.randn(shape[0], shape[1] + 3, generator=g)
    wide[:, shape[1] - 1] = 50.0
    view = wide[:, : shape[1]]
    assert cpu_kernels.argmax_rows(view).tolist() == view.argmax(-1).tolist()


def test_native_argmax_ties_infinities_and_nans(cpu_kernels):
    x = torch.zeros(5, 3000)
    x[0, 1000] = x[0, 2000] = 1.0  # ties: the first index wins
    x[1] = float("-inf")  # all -inf: index 0
    x[2, 5] = float("inf")
    x[3, 700] = x[3, 1500] = float("nan")  # NaN counts as the maximum: the first NaN
    x[4, 2999] = float("inf")
    x[4, 10] = float("nan")
    assert cpu_kernels.argmax_rows(x).tolist() == x.argmax(-1).tolist() == [1000, 0, 5, 700, 10]
    with pytest.raises(ValueError, match="argmax_rows"):
        cpu_kernels.argmax_rows(x.double())


@pytest.mark.parametrize("shape", [(1, 8), (5, 640), (3, 4, 256), (7, 13)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_native_rms_norm_matches_the_torch_formula(cpu_kernels, shape, offset):
    from tokenmill.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(len(shape))
    norm = RMSNorm(shape[-1], 1e-6, weight_offset=offset, gemma_style=bool(offset))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.1)
    x = torch.randn(*shape, generator=g) * 3
    want = norm(x)
    norm.use_cpu_kernels(cpu_kernels)
    got = norm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    # a strided input (q of a fused qkv projection) gives the same result
    wide = torch.randn(*shape[:-1], shape[-1] * 2, generator=g)
    torch.testing.assert_close(norm(wide[..., : shape[-1]]), norm(wide[..., : shape[-1]].contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 8), (5, 640), (3, 4, 256), (7, 13), (2, 40)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_native_rms_norm_bf16_matches_torch_bf16(cpu_kernels, shape, offset):
    """bf16 in and out, float32 inside: Gemma's order (weight in float32) and Llama's (round, then weight)."""
    from tokenmill.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(len(shape) + int(offset))
    norm = RMSNorm(shape[-1], 1e-6, weight_offset=offset, gemma_style=bool(offset)).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.5)
    x = (torch.randn(*shape, generator=g) * 3).bfloat16()
    want = norm(x)
    norm.use_cpu_kernels(cpu_kernels)
    got = norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=BF16_ULP, atol=1e-6)  # at most one rounding step
    assert (got == want).float().mean() > 0.97  # and nearly always the very same bf16 value


@pytest.mark.parametrize("shape", [(1, 2), (4, 22), (64, 4096), (3, 2 * 1000)])
def test_native_gelu_tanh_and_mul_bf16_matches_torch_bf16(cpu_kernels, shape):
    from tokenmill.layers.activation import GeluTanhAndMul

    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=g) * 4).bfloat16()
    x[0, 0] = -30.0
    act = GeluTanhAndMul()
    want = act(x)
    act.use_cpu_kernels(cpu_kernels)
    got = act(x)
    assert got.dtype == torch.bfloat16 and not torch.isnan(got.float()).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * BF16_ULP, atol=1e-5)  # fp32: 1e-5 too
    # Bit for bit against the exact value rounded as torch's two bf16 ops round (gelu to bf16, then the product;
    # a product of two bf16 values is exact in float64). The exact gelu is x / (1 + exp(-2u)) in float64: torch's
    # GELU(tanh), float32 and float64 alike, loses its digits in the negative tail (1 + tanh(u) cancels).
    gate, up = x.double().chunk(2, dim=-1)
    u = (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)
    exact = ((gate / (1 + torch.exp(-2 * u))).bfloat16().double() * up).bfloat16()
    assert (got == exact).float().mean() > 0.995


def test_bf16_stores_round_to_nearest_even_like_torch(cpu_kernels):
    """The kernels' float32 -> bf16 store (csrc/wide_vector.h, vector and scalar tails) is torch's .to(bfloat16)
    bit for bit: ties to even, carries into the exponent, overflow to inf, subnormals, signed zero, NaN."""
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x3F808001,
                            0xBF808000, 0x00000001, 0x00008000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001,
                            0xFFFFFFFF, 0x3F800000], dtype=torch.int64).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([special, torch.randn(1000, generator=g) * 100, special[:5]])  # 5 left for the scalar tail
    got, want = cpu_kernels.to_bf16(x), x.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same]


@pytest.mark.parametrize("shape", [(1, 2), (4, 22), (64, 4096), (3, 2 * 1000)])
def test_native_gelu_tanh_and_mul_matches_torch(cpu_kernels, shape):
    from tokenmill.layers.activation import GeluTanhAndMul

    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * 4
    x[0, 0] = -30.0  # far tails: exp over/underflow must not produce NaN
    if shape[1] > 2:
        x[0, 1] = 30.0
    act = GeluTanhAndMul()
    want = act(x)
    act.use_cpu_kernels(cpu_kernels)
    got = act(x)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a wide-range sweep of the activation itself
    gate = torch.linspace(-12, 12, 4097)
    xs = torch.cat([gate, torch.ones_like(gate)])[None]
    torch.testing.assert_close(cpu_kernels.gelu_tanh_and_mul(xs)[0], torch.nn.functional.gelu(gate, approximate="tanh"),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 50, 7), (8, 48, 16), (9, 97, 33), (17, 1000, 64), (64, 4099, 640),
                                   (2, 5, 0)])
def test_native_panel_gemm_matches_matmul(cpu_kernels, m, n, k):
    """Every row-tile remainder (1..MR rows), partial panels and partial panel groups, K = 0."""
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=g)
    packed = cpu_kernels.pack_panels(w)
    for rows in range(1, m + 1):
        x = torch.randn(rows, k, generator=g)
        want = (x.double() @ w.double().t()).float()
        tol = 2e-6 * max(1, k) ** 0.5 * 4  # float32 rounding of a k-term sum of O(1) products
        torch.testing.assert_close(cpu_kernels.panel_gemm(x, packed), want, rtol=tol, atol=tol)


def test_native_panel_gemm_strides_out_buffer_and_errors(cpu_kernels):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 70, generator=g)
    w = wide[:, :30]  # rows strided: packing reads with the row stride
    packed = cpu_kernels.pack_panels(w)
    x = torch.randn(2, 5, 30, generator=g)
    want = x @ w.t()
    torch.testing.assert_close(cpu_kernels.panel_gemm(x, packed), want, rtol=1e-5, atol=1e-5)  # 3-D input
    xs = torch.randn(10, 64, generator=g)[:, 3:33]  # strided input rows
    torch.testing.assert_close(cpu_kernels.panel_gemm(xs, packed), xs @ w.t(), rtol=1e-5, atol=1e-5)
    buf = torch.full((10, 50), float("nan"))
    got = cpu_kernels.panel_gemm(xs, packed, out=buf[:, 5:45])  # written in place, neighbours untouched
    assert got.data_ptr() == buf[:, 5:45].data_ptr()
    torch.testing.assert_close(buf[:, 5:45], xs @ w.t(), rtol=1e-5, atol=1e-5)
    assert buf[:, :5].isnan().all() and buf[:, 45:].isnan().all()
    with pytest.raises(ValueError, match="x must be CPU float32"):
        cpu_kernels.panel_gemm(torch.randn(2, 31), packed)
    with pytest.raises(ValueError, match="out must be"):
        cpu_kernels.panel_gemm(torch.randn(2, 30), packed, out=torch.empty(3, 40))
    with pytest.raises(ValueError, match="pack_panels"):
        cpu_kernels.pack_panels(torch.randn(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_layouts_agree(cpu_kernels, tied):
    """The native panel layouts (float32, and bf16 weights with float32 logits), oneDNN packing (float32 without
    kernels; bf16 too where the CPU multiplies bf16 natively) and column-major (bf16 without either)."""
    from tokenmill.layers.lm_head import LMHead

    g = torch.Generator().manual_seed(int(tied))
    emb = torch.nn.Embedding(301, 24)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(301, 24, generator=g))
    hidden = torch.randn(5, 24, generator=g)
    want = hidden @ emb.weight.detach().t()
    for kernels, dtype in ((cpu_kernels, torch.float32), (None, torch.float32), (None, torch.bfloat16),
                           (cpu_kernels, torch.bfloat16)):
        shared = copy.deepcopy(emb).to(dtype)  # as model.to(dtype) converts the embedding a tied head reads
        head = LMHead(24, 301, shared if tied else None).to(dtype)
        if not tied:
            with torch.no_grad():
                head.weight.copy_(emb.weight)
        if kernels is not None:
            head.use_cpu_kernels(kernels)
        out = torch.empty(5, 301)
        got = head(hidden.to(dtype), out=out)
        assert got.dtype == torch.float32 and got.shape == (5, 301)
        tol = 1e-5 if dtype == torch.float32 else 0.15
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        native = kernels is not None and not (dtype == torch.bfloat16 and host_cpu_features().native_bf16)
        assert (got.data_ptr() == out.data_ptr()) == native  # only the native panel path writes `out`
        if not tied:
            assert head.weight.numel() == 0  # the untied head keeps only its repacked copy
        torch.testing.assert_close(head(hidden.to(dtype)), got)  # later calls reuse the chosen layout


def test_disabled_or_unbuildable_kernels_fall_back_to_pytorch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", "0")
    assert load_cpu_kernels() is None
    monkeypatch.delenv("TOKENMILL_CPU_KERNELS")
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")  # a "compiler" that always fails
    with caplog.at_level("WARNING"):
        assert load_cpu_kernels() is None
    assert "native CPU kernels unavailable" in caplog.text
    assert not list(tmp_path.glob("kernels/*/libtokenmill_cpu.so"))  # nothing half-built left to trust
