"""Per-sequence block tables over one BlockPool per KV cache group; prefix-cache lookups; sliding windows.

Invariants:
- a sequence's table in group g covers ceil(tokens_with_kv / block_size) blocks; entries a sliding-window
  group has released (entirely older than the window) are NULL_BLOCK_ID;
- full blocks of computed tokens are registered in every group's pool under the same chain hash, so a
  hit length is valid when each group holds the blocks it needs for it;
- a hit never covers the whole sequence: the last token is always recomputed to get its logits.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tokenmill.engine.block_pool import (
    BlockHash,
    BlockPool,
    cache_extra_keys,
    hash_block,
)
from tokenmill.engine.outputs import NULL_BLOCK_ID, KVCacheGroupSpec
from tokenmill.engine.request import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, groups: Seq[KVCacheGroupSpec], num_blocks: Seq[int], block_size: int,
                 enable_caching: bool = True, deployment_salt: str | None = None) -> None:
        if len(groups) != len(num_blocks) or not groups:
            raise ValueError(f"need one block count per KV cache group: {len(groups)} groups, {len(num_blocks)} counts")
        if block_size < 1:
            raise ValueError(f"invalid block_size={block_size}: must be >= 1")
        self.groups = list(groups)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.deployment_salt = deployment_salt
        self.pools = [BlockPool(n, enable_caching) for n in num_blocks]
        self.tables: dict[str, list[list[int]]] = {}
        self._num_hashed: dict[str, int] = {}  # full blocks already registered in the pools
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- prefix cache -------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full: int) -> list[BlockHash]:
        """Chain hashes of the first num_full full blocks of the sequence's tokens (memoised on seq). The
        first block carries the salts, so sequences with different salts share no block."""
        hs = seq.block_hashes
        bs = self.block_size
        while len(hs) < num_full:
            i = len(hs)
            if hs:
                hs.append(hash_block(hs[-1], seq.token_slice(i * bs, (i + 1) * bs)))
            else:
                # a LoRA adapter changes every layer's K/V: its blocks are never shared with another's
                extra = cache_extra_keys(self.deployment_salt, seq.params.cache_salt,
                                         str(seq.lora_id) if seq.lora_id else None)
                hs.append(hash_block(None, seq.token_slice(0, bs), extra))
        return hs[:num_full]

    def _window_start(self, group: KVCacheGroupSpec, num_tokens: int) -> int:
        """First block a token at position num_tokens may still attend to (0 for full attention).
        Conservative by one token: blocks before position num_tokens - window are unneeded."""
        if group.sliding_window is None:
            return 0
        return max(0, num_tokens - group.sliding_window) // self.block_size

    def find_prefix_hit(self, seq: Sequence) -> tuple[int, list[list[int]]]:
        """Longest block-aligned cached prefix valid for ALL groups: (hit tokens, per-group tables)."""
        empty = [[] for _ in self.groups]
        if not self.enable_caching:
            return 0, empty
        max_k = (seq.num_tokens - 1) // self.block_size
        if max_k <= 0:
            return 0, empty
        hashes = self._hashes(seq, max_k)
        found: list[list[int | None]] = []
        upper = max_k
        for g, pool in zip(self.groups, self.pools):
            if g.sliding_window is None:
                ids: list[int | None] = []
                for h in hashes[:upper]:
                    b = pool.lookup(h)
                    if b is None:
                        break
                    ids.append(b)
                upper = min(upper, len(ids))
            else:
                ids = [pool.lookup(h) for h in hashes]
            found.append(ids)
        k = upper
        while k > 0:
            if all(None not in ids[self._window_start(g, k * self.block_size):k]
                   for g, ids in zip(self.groups, found) if g.sliding_window is not None):
                break
            k -= 1
        if k == 0:
            return 0, empty
        tables = []
        for g, ids in zip(self.groups, found):
            start = self._window_start(g, k * self.block_size)
            tables.append([NULL_BLOCK_ID] * start + [b for b in ids[start:k]])  # type: ignore[misc]
        return k * self.block_size, tables

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_computed: int, num_new: int,
                       hit_tables: list[list[int]] | None = None) -> bool:
        """Make the tables cover num_computed + num_new tokens. A new sequence passes its prefix hit.
        Returns False, changing nothing but window releases, when some group lacks free blocks."""
        tables = self.tables.get(seq.seq_id)
        is_new = tables is None
        if is_new:
            tables = hit_tables if hit_tables is not None else [[] for _ in self.groups]
        else:
            self._release_outside_window(tables, num_computed)
        total = num_computed + num_new
        num_hit_blocks = min(len(t) for t in tables) if is_new else 0
        need = []
        for g, pool, table in zip(self.groups, self.pools, tables):
            n = max(0, _cdiv(total, self.block_size) - len(table))
            revive = pool.num_needing_revival(table) if is_new else 0
            if n + revive > pool.num_free:
                return False
            need.append(n)
        for pool, table, n in zip(self.pools, tables, need):
            if is_new:
                pool.touch(table)
            if n:
                table.extend(pool.allocate(n))
        if is_new:
            self.tables[seq.seq_id] = tables
            self._num_hashed[seq.seq_id] = num_hit_blocks  # hit blocks are hashed already
        return True

    def window_fit(self, seq: Sequence, num_computed: int,
                   hit_tables: list[list[int]] | None = None) -> tuple[int, int]:
        """(now, emptied): how many tokens past num_computed every sliding-window group can give blocks for
        now, and once its pool holds nothing else. Counts the blocks allocate_slots releases first (slid out
        of the window, held by this sequence alone). Full-attention groups set no bound here: a chunk that
        fits a window group always fits them after preemption. Without window groups both are unbounded."""
        tables = self.tables.get(seq.seq_id)
        is_new = tables is None
        if is_new:
            tables = hit_tables if hit_tables is not None else [[] for _ in self.groups]
        now = emptied = 1 << 62
        bs = self.block_size
        for g, pool, table in zip(self.groups, self.pools, tables):
            if g.sliding_window is None:
                continue
            start = min(self._window_start(g, num_computed), len(table))
            if is_new:
                free = pool.num_free - pool.num_needing_revival(table)
            else:
                free = pool.num_free + sum(1 for b in table[:start] if b != NULL_BLOCK_ID and pool.ref_cnt[b] == 1)
            now = min(now, (len(table) + free) * bs - num_computed)
            emptied = min(emptied, (start + pool.num_usable) * bs - num_computed)
        return max(0, now), max(0, emptied)

    def _release_outside_window(self, tables: list[list[int]], num_computed: int) -> None:
        for g, pool, table in zip(self.groups, self.pools, tables):
            if g.sliding_window is None:
                continue
            end = min(self._window_start(g, num_computed), len(table))
            # released entries form a prefix; free oldest first so the oldest is evicted first
            for i in range(end):
                if table[i] != NULL_BLOCK_ID:
                    pool.free([table[i]])
                    table[i] = NULL_BLOCK_ID

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache of every group."""
        if not self.enable_caching:
            return
        tables = self.tables.get(seq.seq_id)
        if tables is None:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, min(len(t) for t in tables))
        start = self._num_hashed[seq.seq_id]
        if num_full <= start:
            return
        hashes = self._hashes(seq, num_full)
        for i in range(start, num_full):
            for pool, table in zip(self.pools, tables):
                if table[i] != NULL_BLOCK_ID:
                    pool.cache_block(table[i], hashes[i])
        self._num_hashed[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        tables = self.tables.pop(seq.seq_id, None)
        self._num_hashed.pop(seq.seq_id, None)
        if tables is None:
            return
        for pool, table in zip(self.pools, tables):
            pool.free(reversed(table))  # tail first: the tail is the least shareable, evict it first

    # ---- stats --------------------------------------------------------------------------------
    @property
    def num_blocks_total(self) -> int:
        return sum(p.num_usable for p in self.pools)

    @property
    def num_blocks_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    def stats(self) -> dict[str, float | int]:
        """The KV fields of SchedulerStats."""
        return {"kv_cache_usage": self.usage(), "prefix_cache_queries": self.prefix_queries,
                "prefix_cache_hits": self.prefix_hits, "num_blocks_total": self.num_blocks_total,
                "num_blocks_free": self.num_blocks_free}

    def never_fits_msg(self, seq: Sequence) -> str:
        return (f"sequence {seq.seq_id} needs KV cache for {seq.num_tokens} tokens, more than the cache holds "
                f"({self.capacity_tokens()} tokens); raise kv_cache_memory or lower max_model_len")

    def usage(self) -> float:
        return 1.0 - self.num_blocks_free / self.num_blocks_total

    def all_free(self) -> bool:
        return not self.tables and all(p.all_free() for p in self.pools)

    def capacity_tokens(self) -> int:
        """Tokens one sequence can hold: bounded by the full-attention groups' pools."""
        caps = [p.num_usable * self.block_size for g, p in zip(self.groups, self.pools) if g.sliding_window is None]
        return min(caps) if caps else min(p.num_usable for p in self.pools) * self.block_size
