"""How many KV blocks each cache group gets, from what the scheduler can use and the memory allowed. No torch.

A full-attention group holds every token of every running sequence, so `T` tokens of it serve at most `T`
tokens of context in total. A sliding-window group frees blocks that slid out of the window, so it never holds
more than the full groups do (its tables cover the same positions, less a released prefix) nor more than
`max_num_seqs` windows plus one step's prefill chunk. Sizing the sliding groups by that bound (not one window
per sequence) means a prefill chunk always fits once the window is released, and no memory is spent on blocks
that could never be used.

The budget: --kv-cache-memory (GiB) when given, used whole (as vLLM's VLLM_CPU_KVCACHE_SPACE); otherwise
what `max_num_seqs` sequences of `max_model_len` tokens can use, capped by `auto_limit_bytes` (the runner's
device-dependent limit; config.AUTO_KV_CACHE_MEMORY_GIB on CPU). When the cache cannot hold one sequence of
`max_model_len` tokens, a limit taken from the model is lowered to what fits (logged by the caller); a limit
the user gave is an error naming both flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import AUTO_KV_CACHE_MEMORY_FRACTION, AUTO_KV_CACHE_MEMORY_GIB

_GIB = 1 << 30


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class KVGroupSize:
    """One KV cache group as sizing sees it: its window (None: full attention) and the K+V bytes one token
    takes over all of the group's layers."""

    sliding_window: int | None
    bytes_per_token: int


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    num_blocks: list[int]  # per group, the null block 0 included
    num_bytes: int  # K and V tensors of every layer
    capacity_tokens: int  # tokens the full-attention groups hold (the sliding groups' when there are none)
    max_model_len: int  # lowered from the requested one when the cache holds fewer tokens
    lowered: bool  # max_model_len was lowered to fit


def cpu_auto_limit_bytes(available_bytes: int) -> float:
    """The cap on an auto-sized CPU cache. Its pages are committed as blocks are first written, and the pool
    hands out never-used blocks before evicting cached ones, so a busy server ends up holding all of it."""
    return min(AUTO_KV_CACHE_MEMORY_GIB * _GIB, AUTO_KV_CACHE_MEMORY_FRACTION * available_bytes)


def window_blocks(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Most blocks a sliding-window group is ever asked for: each running sequence holds the blocks covering
    its last `window` tokens plus a partly filled one, and one step's prefill chunks add their own blocks."""
    per_seq = _cdiv(window, block_size) + 1
    return max_num_seqs * per_seq + _cdiv(max_num_batched_tokens, block_size) + 1


def plan_kv_cache(groups: list[KVGroupSize], *, block_size: int, max_model_len: int, max_num_seqs: int,
                  max_num_batched_tokens: int, kv_cache_memory_gib: float | None, auto_limit_bytes: float,
                  max_model_len_given: bool) -> KVCachePlan:
    """Block counts per group. Raises ValueError naming the flag when the memory holds no block, or holds fewer
    tokens than a user-given max_model_len."""
    if block_size < 1:
        raise ValueError(f"invalid block_size={block_size}: must be >= 1")
    if not groups:
        raise ValueError("the model declares no KV cache groups")
    has_full = any(g.sliding_window is None for g in groups)
    caps = [None if g.sliding_window is None else
            window_blocks(g.sliding_window, block_size, max_num_seqs, max_num_batched_tokens) for g in groups]
    if kv_cache_memory_gib is not None:
        if kv_cache_memory_gib <= 0:
            raise ValueError(f"invalid kv_cache_memory={kv_cache_memory_gib}: must be > 0 GiB")
        budget = kv_cache_memory_gib * _GIB
    else:
        # Demand: every sequence at full length; without full-attention groups, every window at once.
        demand = max_num_seqs * _cdiv(max_model_len, block_size) if has_full else max(c for c in caps if c)
        budget = min(_bytes(groups, caps, demand, block_size, has_full), auto_limit_bytes)
    blocks = _most_blocks(groups, caps, budget, block_size, has_full)
    if blocks < 1:
        need = _bytes(groups, caps, 1, block_size, has_full) / _GIB
        raise ValueError(f"invalid kv_cache_memory={budget / _GIB:.4g} GiB: holds no KV block of this model; "
                         f"at least {need:.4g} GiB is needed (--kv-cache-memory)")
    if not has_full:  # one sequence must hold a window and the block being filled, or it never decodes
        least = max(_cdiv(g.sliding_window or 0, block_size) + 2 for g in groups)
        if blocks < least:
            need = _bytes(groups, caps, least, block_size, has_full) / _GIB
            raise ValueError(f"invalid kv_cache_memory={budget / _GIB:.4g} GiB: holds less than one sliding window; "
                             f"at least {need:.4g} GiB is needed (--kv-cache-memory)")
    num_blocks = [1 + (blocks if cap is None or not has_full else min(blocks, cap)) for cap in caps]
    capacity = blocks * block_size
    fitted = min(max_model_len, capacity) if has_full else max_model_len
    if fitted < max_model_len and max_model_len_given:
        per_seq = _bytes(groups, caps, _cdiv(max_model_len, block_size), block_size, has_full) / _GIB
        raise ValueError(
            f"invalid max_model_len={max_model_len}: the KV cache ({budget / _GIB:.3g} GiB) holds {capacity} tokens, "
            f"fewer than one sequence of max_model_len; lower --max-model-len to at most {capacity} or raise "
            f"--kv-cache-memory to at least {per_seq:.3g} GiB")
    num_bytes = sum(n * block_size * g.bytes_per_token for n, g in zip(num_blocks, groups))
    return KVCachePlan(num_blocks, num_bytes, capacity, fitted, fitted < max_model_len)


def _bytes(groups: list[KVGroupSize], caps: list[int | None], blocks: int, block_size: int, has_full: bool) -> int:
    """Bytes of the cache when the full groups get `blocks` blocks (the sliding groups at most their cap)."""
    total = 0
    for g, cap in zip(groups, caps):
        n = blocks if cap is None or not has_full else min(blocks, cap)
        total += (n + 1) * block_size * g.bytes_per_token  # + the null block
    return total


def _most_blocks(groups: list[KVGroupSize], caps: list[int | None], budget: float, block_size: int,
                 has_full: bool) -> int:
    """The largest block count whose cache fits `budget` bytes (0 when not even one block does)."""
    per_block_all = sum(block_size * g.bytes_per_token for g in groups)
    lo, hi = 0, int(budget // per_block_all) + 1
    if has_full:  # past the sliding caps only the full groups grow, so the answer may lie further out
        per_block_full = sum(block_size * g.bytes_per_token for g in groups if g.sliding_window is None)
        hi = int(budget // per_block_full) + 1
    while lo < hi:  # invariant: _bytes(lo) <= budget (or lo == 0), _bytes(hi) > budget
        mid = (lo + hi + 1) // 2
        if _bytes(groups, caps, mid, block_size, has_full) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
