"""Scheduling with a sliding-window KV group whose pool is smaller than a prompt: chunks sized to the window pool.

Layout in every test: block_size 4, group 0 full attention (plenty of blocks), group 1 a window of 8 tokens,
so a sequence at position p holds the window group's blocks from (p - 8) // 4 on.
"""

from tokenmill.engine.outputs import NULL_BLOCK_ID, KVCacheGroupSpec

from .helpers import drain, make_scheduler, req, run_step

GROUPS = [KVCacheGroupSpec(layer_ids=[0]), KVCacheGroupSpec(layer_ids=[1], sliding_window=8)]


def _scheduler(window_blocks: int, chunked: bool = True, budget: int = 64):
    return make_scheduler(block_size=4, budget=budget, chunked=chunked, groups=GROUPS,
                          num_blocks_per_group=[64, window_blocks + 1])


def test_prompt_longer_than_window_pool_is_chunked_not_refused():
    # 5 window blocks hold 20 tokens; the 30-token prompt fits once the blocks that slid out are released.
    s = _scheduler(window_blocks=5)
    s.add_request(req("a", list(range(100, 130)), max_tokens=3))
    out, deltas = run_step(s)
    assert [(x.seq_id, len(x.token_ids), x.start_pos, x.sample) for x in out.seqs] == [("a#0", 20, 0, False)]
    assert out.seqs[0].block_ids == [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    assert deltas == []
    out, deltas = run_step(s)
    # positions 20..29 attend back to 12: blocks 0-2 (positions 0..11) went back to the pool first
    assert [(x.seq_id, len(x.token_ids), x.start_pos, x.sample) for x in out.seqs] == [("a#0", 10, 20, True)]
    assert out.seqs[0].block_ids[1] == [NULL_BLOCK_ID] * 3 + [4, 5, 1, 2, 3]
    assert [(d.new_token_ids, d.finish_reason) for d in deltas] == [([7], None)]
    deltas = drain(s)
    assert [d.finish_reason for d in deltas] == [None, "length"]
    assert s.stats().num_preemptions == 0
    assert s.kv.all_free()


def test_prefill_takes_what_the_window_pool_has_instead_of_preempting():
    s = _scheduler(window_blocks=6)
    s.add_request(req("a", list(range(8)), max_tokens=6))
    run_step(s)  # a: 8 tokens in 2 window blocks, then one sampled token
    s.add_request(req("b", list(range(200, 230)), max_tokens=2))
    out, _ = run_step(s)
    # a's decode at position 8 opens its third block; b gets the 3 blocks left: 12 tokens now, not 30
    assert [(x.seq_id, len(x.token_ids), x.start_pos) for x in out.seqs] == [("a#0", 1, 8), ("b#0", 12, 0)]
    drain(s)
    assert s.stats().num_preemptions == 0
    assert s.kv.all_free()


def test_without_chunked_prefill_a_prompt_the_window_pool_cannot_hold_whole_still_runs():
    s = _scheduler(window_blocks=5, chunked=False)
    s.add_request(req("a", list(range(100, 130)), max_tokens=2))
    out, _ = run_step(s)
    assert [(x.seq_id, len(x.token_ids)) for x in out.seqs] == [("a#0", 20)]
    deltas = drain(s)
    assert [d.finish_reason for d in deltas] == [None, "length"]
    assert s.kv.all_free()


def test_window_fit_counts_released_blocks_and_ignores_full_groups():
    s = _scheduler(window_blocks=5)
    s.add_request(req("a", list(range(100, 130)), max_tokens=1))
    run_step(s)  # 20 tokens computed, 5 window blocks held, none free
    seq = s.seqs["a#0"]
    # blocks 0-2 lie wholly before position 20 - 8: released first, so 3 blocks (12 tokens) fit now
    assert s.kv.window_fit(seq, 20) == (12, 12)
    only_full = make_scheduler(block_size=4, groups=[KVCacheGroupSpec(layer_ids=[0])], num_blocks=4)
    only_full.add_request(req("b", list(range(10))))
    now, emptied = only_full.kv.window_fit(only_full.seqs["b#0"], 0)
    assert now > 10**9 and emptied > 10**9
