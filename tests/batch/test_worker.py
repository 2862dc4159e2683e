"""The job loop on an in-process engine (tiny Llama): complete, resume without rerunning, cancel, expire."""

from __future__ import annotations

import asyncio
import json
import time

from tests.batch.conftest import make_state
from tokenmill.batch.execute import execute_line
from tokenmill.batch.store import BatchStore
from tokenmill.batch.worker import BatchWorker, line_num_seqs
from tokenmill.config import BatchConfig
from tokenmill.server.serving_engine import Reservation

EP = "/v1/completions"
_TERMINAL = ("completed", "failed", "cancelled", "expired")


def _lines(n: int, max_tokens: int = 4, **body) -> str:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": EP, "body": {
        "model": "tiny", "prompt": f"line {i}", "max_tokens": max_tokens, "temperature": 0, **body}}) + "\n"
        for i in range(n))


def _upload(store: BatchStore, text: str) -> str:
    tmp = store.tmp_path()
    tmp.write_text(text)
    return store.add_file(tmp, "in.jsonl", "batch")["id"]


async def _until(store: BatchStore, bid: str, pred, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = store.get_batch(bid)
        if pred(batch):
            return batch
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch never reached the condition: {store.get_batch(bid)}")


def _output(store: BatchStore, fid: str | None) -> list[dict]:
    return [] if fid is None else [json.loads(x) for x in store.file_path(fid).read_text().splitlines()]


def _run(model_dir, tmp_path, body, **cfg) -> None:
    async def main() -> None:
        state = make_state(model_dir)
        store = BatchStore(tmp_path / "batches")
        worker = BatchWorker(state, store, BatchConfig(**cfg))
        worker.start()
        try:
            await body(state, store, worker)
        finally:
            await worker.stop()
            store.close()
            await state.engine.shutdown()
    asyncio.run(main())


def test_batch_completes_with_outputs_in_order_and_failures_in_the_error_file(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        text = _lines(5) + json.dumps({"custom_id": "bad", "method": "POST", "url": EP,
                                      "body": {"model": "nope", "prompt": "x"}}) + "\n"
        b = store.create_batch(EP, _upload(store, text), 3600, "24h", None)
        worker.wake()
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
        out = _output(store, done["output_file_id"])
        assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(5)]
        assert all(o["error"] is None and o["id"].startswith("batch_req_") for o in out)
        [err] = _output(store, done["error_file_id"])
        assert err["custom_id"] == "bad" and err["response"]["status_code"] == 404
        assert err["response"]["body"]["error"]["param"] == "model"
        # the same request run directly answers the same (greedy) text
        _, direct = await execute_line(state, EP, json.loads(text.splitlines()[2])["body"], priority=0)
        assert out[2]["response"]["body"]["choices"] == direct["choices"]
    _run(tiny_llama_dir, tmp_path, body)


def test_resumed_job_runs_only_lines_without_a_result(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        await worker.stop()  # set the job up as a crashed process left it, then start a fresh loop
        b = store.create_batch(EP, _upload(store, _lines(6)), 3600, "24h", None)
        store.update_batch(b["id"], status="in_progress", in_progress_at=int(time.time()), total=6)
        for cid, num in (("c1", 2), ("c4", 5)):
            store.record_result(b["id"], cid, num, True, {"id": f"batch_req_before_{cid}", "custom_id": cid,
                                                           "response": {"status_code": 200, "body": {}}, "error": None})
        fresh = BatchWorker(state, store, BatchConfig())
        fresh.start()
        try:
            done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        finally:
            await fresh.stop()
        out = _output(store, done["output_file_id"])
        assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(6)]
        kept = {o["custom_id"]: o["id"] for o in out if o["id"].startswith("batch_req_before_")}
        assert kept == {"c1": "batch_req_before_c1", "c4": "batch_req_before_c4"}
        assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    _run(tiny_llama_dir, tmp_path, body)


def test_cancel_mid_job_keeps_partial_output(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        b = store.create_batch(EP, _upload(store, _lines(40, max_tokens=48, ignore_eos=True)), 3600, "24h", None)
        worker.wake()
        await _until(store, b["id"], lambda x: x["request_counts"]["completed"] >= 1)
        assert store.update_batch(b["id"], status="cancelling", cancelling_at=int(time.time()),
                                  only_from=("validating", "in_progress"))
        worker.cancel(b["id"])
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
        out = _output(store, done["output_file_id"])
        assert 1 <= len(out) == done["request_counts"]["completed"] < 40
        ids = [o["custom_id"] for o in out]
        assert len(set(ids)) == len(ids)
        await asyncio.sleep(0)
        assert await _engine_idle(state)  # cancelled lines were aborted in the engine
        assert worker.num_inflight_lines == 0  # every line's slot came back (released in its done callback)
    _run(tiny_llama_dir, tmp_path, body, max_inflight=2)


async def _engine_idle(state, max_polls: int = 500) -> bool:
    core = state.engine.client.core
    for _ in range(max_polls):
        if not core.has_unfinished():
            return True
        await asyncio.sleep(0.01)
    return False


def test_expired_window_reports_unrun_lines_as_batch_expired(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        b = store.create_batch(EP, _upload(store, _lines(3)), 0, "24h", None)  # window already over
        worker.wake()
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["status"] == "expired" and done["expired_at"] is not None
        errs = _output(store, done["error_file_id"])
        assert [e["custom_id"] for e in errs] == ["c0", "c1", "c2"]
        assert all(e["error"]["code"] == "batch_expired" and e["response"] is None for e in errs)
    _run(tiny_llama_dir, tmp_path, body)


def test_invalid_file_fails_the_batch_and_runs_nothing(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        text = _lines(2) + "{broken\n" + _lines(1)  # line 3 is bad, line 4 duplicates c0
        b = store.create_batch(EP, _upload(store, text), 3600, "24h", None)
        worker.wake()
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["status"] == "failed" and done["failed_at"] is not None
        assert [(e["code"], e["line"]) for e in done["errors"]["data"]] == [("invalid_json_line", 3),
                                                                           ("duplicate_custom_id", 4)]
        assert store.done_custom_ids(b["id"]) == set()
        assert done["output_file_id"] is None and done["error_file_id"] is None
    _run(tiny_llama_dir, tmp_path, body)


async def _poll(pred, max_polls: int = 6000) -> bool:
    for _ in range(max_polls):
        if pred():
            return True
        await asyncio.sleep(0.005)
    return False


def test_batch_keeps_to_the_shared_cap_while_interactive_requests_are_in_flight(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        interactive = Reservation(state, 3)  # what admit() holds for three interactive sequences
        # Enough work that the batch outlasts the 1 s interactive hold at 2 lines in flight (40 x 24 tokens no longer
        # did once decode steps got faster: the batch finished before the worker ramped up).
        b = store.create_batch(EP, _upload(store, _lines(60, max_tokens=64, ignore_eos=True)), 3600, "24h", None)
        worker.wake()
        seen: list[tuple[int, int]] = []  # (lines in the worker, batch seqs admitted in the server)

        def progressed() -> bool:
            seen.append((worker.num_inflight_lines, state.in_flight_seqs - 3))
            return store.get_batch(b["id"])["request_counts"]["completed"] >= 6
        assert await _poll(progressed)
        assert max(lines for lines, _ in seen) == 2 and max(seqs for _, seqs in seen) <= 2
        interactive.release()  # interactive traffic stops: the batch fills up to max_inflight again
        assert await _poll(lambda: worker.num_inflight_lines == 8)
        assert worker.interactive_seqs() <= 0  # (negative for a moment while a line is not yet admitted)
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 60
    _run(tiny_llama_dir, tmp_path, body, max_inflight=8, max_inflight_shared=2)


def test_new_interactive_traffic_holds_back_new_lines_until_in_flight_ones_drain(tiny_llama_dir, tmp_path):
    async def body(state, store, worker):
        b = store.create_batch(EP, _upload(store, _lines(60, max_tokens=24, ignore_eos=True)), 3600, "24h", None)
        worker.wake()
        assert await _poll(lambda: worker.num_inflight_lines == 8)
        interactive = Reservation(state, 1)
        # Lines already running finish; none start until fewer than the shared cap remain.
        assert await _poll(lambda: worker.num_inflight_lines <= 2)
        start, peak = store.get_batch(b["id"])["request_counts"]["completed"], 0

        def watch() -> bool:
            nonlocal peak
            peak = max(peak, worker.num_inflight_lines)
            return store.get_batch(b["id"])["request_counts"]["completed"] >= start + 6
        assert await _poll(watch)
        assert peak <= 2
        interactive.release()
        done = await _until(store, b["id"], lambda x: x["status"] in _TERMINAL)
        assert done["request_counts"]["completed"] == 60
    _run(tiny_llama_dir, tmp_path, body, max_inflight=8, max_inflight_shared=2)


def test_line_num_seqs_counts_what_admit_reserves():
    assert line_num_seqs("/v1/chat/completions", {"messages": [], "n": 2}) == 2
    assert line_num_seqs("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}) == 6
    assert line_num_seqs("/v1/completions", {"prompt": [1, 2, 3]}) == 1  # one prompt of token ids
    assert line_num_seqs("/v1/completions", {"prompt": [[1], [2]]}) == 2
    assert line_num_seqs("/v1/completions", {"prompt": "x", "n": "bad"}) == 1  # the handler answers 400
    assert line_num_seqs("/v1/embeddings", {"input": ["a", "b"]}) == 0
