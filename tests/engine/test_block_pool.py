import pytest

from tokenmill.engine.block_pool import BlockPool, NoFreeBlocksError, hash_block
from tokenmill.engine.outputs import NULL_BLOCK_ID


def test_allocation_order_skips_null_block_and_frees_to_tail():
    p = BlockPool(6)
    assert p.num_free == 5
    assert p.allocate(3) == [1, 2, 3]
    p.free([2])
    assert p.allocate(2) == [4, 5]
    assert p.allocate(1) == [2]
    assert p.num_free == 0
    with pytest.raises(NoFreeBlocksError):
        p.allocate(1)
    assert p.ref_cnt[NULL_BLOCK_ID] == 1  # pinned, never handed out


def test_cached_blocks_are_evicted_lru_only_when_free_list_is_empty():
    p = BlockPool(6)
    a = p.allocate(3)  # 1 2 3
    for i, b in enumerate(a):
        p.cache_block(b, hash_block(None, [i]))
    p.free(reversed(a))  # tail first -> eviction order 3, 2, 1
    assert p.evictable_order() == [3, 2, 1]
    assert p.num_free == 5
    # the two never-cached blocks go first, cached ones survive
    assert p.allocate(2) == [4, 5]
    assert p.lookup(hash_block(None, [0])) == 1
    # now eviction: least recently freed first
    assert p.allocate(1) == [3]
    assert p.lookup(hash_block(None, [2])) is None
    assert p.lookup(hash_block(None, [1])) == 2


def test_touch_revives_evictable_block_and_ref_counts():
    p = BlockPool(4)
    [b] = p.allocate(1)
    h = hash_block(None, [1, 2])
    p.cache_block(b, h)
    p.free([b])
    assert p.evictable_order() == [b]
    p.touch([b])
    p.touch([b])
    assert p.ref_cnt[b] == 2 and p.evictable_order() == []
    assert p.num_free == 2
    p.free([b])
    assert p.evictable_order() == []  # still held once
    p.free([b])
    assert p.evictable_order() == [b] and p.all_free()


def test_duplicate_hash_keeps_first_block_and_reset_prefix_cache():
    p = BlockPool(4)
    a, b = p.allocate(2)
    h = hash_block(None, [5])
    p.cache_block(a, h)
    p.cache_block(b, h)
    assert p.lookup(h) == a and p.block_hash[b] is None
    p.free([a, b])
    assert p.evictable_order() == [a]
    p.reset_prefix_cache()
    assert p.lookup(h) is None and p.all_free()


def test_hash_chain_depends_on_parent():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    parent = hash_block(None, [3, 4])
    assert hash_block(parent, (1, 2)) == hash_block(parent, [1, 2])
    assert len(parent) == 32  # a SHA-256 digest, not a 64-bit int


def test_caching_disabled_never_hits_and_double_free_asserts():
    p = BlockPool(3, enable_caching=False)
    [b] = p.allocate(1)
    p.cache_block(b, 11)
    assert p.lookup(11) is None
    p.free([b])
    with pytest.raises(AssertionError):
        p.free([b])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)
