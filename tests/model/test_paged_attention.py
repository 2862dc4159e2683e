"""Fast paged attention vs the plain-PyTorch reference on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.kernels.metadata import MAX_DECODE_QUERIES, AttentionMetadata
from tokenmill.kernels.paged_attention import paged_attention
from tokenmill.kernels.reference import paged_attention_reference, write_kv


def _case(block_size: int, window: int | None, seqs: list[tuple[int, int]], heads=4, kv_heads=2, dim=8, seed=0):
    """seqs: (start_pos, num_query_tokens). Earlier context is filled with random K/V first."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    total_blocks = sum(math.ceil((p + n) / block_size) for p, n in seqs) + 2
    free = list(range(1, total_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(total_blocks, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(total_blocks, block_size, kv_heads, dim, generator=g)
    tables = []
    for p, n in seqs:
        table = [free.pop() for _ in range(math.ceil((p + n) / block_size))]
        if window is not None:
            # A sliding-window group may have released blocks wholly outside every query's window.
            first_needed = max(0, p - window + 1) // block_size
            table = [0 if i < first_needed else b for i, b in enumerate(table)]
        tables.append(table)
    meta = AttentionMetadata.build([n for _, n in seqs], [p for p, _ in seqs], tables, block_size, window)
    t = sum(n for _, n in seqs)
    q = torch.randn(t, heads, dim, generator=g)
    k = torch.randn(t, kv_heads, dim, generator=g)
    v = torch.randn(t, kv_heads, dim, generator=g)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return q, k, v, k_cache, v_cache, meta


MIXES = [
    [(0, 1)],  # a one-token prompt
    [(0, 9), (12, 1), (3, 1), (5, 7)],  # fresh prefill, decodes, a later chunk
    [(20, 1), (7, 1), (33, 1)],  # decodes only
    [(0, 30), (40, 6)],  # prefills only, one with earlier context
    [(0, 6), (4, 1), (0, 6), (0, 6), (0, 5), (0, 5)],  # equal-length fresh prefills, split and adjacent
]


# Several query tokens per sequence after earlier context (speculative verification: 1 + k tokens) beside the
# other kinds; these join the decode batch up to MAX_DECODE_QUERIES queries.
MQ_MIXES = [
    [(30, 5), (9, 2), (17, 1), (0, 4), (40, 20)],  # verification beside plain decodes, a prompt, a long later chunk
    [(15, 9), (16, 3), (31, 16), (1, 2), (2, 17)],  # block boundaries, the 16-query bound and one past it
    [(50, 4), (60, 8), (3, 5)],  # verification only (no scatter); window 4 is shorter than a chunk
]

# Random steps for the property tests: (start_pos, queries) per sequence.
SEQS = st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=6)
PROPS = settings(max_examples=30, derandomize=True, deadline=None, database=None)


@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("window", [None, 4, 11])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_fast_matches_reference(block_size, window, mix):
    q, k, v, kc, vc, meta = _case(block_size, window, MIXES[mix], seed=mix)
    scale = 8**-0.5
    want = paged_attention_reference(q, kc, vc, meta, scale, window)
    got = paged_attention(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("window", [None, 4, 11])
@pytest.mark.parametrize("mix", range(len(MQ_MIXES)))
@pytest.mark.parametrize("heads", [(4, 2, 8), (4, 1, 32)])
def test_fast_multi_query_matches_reference(block_size, window, mix, heads):
    """The PyTorch path (no native kernels, as on CUDA): padded multi-query decodes with a per-query mask."""
    q, k, v, kc, vc, meta = _case(block_size, window, MQ_MIXES[mix], heads=heads[0], kv_heads=heads[1], dim=heads[2],
                                  seed=mix)
    scale = heads[2] ** -0.5
    want = paged_attention_reference(q, kc, vc, meta, scale, window)
    torch.testing.assert_close(paged_attention(q, k, v, kc, vc, meta, scale), want, atol=1e-5, rtol=1e-5)


@given(seqs=SEQS, block_size=st.sampled_from([1, 3, 16]), window=st.sampled_from([None, 1, 2, 5, 16]),
       heads=st.sampled_from([(4, 2, 8), (2, 1, 16), (3, 3, 8)]), seed=st.integers(0, 2**16))
@PROPS
def test_fast_matches_reference_on_random_steps(seqs, block_size, window, heads, seed):
    q, k, v, kc, vc, meta = _case(block_size, window, seqs, heads=heads[0], kv_heads=heads[1], dim=heads[2], seed=seed)
    want = paged_attention_reference(q, kc, vc, meta, 0.3, window)
    torch.testing.assert_close(paged_attention(q, k, v, kc, vc, meta, 0.3), want, atol=1e-5, rtol=1e-5)


def test_plan_puts_short_later_chunks_in_the_decode_batch():
    """Chunks of 2..16 queries after earlier context are decode rows; a prompt start or a 17th query is not."""
    seqs = [(7, 1), (30, 5), (0, 4), (12, 16), (12, 17), (0, 1), (3, 2)]
    meta = AttentionMetadata.build([n for _, n in seqs], [p for p, _ in seqs], [[1, 2, 3]] * len(seqs), 16, None)
    plan = meta.plan(torch.float32)
    qsl = meta.query_start_loc
    rows = [qsl[0], *range(qsl[1], qsl[2]), *range(qsl[3], qsl[4]), qsl[5], *range(qsl[6], qsl[7])]
    assert plan.decode_token_idx.tolist() == rows
    assert plan.decode_q_start.tolist() == [0, 1, 6, 22, 23, 25]
    assert plan.decode_ctx.tolist() == [8, *range(31, 36), *range(13, 29), 1, 4, 5]
    assert [p.q_lo for p in plan.prefills] == [qsl[4]]
    assert [g[2] for g in plan.fresh_groups] == [4]
    assert not plan.decode_is_all
    assert MAX_DECODE_QUERIES == 16
    # one query per sequence: the plain decode layout, no per-sequence row offsets
    plain = AttentionMetadata.build([1, 1], [5, 9], [[1], [2]], 16, 4).plan(torch.float32)
    assert plain.decode_q_start is None and plain.decode_is_all
    assert plain.decode_lo.tolist() == [2, 6] and plain.decode_ctx.tolist() == [6, 10]


def test_plan_gives_each_verification_query_its_own_window():
    meta = AttentionMetadata.build([3], [10], [[1, 2, 3, 4]], 4, 5)
    plan = meta.plan(torch.float32)
    assert plan.decode_is_all and plan.decode_q_start.tolist() == [0, 3]
    assert plan.decode_lo.tolist() == [6, 7, 8] and plan.decode_ctx.tolist() == [11, 12, 13]
    assert plan.decode_first_pos.tolist() == [4]  # block 0 (positions 0..3) is outside every window
    visible = (plan.mask()[0, 0] == 0).nonzero().tolist()  # [query, key slot from position 4]
    assert visible == [[j, p - 4] for j in range(3) for p in range(6 + j, 11 + j)]


def test_reference_masks_the_future_and_the_window():
    """Hand check of the oracle: one head, values = position, uniform scores -> output is the mean position."""
    block_size, window = 4, 3
    meta = AttentionMetadata.build([6], [0], [[1, 2]], block_size, window)
    q = torch.zeros(6, 1, 1)
    k = torch.zeros(6, 1, 1)
    v = torch.arange(6, dtype=torch.float32).view(6, 1, 1)
    kc = torch.zeros(3, block_size, 1, 1)
    vc = torch.zeros(3, block_size, 1, 1)
    write_kv(kc, vc, k, v, meta.slot_mapping)
    out = paged_attention_reference(q, kc, vc, meta, 1.0, window).flatten().tolist()
    # position p sees max(0, p-2) .. p
    assert out == pytest.approx([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    full = paged_attention_reference(q, kc, vc, meta, 1.0, None).flatten().tolist()
    assert full == pytest.approx([p / 2 for p in range(6)])


def test_slot_mapping_follows_block_tables():
    meta = AttentionMetadata.build([3, 1], [2, 5], [[7, 3], [4, 9]], 4, None)
    # seq 0: positions 2,3 in block 7 and 4 in block 3; seq 1: position 5 in block 9
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 3 * 4 + 0, 9 * 4 + 1]
    assert meta.seq_lens == [5, 6]

