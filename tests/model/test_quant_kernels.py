"""Quantized-weight kernels (kernels/csrc/quant_gemm.cpp) against their PyTorch oracles, on every
instruction-set variant this machine runs, for every block type."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from gguf import GGMLQuantizationType as T

from tests.fixtures.quant_blocks import KERNEL_TYPE_NAMES, random_blocks
from tests.model.test_cpu_kernels import RUNNABLE
from tokenmill.kernels import quant_reference as ref
from tokenmill.kernels.cpu_kernels import load_cpu_kernels
from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.layers.quantized import QuantizedLinear


@pytest.fixture(scope="module", params=RUNNABLE)
def cpu_kernels(request):
    """The native kernels of each instruction-set variant this machine runs."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the native CPU kernels cannot be built here")
    kernels = load_cpu_kernels(request.param)
    assert kernels is not None and kernels.variant == request.param
    return kernels


# The block types, and Q8_0 / Q5_0 with rows interleaved by 8 (QuantizedTensor.interleave, csrc/quant_x8.h).
LAYOUTS = [*KERNEL_TYPE_NAMES, "Q8_0x8", "Q5_0x8"]


def _weight(qtype: str, rows: int, k: int, seed: int = 0) -> QuantizedTensor:
    """Random blocks; "Q8_0x8" / "Q5_0x8": interleaved, rows rounded up to whole groups of 8."""
    if qtype.endswith("x8"):
        return _weight(qtype[:-2], -(-rows // 8) * 8, k, seed).interleave()
    return QuantizedTensor.from_bytes(torch.from_numpy(random_blocks(qtype, rows, k, seed=seed)), T[qtype], (rows, k))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's (and so the kernels') thread count set to n for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _assert_product_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, weight: QuantizedTensor) -> None:
    """float32 rounding of the scale products and the accumulation: relative to sum |x| |w| per output."""
    bound = x.abs().double() @ ref.dequantize_weight(weight).abs().double().T
    err = (got.double() - want).abs()
    assert (err <= 1e-5 * bound + 1e-6).all(), f"max error {err.max().item()} (bound scale {bound.max().item()})"


def test_activation_quantization_matches_reference(cpu_kernels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=g) * torch.tensor([1.0, 1e-3, 100.0, 1.0, 1.0]).unsqueeze(1)
    x[3] = 0.0  # an all-zero row: scale 0, quants 0
    x[4, :32] = torch.arange(32) - 16.5  # amax 16.5: not a tie
    x[4, 32:64] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 26)  # scale 1: ties round to even
    acts = cpu_kernels.quant.quantize_activations(x)
    q, d, sums = ref.quantize_activations(x)
    assert torch.equal(acts.q, q) and torch.equal(acts.d, d)
    torch.testing.assert_close(acts.sums, sums, rtol=0, atol=0)
    assert acts.q[4, 32:38].tolist() == [127, 0, 2, 2, 0, -2]


@pytest.mark.parametrize("qtype", LAYOUTS)
def test_dequantize_rows_matches_reference(cpu_kernels, qtype):
    w = _weight(qtype, 37, 512)
    ids = torch.tensor([[0, 36], [5, 5]])
    got = cpu_kernels.quant.dequantize_rows(w, ids)
    want = ref.dequantize_weight(w)[ids]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def _int8(cpu_kernels, x: torch.Tensor, w: QuantizedTensor) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"))
    cpu_kernels.quant.linear(x, cpu_kernels.quant.plan([(0, w)]), out, int8=True)
    return out


@pytest.mark.parametrize("qtype", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_gemm_matches_reference(cpu_kernels, qtype, threads):
    """1-17 rows: up to 4 (32-weight types: 8) share each weight block in registers, more run 4 at a time over a
    buffered weight row (remainders 1-3). n = 37 splits unevenly over threads; k = 768 gives the K-quants an odd block count
    (the last block's accumulator set), k = 544 the 32-weight types."""
    k = 544 if "_0" in qtype else 768
    w = _weight(qtype, 37, k, seed=threads)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(threads))
    with _threads(threads):
        for rows in range(1, 18) if threads == 1 else (1, 3, 5, 9, 16, 17):  # (2 threads: slow on a busy machine)
            xr = x[:rows].contiguous()
            q, d, _ = ref.quantize_activations(xr)
            x_hat = (q.float().reshape(rows, -1, 32) * d.unsqueeze(-1)).reshape(rows, -1)
            _assert_product_close(_int8(cpu_kernels, xr, w), ref.gemm_int8(xr, w), x_hat, w)


