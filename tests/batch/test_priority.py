"""Fair to interactive traffic (issue 17): under the default fcfs policy, batch lines (priority 1) queue behind
interactive requests (priority 0) and are preempted first; with equal priorities fcfs is plain arrival order."""

from __future__ import annotations

from tests.engine.helpers import make_scheduler, req, run_step
from tokenmill.config import BatchConfig


def _first_scheduled(s, max_steps: int = 200) -> list[str]:
    order: list[str] = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return order
        out, _ = run_step(s)
        order += [x.seq_id for x in out.seqs if x.seq_id not in order]
    raise AssertionError("scheduler did not finish")


def test_interactive_request_overtakes_queued_batch_lines():
    prio = BatchConfig().priority
    assert prio > 0
    s = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(4):
        s.add_request(req(f"batch{i}", [1, 2, 3], max_tokens=3, priority=prio, arrival=float(i)))
    out, _ = run_step(s)
    assert [x.seq_id for x in out.seqs] == ["batch0#0", "batch1#0"]  # the batch fills the free slots
    s.add_request(req("chat", [4, 5, 6], max_tokens=3, priority=0, arrival=10.0))
    order = _first_scheduled(s)
    assert order.index("chat#0") < order.index("batch2#0") < order.index("batch3#0")


def test_batch_lines_are_preempted_before_interactive_requests():
    # 6 blocks of 4 tokens: two sequences growing to 12 tokens cannot both fit; the batch line yields
    s = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=2, budget=64)
    s.add_request(req("batch", [1, 2, 3, 4], max_tokens=8, priority=1, arrival=0.0, ignore_eos=True))
    s.add_request(req("chat", [5, 6, 7, 8], max_tokens=8, priority=0, arrival=1.0, ignore_eos=True))
    preempted_before = s.num_preemptions
    finished: dict[str, int] = {}
    for step in range(100):
        if not s.has_unfinished():
            break
        _, deltas = run_step(s)
        for d in deltas:
            if d.finish_reason is not None:
                finished[d.request_id] = step
    assert s.num_preemptions > preempted_before
    assert finished["chat"] < finished["batch"]


def test_equal_priorities_keep_arrival_order():
    s = make_scheduler(max_num_seqs=1)
    for i in range(3):
        s.add_request(req(f"r{i}", [1, 2], max_tokens=2, priority=1, arrival=float(i)))
    assert _first_scheduled(s) == ["r0#0", "r1#0", "r2#0"]
