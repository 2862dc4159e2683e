"""Fast paged attention vs the plain-PyTorch reference on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tokenmill.kernels.metadata import AttentionMetadata
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


@pytest.mark.parametrize("block_size", [1, 16, 5])
@pytest.mark.parametrize("window", [None, 4, 11])
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_fast_matches_reference(block_size, window, mix):
    q, k, v, kc, vc, meta = _case(block_size, window, MIXES[mix], seed=mix)
    scale = 8**-0.5
    want = paged_attention_reference(q, kc, vc, meta, scale, window)
    got = paged_attention(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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

