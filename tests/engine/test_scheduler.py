"""Scheduler unit tests without torch: exact block ids, budget accounting, chunking, preemption, priority."""

import pytest

from tokenmill.engine.outputs import ModelOutput, SampledToken

from .helpers import drain, make_scheduler, req, run_step


def test_budget_chunks_prefill_then_decodes_first():
    s = make_scheduler(budget=10, block_size=4)
    s.add_request(req("a", list(range(100, 112))))  # 12 tokens
    s.add_request(req("b", list(range(200, 205))))  # 5 tokens
    out, _ = run_step(s)
    assert [(x.seq_id, len(x.token_ids), x.start_pos, x.sample) for x in out.seqs] == [("a#0", 10, 0, False)]
    assert out.seqs[0].block_ids == [[1, 2, 3]]
    assert out.seqs[0].setup is not None and out.seqs[0].setup.prompt_token_ids == list(range(100, 112))
    out, deltas = run_step(s)
    assert [(x.seq_id, x.token_ids, x.start_pos, x.sample) for x in out.seqs] == [
        ("a#0", [110, 111], 10, True), ("b#0", list(range(200, 205)), 0, True)]
    assert out.num_batched_tokens == 7
    assert out.seqs[0].setup is None  # sent once
    assert out.seqs[1].block_ids == [[4, 5]]
    assert [(d.request_id, d.new_token_ids) for d in deltas] == [("a", [7]), ("b", [7])]
    out, _ = run_step(s)  # both decode one token each
    assert [(x.seq_id, x.token_ids, x.start_pos) for x in out.seqs] == [("a#0", [7], 12), ("b#0", [7], 5)]
    assert out.seqs[0].block_ids == [[1, 2, 3, 6]]  # position 12 opens a 4th block
    drain(s)
    assert s.kv.all_free()


def test_chunking_disabled_prompt_runs_whole_and_waits_its_turn():
    s = make_scheduler(budget=10, chunked=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=10 while chunked prefill is disabled"):
        s.add_request(req("big", list(range(12))))
    s.add_request(req("a", list(range(8))))
    s.add_request(req("b", list(range(20, 26))))
    s.add_request(req("c", [30]))
    out, _ = run_step(s)
    # b (6 tokens) does not fit in the 2 left and c may not overtake it
    assert [(x.seq_id, len(x.token_ids)) for x in out.seqs] == [("a#0", 8)]
    out, _ = run_step(s)
    assert [(x.seq_id, len(x.token_ids)) for x in out.seqs] == [("a#0", 1), ("b#0", 6), ("c#0", 1)]
    drain(s)
    assert s.kv.all_free()


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_num_seqs=2)
    for r in "abc":
        s.add_request(req(r, [1, 2, 3]))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["a#0", "b#0"]
    assert s.stats().num_waiting == 1 and s.stats().num_running == 2


def test_prefix_hit_reuses_blocks_but_never_whole_prompt():
    s = make_scheduler(block_size=4)
    s.add_request(req("a", list(range(10)), max_tokens=1))
    drain(s)
    assert s.kv.all_free()
    # a's full blocks [0..3] [4..7] are cached (evictable), its partial block is not
    s.add_request(req("b", list(range(8)) + [50, 51, 52]))
    out, _ = run_step(s)
    [b] = out.seqs
    assert b.start_pos == 8 and b.token_ids == [50, 51, 52]
    assert b.block_ids == [[1, 2, 4]]
    st = s.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (10 + 11, 8)
    s.add_request(req("c", list(range(8))))  # exactly two cached blocks: the last one is recomputed
    out, _ = run_step(s)
    c = [x for x in out.seqs if x.seq_id == "c#0"][0]
    assert c.start_pos == 4 and c.token_ids == [4, 5, 6, 7]
    assert c.block_ids[0][0] == 1 and c.block_ids[0][1] != 2
    assert s.kv.pools[0].ref_cnt[1] == 2
    drain(s)
    assert s.kv.all_free()


