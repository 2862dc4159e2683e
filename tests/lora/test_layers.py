"""LoRALinear: the batched apply equals a per-token reference (base + x A_j^T B_j^T on each shard's rows) for
any mix of slots, ranks, shard layouts and routes (grouped / per slot, contiguous / scattered rows)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.lora.adapter import LoRAModuleWeights
from tokenmill.lora.layers import LoRABatch, LoRALinear, Shard


def _layer(shard_sizes: list[int], fan_in: int, max_loras: int, max_rank: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shards, off = [], 0
    for j, size in enumerate(shard_sizes):
        shards.append(Shard(f"t{j}", off, size))
        off += size
    base = torch.nn.Linear(fan_in, off, bias=True)
    batch = LoRABatch()
    layer = LoRALinear(base.forward, shards, fan_in, off, max_loras, max_rank, batch, torch.float32, torch.device("cpu"))
    return layer, base, batch, gen


def _reference(base, shards, adapters, seq_slots, seq_tokens, x):
    """Token by token: base(x_t) plus, for the token's adapter, each targeted shard's x_t A^T B^T."""
    out = base(x).clone()
    t = 0
    for slot, n in zip(seq_slots, seq_tokens):
        for row in range(t, t + n):
            for shard in shards:
                m = adapters[slot].get(shard.target) if slot >= 0 else None
                if m is not None:
                    out[row, shard.offset : shard.offset + shard.size] += x[row] @ m.a.t() @ m.b.t()
        t += n
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_apply_matches_per_token_reference(data):
    shard_sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    fan_in = data.draw(st.integers(1, 10))
    max_loras = data.draw(st.integers(1, 4))
    max_rank = data.draw(st.integers(1, 6))
    layer, base, batch, gen = _layer(shard_sizes, fan_in, max_loras, max_rank, data.draw(st.integers(0, 99)))
    adapters = []
    for slot in range(max_loras):
        mods = {}
        for shard in layer.shards:
            if data.draw(st.booleans()):  # an adapter need not target every shard
                r = data.draw(st.integers(1, max_rank))
                mods[shard.target] = LoRAModuleWeights(0, shard.target, torch.randn(r, fan_in, generator=gen),
                                                       torch.randn(shard.size, r, generator=gen))
        layer.set_slot(slot, mods)
        adapters.append(mods)
    seq_slots = data.draw(st.lists(st.integers(-1, max_loras - 1), min_size=1, max_size=8))
    seq_tokens = data.draw(st.lists(st.integers(1, 5), min_size=len(seq_slots), max_size=len(seq_slots)))
    x = torch.randn(sum(seq_tokens), fan_in, generator=gen)
    want = _reference(base, layer.shards, adapters, seq_slots, seq_tokens, x)
    with torch.no_grad():
        batch.set(seq_slots, seq_tokens, x.device)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
        batch.group = None  # the per-slot route gives the same result
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_routes_chosen_per_step():
    _, _, batch, _ = _layer([4, 4], 3, 4, 2, 0)
    batch.set([2, 2, -1], [3, 1, 2], torch.device("cpu"))  # one adapter, contiguous rows: a slice, no group
    assert batch.group is None and batch.segments == [(2, slice(0, 4))]
    batch.set([0, 1, 0, 1], [1, 1, 1, 1], torch.device("cpu"))  # balanced decodes: grouped, no padding
    lo, hi, per_slot, gather, valid = batch.group
    assert (lo, hi, per_slot, gather.tolist(), valid) == (0, 2, 2, [0, 2, 1, 3], None)
    batch.set([1, 3, 1, -1], [1, 1, 1, 1], torch.device("cpu"))  # slot 2 idle, 3 has one token: padded
    lo, hi, per_slot, gather, valid = batch.group
    assert (lo, hi, per_slot, gather.tolist(), valid.flatten().tolist()) == (1, 4, 2, [0, 2, 0, 0, 1, 0],
                                                                            [1, 1, 0, 0, 1, 0])
    batch.set([0, 3, -1], [20, 1, 1], torch.device("cpu"))  # a prefill beside a decode: padding would waste
    assert batch.group is None and [s for s, _ in batch.segments] == [0, 3]


def test_base_only_step_returns_base_output_untouched():
    layer, base, batch, _ = _layer([5], 4, 2, 2, 1)
    layer.set_slot(0, {"t0": LoRAModuleWeights(0, "t0", torch.ones(2, 4), torch.ones(5, 2))})
    batch.set([-1, -1], [2, 3], torch.device("cpu"))
    assert not batch.active
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_token_count_mismatch_is_an_error():
    layer, _, batch, _ = _layer([5], 4, 2, 2, 1)
    batch.set([0], [3], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="routes 3 tokens but the layer got 2"):
        layer(torch.randn(2, 4))


def test_set_slot_overwrites_previous_adapter():
    layer, base, batch, _ = _layer([3, 3], 2, 1, 4, 2)
    layer.set_slot(0, {"t0": LoRAModuleWeights(0, "t0", torch.ones(4, 2), torch.ones(3, 4)),
                       "t1": LoRAModuleWeights(0, "t1", torch.ones(4, 2), torch.ones(3, 4))})
    layer.set_slot(0, {"t1": LoRAModuleWeights(0, "t1", torch.ones(1, 2), torch.ones(3, 1))})  # rank 1, t1 only
    batch.set([0], [1], torch.device("cpu"))
    x = torch.ones(1, 2)
    with torch.no_grad():
        delta = layer(x) - base(x)
    torch.testing.assert_close(delta, torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0]]))


def test_bf16_base_output_gets_the_float32_delta():
    """bf16 models: the stacks stay float32 (CPU bf16 matmuls are emulated), the delta is rounded once."""
    base = torch.nn.Linear(8, 6, bias=False).to(torch.bfloat16)
    batch = LoRABatch()
    layer = LoRALinear(base.forward, [Shard("t", 0, 6)], 8, 6, 2, 4, batch, torch.float32, torch.device("cpu"))
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    layer.set_slot(1, {"t": LoRAModuleWeights(0, "t", a, b)})
    x = torch.randn(3, 8).to(torch.bfloat16)
    for slots, tokens in (([1], [3]), ([1, 0, 1], [1, 1, 1])):  # a slice, then the grouped route
        batch.set(slots, tokens, x.device)
        with torch.no_grad():
            got = layer(x)
        want = base(x).float() + (x.float() @ a.t() @ b.t()) * torch.tensor([[s == 1] for s in slots]).float()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
