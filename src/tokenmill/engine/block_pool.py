"""Fixed-size KV blocks: free list, ref counts, prefix hashes, LRU eviction of cached blocks. Ints only.

Invariants:
- block NULL_BLOCK_ID (0) is never handed out; ids 1 .. num_blocks-1 are allocatable;
- a block is in exactly one of: held (ref_cnt > 0), free list (ref_cnt 0, no hash), evictable LRU
  (ref_cnt 0, hashed: its K/V still serve prefix-cache hits until it is evicted);
- allocation takes the free list first and evicts the least recently freed cached block only when the
  free list is empty.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from tokenmill.engine.outputs import NULL_BLOCK_ID

BlockHash = bytes  # SHA-256 digest, 32 bytes
_ROOT_PARENT = bytes(32)  # the parent of a sequence's first block
_NO_EXTRA = bytes(4)  # the length prefix of empty extra keys


@functools.lru_cache(maxsize=16)
def _packer(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}q")  # one per block length: packing is most of a block's hashing cost


def hash_block(parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: bytes = b"") -> BlockHash:
    """Chain hash of a full block: identical prefixes give identical hashes, position included via parent.

    SHA-256 of (parent digest, extra keys, token ids as packed int64), not Python's 64-bit `hash`: another
    tenant cannot craft a prompt whose block collides with theirs. `extra_keys` (see cache_extra_keys) goes
    into a sequence's first block only; the chain carries it to every later block. Every field has a fixed
    width or a length prefix, so no two inputs share an encoding."""
    head = (parent_hash or _ROOT_PARENT) + (len(extra_keys).to_bytes(4, "little") + extra_keys if extra_keys
                                             else _NO_EXTRA)
    return hashlib.sha256(head + _packer(len(token_ids)).pack(*token_ids)).digest()


def cache_extra_keys(deployment_salt: str | None = None, cache_salt: str | None = None,
                     adapter_id: str | None = None) -> bytes:
    """What besides the tokens decides whether K/V can be shared: the deployment's salt (hashes differ
    across deployments and cannot be predicted without it), the request's cache_salt (only requests with
    the same salt share blocks) and, later, the LoRA adapter. b"" when none is set, so an unsalted chain is
    hash_block(None, ...) all along."""
    if deployment_salt is None and cache_salt is None and adapter_id is None:
        return b""
    return json.dumps([deployment_salt, cache_salt, adapter_id]).encode()


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"invalid num_blocks={num_blocks}: must be >= 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._cached: dict[BlockHash, int] = {}  # hash -> block id
        self.ref_cnt[NULL_BLOCK_ID] = 1  # pinned forever

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: never-cached free blocks plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocksError(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._uncache(b)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (prefix-cache hit); revives them from the evictable list."""
        for b in block_ids:
            if b == NULL_BLOCK_ID:
                continue
            if self.ref_cnt[b] == 0:
                del self._evictable[b]
            self.ref_cnt[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each. Callers pass a table tail-first so its tail is evicted first."""
        for b in block_ids:
            if b == NULL_BLOCK_ID:
                continue
            assert self.ref_cnt[b] > 0, f"double free of block {b}"
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def num_needing_revival(self, block_ids: Iterable[int]) -> int:
        """How many of these cached blocks a touch() would take out of the free count."""
        return sum(1 for b in block_ids if b != NULL_BLOCK_ID and self.ref_cnt[b] == 0)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash. A duplicate (same content computed twice by
        two sequences at once) stays unhashed: the first one serves hits."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id

    def lookup(self, block_hash: BlockHash) -> int | None:
        if not self.enable_caching:
            return None
        return self._cached.get(block_hash)

    def _uncache(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            del self._cached[h]
            self.block_hash[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every evictable cached block (held ones keep their hash)."""
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._uncache(b)
            self._free.append(b)

    def evictable_order(self) -> list[int]:
        """Eviction order, first victim first (tests and debugging)."""
        return list(self._evictable)

    def all_free(self) -> bool:
        return self.num_free == self.num_usable