def test_n_samples_share_full_prompt_blocks():
    s = make_scheduler(block_size=4)
    s.add_request(req("a", list(range(10)), n=3, seed=5, temperature=1.0))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["a#0"]  # siblings wait for sample 0's prompt blocks
    assert out.seqs[0].setup.seed == 5
    out, _ = run_step(s)
    by = {x.seq_id: x for x in out.seqs}
    assert set(by) == {"a#0", "a#1", "a#2"}
    assert by["a#1"].start_pos == 8 and by["a#1"].token_ids == [8, 9]
    assert [by[f"a#{i}"].setup.seed for i in (1, 2)] == [6, 7]
    shared = by["a#0"].block_ids[0][:2]
    assert by["a#1"].block_ids[0][:2] == shared == by["a#2"].block_ids[0][:2]
    assert [s.kv.pools[0].ref_cnt[b] for b in shared] == [3, 3]
    assert by["a#1"].block_ids[0][2] != by["a#2"].block_ids[0][2]
    deltas = drain(s)
    assert sorted({d.index for d in deltas}) == [0, 1, 2]
    assert s.kv.all_free() and not s.requests


def test_preemption_by_recompute_of_latest_arrival():
    s = make_scheduler(num_blocks=5, block_size=4)  # 4 usable blocks
    s.add_request(req("a", list(range(7)), max_tokens=6, arrival=1.0))
    s.add_request(req("b", list(range(10, 17)), max_tokens=6, arrival=2.0))
    run_step(s)  # both prefill: 2 blocks each -> pool full
    assert s.kv.pools[0].num_free == 0
    out, _ = run_step(s)  # decode at position 7 still fits in block 2
    assert len(out.seqs) == 2
    out, _ = run_step(s)  # position 8 needs a new block: b (latest) is preempted
    assert [x.seq_id for x in out.seqs] == ["a#0"]
    assert out.finished_seq_ids == ["b#0"]  # runner drops b's state
    assert s.num_preemptions == 1 and [q.seq_id for q in s.waiting] == ["b#0"]
    b = s.seqs["b#0"]
    assert b.num_computed_tokens == 0 and b.output_token_ids == [7, 7]
    # b comes back with its outputs resent in the setup once a finishes
    seen = None
    while s.has_unfinished():
        out, _ = run_step(s)
        for x in out.seqs:
            if x.seq_id == "b#0" and x.setup is not None:
                seen = x
    assert seen is not None and seen.setup.output_token_ids == [7, 7]
    # its first full block (id 3) survived in the prefix cache: recompute starts after it
    assert seen.start_pos == 4 and seen.block_ids[0][0] == 3
    assert seen.token_ids == [14, 15, 16, 7, 7]
    assert s.kv.all_free()


def test_priority_policy_orders_admission_and_preempts_lowest_priority():
    s = make_scheduler(num_blocks=5, block_size=4, policy="priority")
    s.add_request(req("low", list(range(7)), max_tokens=6, priority=5, arrival=1.0))
    s.add_request(req("high", list(range(10, 17)), max_tokens=6, priority=0, arrival=2.0))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["high#0", "low#0"]
    run_step(s)
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["high#0"]
    assert [q.seq_id for q in s.waiting] == ["low#0"]
    drain(s)
    assert s.kv.all_free()


def test_priority_arrival_preempts_lower_priority_running_for_blocks():
    s = make_scheduler(num_blocks=5, block_size=4, policy="priority")
    s.add_request(req("low", list(range(13)), max_tokens=3, priority=5, arrival=1.0))  # 4 blocks: all of them
    run_step(s)
    s.add_request(req("high", list(range(20, 27)), max_tokens=2, priority=1, arrival=2.0))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["high#0"]
    assert out.finished_seq_ids == ["low#0"] and s.num_preemptions == 1
    assert [q.seq_id for q in s.waiting] == ["low#0"]
    d = drain(s)
    assert [x.finish_reason for x in d if x.finish_reason] == ["length", "length"]
    assert s.kv.all_free()


def test_fcfs_is_arrival_order_within_a_priority():
    # fcfs orders waiting work by (priority, arrival): plain FIFO while priorities are equal (all 0 for
    # interactive requests), and lower-priority work (Batch API lines, priority 1) queues behind (issue 17)
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("first", [1, 2], priority=0, arrival=1.0))
    s.add_request(req("second", [1, 2], priority=0, arrival=2.0))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["first#0"]
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("batch", [1, 2], priority=9, arrival=1.0))
    s.add_request(req("interactive", [1, 2], priority=0, arrival=2.0))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["interactive#0"]