@pytest.mark.parametrize("qtype", LAYOUTS)
def test_int8_row_result_does_not_depend_on_row_count(cpu_kernels, qtype):
    """Bit for bit: a row computed alone, with 3 or (32-weight types) 7 others (weights in registers) or with 16
    others (buffered weight rows, groups of 4) gives the same float32 output, so verifying speculative drafts in one step
    reproduces plain decode's logits exactly."""
    k = 544 if "_0" in qtype else 768  # odd block counts: the last block's accumulator set
    w = _weight(qtype, 29, k, seed=7)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(7)) * torch.logspace(-2, 2, 17).unsqueeze(1)
    together = _int8(cpu_kernels, x, w)
    for rows in (1, 4, 5, 8, 9):
        part = _int8(cpu_kernels, x[-rows:].contiguous(), w)
        assert torch.equal(part, together[-rows:]), f"{rows} rows"


@pytest.mark.parametrize("qtype", LAYOUTS)
def test_int8_result_does_not_depend_on_thread_count(cpu_kernels, qtype):
    """Bit for bit: threads split the output columns, and Q4_0 / Q5_0 run them two weight rows at a time, so a
    column that runs paired with its neighbour on one thread count runs alone on another (n = 29: 1 thread
    pairs columns 14 and 15, 2 threads split 0-14 | 15-28, 3 threads 0-9 | 10-19 | 20-28)."""
    k = 544 if "_0" in qtype else 768
    w = _weight(qtype, 29, k, seed=11)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(11)) * torch.logspace(-1, 1, 5).unsqueeze(1)
    outs = {}
    for threads in (1, 2, 3):
        with _threads(threads):
            outs[threads] = [_int8(cpu_kernels, x[:rows].contiguous(), w) for rows in (1, 2, 3, 4, 5)]
    for threads in (2, 3):
        for rows, (want, got) in zip((1, 2, 3, 4, 5), zip(outs[1], outs[threads])):
            assert torch.equal(got, want), f"{threads} threads, {rows} rows"


@pytest.mark.parametrize("qtype", ["Q6_K", "Q4_K", "Q8_0x8", "Q5_0"])
def test_panel_gemm_blocking_changes_no_result(cpu_kernels, qtype):
    """k = 2048, 300 rows: a thread dequantizes its column groups in several chunks and runs each over the rows
    in two blocks (quant_gemm.cpp: kChunkBytes; kBlockBytes is 252-256 rows at k = 2048), the last of each
    partial. Every output is still one k-ordered chain: equal, bit for bit, to the rows computed one at a time,
    on 1-3 threads."""
    m = 300
    w = _weight(qtype, 300, 2048, seed=5)
    x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(5))
    plan = cpu_kernels.quant.plan([(0, w)])
    single = torch.empty(m, w.shape[0])
    with _threads(1):
        for r in range(m):
            cpu_kernels.quant.linear(x[r : r + 1], plan, single[r : r + 1], int8=False)
    for threads in (1, 2, 3):
        out = torch.empty(m, w.shape[0])
        with _threads(threads):
            cpu_kernels.quant.linear(x, plan, out, int8=False)
        assert torch.equal(out, single), f"{threads} threads"
    _assert_product_close(single, ref.gemm_panels(x, w), x, w)


