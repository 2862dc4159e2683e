"""KV cache sizing: block counts per group from the scheduler's limits and the memory allowed (no torch)."""

import pytest

from tokenmill.executor.kv_sizing import (
    KVGroupSize,
    cpu_auto_limit_bytes,
    plan_kv_cache,
    window_blocks,
)

GIB = 1 << 30
# Gemma 3 270M in float32: 15 sliding-window layers (512 tokens) and 3 full-attention layers, one KV head of 256.
GEMMA_270M = [KVGroupSize(512, 15 * 2 * 256 * 4), KVGroupSize(None, 3 * 2 * 256 * 4)]
LIMITS = {"block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048}


def _plan(groups=GEMMA_270M, max_model_len=32768, gib=None, auto=1.25 * GIB, given=False, **kw):
    return plan_kv_cache(groups, **{**LIMITS, **kw}, max_model_len=max_model_len, kv_cache_memory_gib=gib,
                         auto_limit_bytes=auto, max_model_len_given=given)


def test_default_model_auto_size_holds_its_context_and_every_window():
    plan = _plan()
    window, full = plan.num_blocks
    assert window == window_blocks(512, 16, 64, 2048) + 1 == 64 * 33 + 128 + 2
    assert plan.capacity_tokens == (full - 1) * 16 >= 32768
    assert plan.max_model_len == 32768 and not plan.lowered
    assert plan.num_bytes <= 1.25 * GIB
    # one more full block would not fit the limit
    assert plan.num_bytes + 16 * GEMMA_270M[1].bytes_per_token > 1.25 * GIB


def test_issue_case_half_a_gib_lowers_the_models_limit_or_names_both_flags():
    plan = _plan(gib=0.5)
    window, full = plan.num_blocks
    assert window == full  # below the window cap the window group matches the full group block for block
    assert plan.num_bytes <= 0.5 * GIB < plan.num_bytes + 16 * (GEMMA_270M[0].bytes_per_token + GEMMA_270M[1].bytes_per_token)
    assert plan.lowered and plan.max_model_len == plan.capacity_tokens == (full - 1) * 16
    assert 1500 < plan.capacity_tokens < 32768
    with pytest.raises(ValueError, match=r"max_model_len=32768.*--max-model-len to at most \d+.*--kv-cache-memory"):
        _plan(gib=0.5, given=True)
    assert not _plan(gib=0.5, given=True, max_model_len=4096).lowered


def test_auto_size_is_what_the_sequences_can_use_when_that_is_less():
    plan = _plan(max_model_len=100, max_num_seqs=2)
    window, full = plan.num_blocks
    assert full - 1 == 2 * 7  # two sequences of ceil(100 / 16) blocks
    assert window == full  # two windows + a chunk would be more than the full group ever holds
    assert plan.num_bytes == sum(n * 16 * g.bytes_per_token for n, g in zip(plan.num_blocks, GEMMA_270M))


def test_explicit_memory_is_used_whole_even_past_the_demand():
    plan = _plan(max_model_len=100, max_num_seqs=2, gib=0.25)
    window, _full = plan.num_blocks
    assert window == window_blocks(512, 16, 2, 2048) + 1  # the window group stops at its cap
    assert plan.num_bytes <= 0.25 * GIB < plan.num_bytes + 16 * GEMMA_270M[1].bytes_per_token


def test_only_sliding_groups_get_their_cap_and_need_one_window():
    groups = [KVGroupSize(64, 1024)]
    plan = _plan(groups, max_model_len=4096, max_num_seqs=4, max_num_batched_tokens=64)
    assert plan.num_blocks == [window_blocks(64, 16, 4, 64) + 1] and not plan.lowered
    assert plan.max_model_len == 4096  # no full group: any length runs through its window
    with pytest.raises(ValueError, match="less than one sliding window.*--kv-cache-memory"):
        _plan(groups, max_model_len=4096, gib=4 * 16 * 1024 / GIB)


def test_bad_memory_values_name_the_field():
    with pytest.raises(ValueError, match="kv_cache_memory=0: must be > 0 GiB"):
        _plan(gib=0)
    with pytest.raises(ValueError, match="holds no KV block.*--kv-cache-memory"):
        _plan(gib=1e-6)


def test_cpu_auto_limit_is_the_cap_or_a_quarter_of_available_memory():
    assert cpu_auto_limit_bytes(64 * GIB) == 1.25 * GIB
    assert cpu_auto_limit_bytes(2 * GIB) == 0.5 * GIB