def test_sequence_that_can_never_fit_fails_and_engine_keeps_serving():
    s = make_scheduler(num_blocks=3, block_size=4)  # 8 tokens of cache
    s.add_request(req("huge", list(range(12))))
    s.add_request(req("ok", [1, 2, 3], max_tokens=2))
    deltas = drain(s)
    err = [d for d in deltas if d.request_id == "huge"]
    assert len(err) == 1 and err[0].finish_reason == "error" and "KV cache" in err[0].error
    ok = [d for d in deltas if d.request_id == "ok"]
    assert [d.finish_reason for d in ok] == [None, "length"]
    assert s.kv.all_free()


def test_growing_sequence_that_outgrows_cache_fails_with_error():
    s = make_scheduler(num_blocks=3, block_size=4)
    s.add_request(req("grow", [1, 2, 3], max_tokens=20))
    deltas = drain(s)
    assert deltas[-1].finish_reason == "error" and len(deltas) == 7
    # 8 slots hold K/V of positions 0..7, so 6 tokens are sampled (the last from position 7), then no room
    assert s.kv.all_free()


def test_abort_frees_blocks_immediately_and_drops_late_tokens():
    s = make_scheduler()
    s.add_request(req("a", list(range(9)), max_tokens=10))
    s.add_request(req("b", list(range(9)), max_tokens=10, n=2))
    out = s.schedule()
    s.abort(["a", "b#0"])
    assert "a" not in s.requests and set(s.seqs) == {"b#1"}
    deltas = s.update(out, ModelOutput([SampledToken(x.seq_id, 3) for x in out.seqs if x.sample]))
    assert deltas == []
    assert s.kv.pools[0].num_free == s.kv.pools[0].num_usable
    out, _ = run_step(s)
    assert "a#0" in out.finished_seq_ids and "b#0" in out.finished_seq_ids
    s.abort(["b", "nonexistent"])
    assert s.kv.all_free() and not s.has_unfinished()


def test_stop_conditions_eos_min_tokens_stop_ids_and_model_len():
    s = make_scheduler(max_model_len=12)
    s.add_request(req("eos", [1], max_tokens=5))
    s.add_request(req("min", [1], max_tokens=5, min_tokens=3))
    s.add_request(req("ign", [1], max_tokens=3, ignore_eos=True))
    s.add_request(req("sid", [1], max_tokens=5, stop_token_ids=[2]))
    s.add_request(req("long", list(range(10)), max_tokens=None))
    d = drain(s, token=2)
    fin = {x.request_id: (x.finish_reason, x.stop_reason) for x in d if x.finish_reason}
    count = {r: sum(len(x.new_token_ids) for x in d if x.request_id == r) for r in fin}
    assert fin["eos"] == ("stop", None) and count["eos"] == 1
    assert fin["min"] == ("stop", None) and count["min"] == 3
    assert fin["ign"] == ("length", None) and count["ign"] == 3
    assert fin["long"] == ("stop", None)  # eos 2 stops it first
    s.add_request(req("sid2", [1], max_tokens=5, stop_token_ids=[9]))
    s.add_request(req("long2", list(range(10)), max_tokens=None))
    d = drain(s, token=9)
    fin = {x.request_id: (x.finish_reason, x.stop_reason) for x in d if x.finish_reason}
    assert fin["sid2"] == ("stop", 9)
    assert fin["long2"] == ("length", None)
    assert sum(len(x.new_token_ids) for x in d if x.request_id == "long2") == 2  # up to max_model_len


def test_add_request_rejects_bad_prompts():
    s = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match="17 tokens, more than max_model_len=16"):
        s.add_request(req("x", list(range(17))))
    with pytest.raises(ValueError, match="no tokens"):
        s.add_request(req("x", []))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        s.add_request(req("x", [5000]))
    s.add_request(req("x", [1]))
    with pytest.raises(ValueError, match="request_id"):
        s.add_request(req("x", [1]))