@pytest.mark.parametrize("qtype", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 7, 20])
def test_panel_gemm_matches_reference(cpu_kernels, qtype, rows):
    """n = 67 leaves a partial panel and a partial group; rows past a multiple of the row tile."""
    w = _weight(qtype, 67, 256, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    out = torch.empty(rows, w.shape[0])
    cpu_kernels.quant.linear(x, cpu_kernels.quant.plan([(0, w)]), out, int8=False)
    _assert_product_close(out, ref.gemm_panels(x, w), x, w)


def test_int8_error_is_the_activation_rounding(cpu_kernels):
    """Against the exact float product, the 8-bit activations cost at most half a quantization step per
    element: |err| <= sum_i |w_i| * scale_block(i) / 2 (plus float32 rounding)."""
    w = _weight("Q4_K", 64, 512)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    out = torch.empty(3, 64)
    cpu_kernels.quant.linear(x, cpu_kernels.quant.plan([(0, w)]), out, int8=True)
    exact = ref.gemm_panels(x, w)
    _, d, _ = ref.quantize_activations(x)
    half_step = (d.unsqueeze(-1).expand(3, 16, 32).reshape(3, 512) / 2).double()
    bound = half_step @ ref.dequantize_weight(w).abs().double().T
    assert ((out.double() - exact).abs() <= bound * 1.001 + 1e-5).all()
    assert (out.double() - exact).abs().max() > 0  # the path really quantized the activations


@pytest.mark.parametrize("rows", [3, 12, 20])
def test_quantized_linear_writes_mixed_parts_into_one_output(cpu_kernels, rows):
    """A fused layer whose shards differ in type (q/k Q5_0, v Q8_0 as in llama.cpp's mixes), bias, bf16 input;
    3 rows take the int8 kernel (weights in registers), 12 the int8 kernel over buffered weight rows, 20 the
    panels."""
    parts = [(0, _weight("Q5_0", 48, 256, 1)), (48, _weight("Q8_0", 16, 256, 2)), (64, _weight("Q6_K", 16, 256, 3))]
    bias = torch.randn(80)
    layer = QuantizedLinear(cpu_kernels.quant, parts, bias)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    dense = torch.cat([ref.dequantize_weight(qt) for _, qt in parts])
    want = x @ dense.T + bias
    got = layer(x)
    assert got.shape == (rows, 80) and got.dtype == torch.float32
    tol = 0.02 if rows <= layer.int8_max_rows else 1e-4  # 8-bit activations vs float32 ones
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)
    got_bf16 = layer(x.to(torch.bfloat16))
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16.float(), want, atol=0.03 * want.abs().max().item(), rtol=0)


def test_unknown_type_and_bad_shapes_are_refused(cpu_kernels):
    w = _weight("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="features"):
        cpu_kernels.quant.linear(torch.randn(2, 32), cpu_kernels.quant.plan([(0, w)]), torch.empty(2, 4), int8=False)
    bad = QuantizedTensor(w.blocks, T.Q2_K, (4, 64))
    with pytest.raises(ValueError, match="no kernel for Q2_K"):
        cpu_kernels.quant.plan([(0, bad)])
    with pytest.raises(IndexError):
        cpu_kernels.quant.dequantize_rows(w, torch.tensor([4]))


def test_interleaved_layout_round_trips_and_is_refused_where_it_does_not_apply():
    w = _weight("Q8_0", 24, 96, seed=3)
    packed = w.interleave()
    assert packed.interleaved and packed.blocks.shape == w.blocks.shape and packed.kernel_type == int(T.Q8_0) + 256
    assert torch.equal(packed.gguf_blocks(), w.blocks)
    assert not torch.equal(packed.blocks, w.blocks)
    group = packed.blocks.reshape(3, 3, 272)[1, 2]  # rows 8-15, block 2: 8 scales, then 4 weights per row per chunk
    for row in (8, 13):
        block = w.blocks[row].reshape(3, 34)[2]
        lane = row - 8
        assert torch.equal(group[2 * lane : 2 * lane + 2], block[:2])
        assert torch.equal(group[16:].reshape(8, 8, 4)[:, lane].reshape(32), block[2:])
    with pytest.raises(ValueError, match="interleaved"):
        packed.with_rows(packed.blocks[:8])
    assert not _weight("Q8_0", 20, 96).can_interleave() and not _weight("Q4_K", 16, 256).can_interleave()
    with pytest.raises(ValueError, match="needs Q8_0/Q5_0 with rows a multiple of 8"):
        packed.interleave()
    q5 = _weight("Q5_0", 16, 64, seed=4)
    assert torch.equal(q5.interleave().gguf_blocks(), q5.blocks)
