"""KV cache manager: sliding-window release and prefix-hit rules over several KV cache groups (no torch)."""

import subprocess
import sys

from tokenmill.engine.block_pool import hash_block
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.outputs import NULL_BLOCK_ID, KVCacheGroupSpec

from .helpers import drain, make_scheduler, req, run_step
from tokenmill.engine.request import Sequence

FULL = KVCacheGroupSpec(layer_ids=[1, 3])
SLIDE4 = KVCacheGroupSpec(layer_ids=[0, 2], sliding_window=4)


def _cache(pool, hashes):
    for h in hashes:
        [b] = pool.allocate(1)
        pool.cache_block(b, h)
        pool.free([b])


def _chain(tokens, bs=4):
    hs, parent = [], None
    for i in range(len(tokens) // bs):
        parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
        hs.append(parent)
    return hs


def test_sliding_group_releases_blocks_outside_window_and_keeps_them_cached():
    s = make_scheduler(block_size=4, groups=[FULL, SLIDE4])
    s.add_request(req("a", list(range(13)), max_tokens=3))
    out, _ = run_step(s)
    assert out.seqs[0].block_ids == [[1, 2, 3, 4], [1, 2, 3, 4]]
    out, _ = run_step(s)  # next token at position 13 only needs positions >= 9: blocks 0 and 1 go
    assert out.seqs[0].block_ids == [[1, 2, 3, 4], [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]]
    slide_pool = s.kv.pools[1]
    assert slide_pool.evictable_order() == [1, 2]  # oldest evicted first, still serving hits
    # same prompt: full group has blocks 0..2, sliding group only needs block 2 (the window before 12)
    s.add_request(req("b", list(range(13)), max_tokens=1))
    out, _ = run_step(s)
    b = [x for x in out.seqs if x.seq_id == "b#0"][0]
    assert b.start_pos == 12 and b.token_ids == [12]
    assert b.block_ids[0][:3] == [1, 2, 3] and b.block_ids[1][:3] == [NULL_BLOCK_ID, NULL_BLOCK_ID, 3]
    drain(s)
    assert s.kv.all_free()


def test_hit_length_is_longest_valid_for_all_groups():
    toks = list(range(40, 53))  # 13 tokens: 3 full blocks before the last token
    hs = _chain(toks)
    kv = KVCacheManager([FULL, SLIDE4], [16, 16], 4)
    seq = Sequence(req("q", toks), 0, 0, 256)
    # sliding group lacks blocks 0 and 1, which the window at 12 does not need
    _cache(kv.pools[0], hs)
    _cache(kv.pools[1], hs[2:])
    hit, tables = kv.find_prefix_hit(seq)
    assert hit == 12
    assert tables == [[1, 2, 3], [NULL_BLOCK_ID, NULL_BLOCK_ID, 1]]

    # full group lacks block 2 -> length 8 would need sliding block 1, missing; length 4 needs block 0, missing
    kv = KVCacheManager([FULL, SLIDE4], [16, 16], 4)
    _cache(kv.pools[0], hs[:2])
    _cache(kv.pools[1], hs[2:])
    assert kv.find_prefix_hit(Sequence(req("q", toks), 0, 0, 256))[0] == 0

    # a sliding-only hit at length 8 needs just block 1 of the sliding group
    kv = KVCacheManager([FULL, SLIDE4], [16, 16], 4)
    _cache(kv.pools[0], hs[:2])
    _cache(kv.pools[1], hs[1:2])
    hit, tables = kv.find_prefix_hit(Sequence(req("q", toks), 0, 0, 256))
    assert hit == 8 and tables == [[1, 2], [NULL_BLOCK_ID, 1]]
    assert kv.allocate_slots(Sequence(req("q", toks), 0, 0, 256), hit, 5, tables)
    assert kv.pools[1].ref_cnt[1] == 1 and kv.usage() > 0


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager([FULL, SLIDE4], [4, 2], 4)  # sliding pool has a single usable block
    seq = Sequence(req("q", list(range(8))), 0, 0, 256)
    assert not kv.allocate_slots(seq, 0, 8, [[], []])
    assert kv.tables == {} and kv.pools[0].num_free == 3 and kv.pools[1].num_free == 1


def test_engine_modules_do_not_import_torch():
    code = ("import sys; import tokenmill, tokenmill.engine.core, tokenmill.engine.scheduler, "
            "tokenmill.engine.llm, tokenmill.engine.async_llm, tokenmill.engine.cli, tokenmill.engine.detokenizer, "
            "tokenmill.engine.inproc_client; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
