"""The draft model's own paged KV cache: tensors laid out like the model runner's, a free list of blocks,
and per sequence the tokens whose K/V it holds with their block table.

The draft proposes in the engine core process next to the target, but its cache is separate: the scheduler's
block pool never sees it, so the draft owns its allocation and frees a sequence's blocks on release().
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tokenmill.engine.outputs import KVCacheGroupSpec
from tokenmill.executor.kv_cache import zeros

NULL_BLOCK = 0  # like the runner's: never handed out, so a padded block table entry reads harmless zeros


@dataclass(slots=True)
class DraftSeq:
    """Tokens whose K/V sit at positions 0 .. len(token_ids)-1, in the blocks of block_ids (in order)."""

    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)


class DraftKVCache:
    """Invariants: block NULL_BLOCK is never handed out; every other block is either free or in exactly one
    sequence's block_ids; between reserve() calls a sequence holds ceil(len(token_ids) / block_size) blocks.
    All KV cache groups (sliding-window layers too) share one block table per sequence: a draft is small, so
    keeping its whole history in every group costs little and needs no per-group allocator."""

    def __init__(self, groups: list[KVCacheGroupSpec], shapes: list[tuple[int, int]], num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        if num_blocks < 2:
            raise ValueError(f"draft KV cache: num_blocks={num_blocks} must be >= 2 (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.groups = groups
        self.layer_to_group = [0] * len(shapes)
        for gi, g in enumerate(groups):
            for layer in g.layer_ids:
                self.layer_to_group[layer] = gi
        self.kv_caches = [(zeros((num_blocks, block_size, h, d), dtype, device),
                           zeros((num_blocks, block_size, h, d), dtype, device)) for h, d in shapes]
        # Popped from the end: low block ids first, so a fresh cache touches its first pages first.
        self.free_blocks: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self.seqs: dict[str, DraftSeq] = {}  # least recently used first

    @staticmethod
    def block_bytes(shapes: list[tuple[int, int]], block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers (K and V)."""
        elsize = torch.empty((), dtype=dtype).element_size()
        return sum(2 * block_size * h * d * elsize for h, d in shapes)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def capacity_blocks(self) -> int:
        """Blocks that can be handed out (all but the null block)."""
        return self.num_blocks - 1

    def get(self, seq_id: str) -> DraftSeq:
        """The sequence's state (empty for a new one), marked most recently used."""
        seq = self.seqs.pop(seq_id, None)
        self.seqs[seq_id] = seq if seq is not None else DraftSeq()
        return self.seqs[seq_id]

    def truncate(self, seq: DraftSeq, num_tokens: int) -> None:
        """Keep the first num_tokens tokens' K/V; free the blocks past them (stale slots in the last kept
        block are overwritten before they are read: attention never looks past a sequence's length)."""
        del seq.token_ids[num_tokens:]
        keep = math.ceil(num_tokens / self.block_size)
        self.free_blocks.extend(reversed(seq.block_ids[keep:]))
        del seq.block_ids[keep:]

    def reserve(self, seq: DraftSeq, num_tokens: int, busy: set[str]) -> bool:
        """Blocks for num_tokens positions. When the free list runs short, sequences not in `busy` (the
        current batch) are evicted least recently used first: they prefill again on their next proposal.
        False (nothing allocated) when even that is not enough."""
        need = math.ceil(num_tokens / self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            for seq_id in [s for s in self.seqs if s not in busy]:
                self.release(seq_id)
                if need <= self.num_free_blocks:
                    break
        if need > self.num_free_blocks:
            return False
        seq.block_ids.extend(self.free_blocks.pop() for _ in range(need))
        return True

    def release(self, seq_id: str) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.free_blocks.extend(reversed(seq.block_ids))
            seq.block_ids.clear()
            seq.token_ids.clear()
