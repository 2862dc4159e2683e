"""BatchStore: one result per custom_id, counts from rows, output in input order, pages, crash leftovers."""

from __future__ import annotations

import json

import pytest

from tokenmill.batch.store import BatchDirBusy, BatchStore


def _file(store: BatchStore, text: str = "x\n") -> dict:
    tmp = store.tmp_path()
    tmp.write_text(text)
    return store.add_file(tmp, "in.jsonl", "batch")


def _out(cid: str, status: int = 200, tokens: tuple[int, int] = (3, 4)) -> dict:
    usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
    return {"id": f"batch_req_{cid}", "custom_id": cid, "error": None,
            "response": {"status_code": status, "request_id": "r", "body": {"usage": usage}}}


def test_a_custom_id_gets_one_result_and_counts_come_from_rows(tmp_path):
    store = BatchStore(tmp_path)
    f = _file(store)
    b = store.create_batch("/v1/completions", f["id"], 3600, "24h", {"k": "v"})
    assert b["status"] == "validating" and b["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert b["expires_at"] == b["created_at"] + 3600 and b["metadata"] == {"k": "v"}
    store.update_batch(b["id"], status="in_progress", total=3)
    assert store.record_result(b["id"], "c", 3, True, _out("c"))
    assert store.record_result(b["id"], "a", 1, False, _out("a", 400, (0, 0)))
    assert not store.record_result(b["id"], "c", 3, True, _out("c-again"))  # a rerun line adds nothing
    got = store.get_batch(b["id"])
    assert got["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert (got["usage"]["input_tokens"], got["usage"]["output_tokens"]) == (3, 4)
    assert store.done_custom_ids(b["id"]) == {"a", "c"}
    assert [json.loads(x)["id"] for x in store.iter_results(b["id"], True)] == ["batch_req_c"]


def test_finish_writes_output_and_error_files_in_input_order(tmp_path):
    store = BatchStore(tmp_path)
    b = store.create_batch("/v1/completions", _file(store)["id"], 3600, "24h", None)
    for cid, num, ok in [("z", 3, True), ("x", 1, True), ("bad", 2, False)]:
        store.record_result(b["id"], cid, num, ok, _out(cid, 200 if ok else 400))
    store.finish(b["id"], "completed", list(store.iter_results(b["id"], True)), list(store.iter_results(b["id"], False)))
    done = store.get_batch(b["id"])
    assert done["status"] == "completed" and done["completed_at"] is not None
    out = store.file_path(done["output_file_id"]).read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == ["x", "z"]
    err = store.file_path(done["error_file_id"]).read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in err] == ["bad"]
    assert store.get_file(done["output_file_id"])["purpose"] == "batch_output"


def test_no_error_file_when_nothing_failed(tmp_path):
    store = BatchStore(tmp_path)
    b = store.create_batch("/v1/completions", _file(store)["id"], 3600, "24h", None)
    store.finish(b["id"], "cancelled", [], [])
    done = store.get_batch(b["id"])
    assert (done["status"], done["output_file_id"], done["error_file_id"]) == ("cancelled", None, None)
    assert done["cancelled_at"] is not None


def test_guarded_transition_loses_to_a_concurrent_one(tmp_path):
    store = BatchStore(tmp_path)
    b = store.create_batch("/v1/completions", _file(store)["id"], 3600, "24h", None)
    assert store.update_batch(b["id"], status="cancelling", only_from=("validating", "in_progress"))
    assert not store.update_batch(b["id"], status="in_progress", only_from=("validating",))
    assert store.get_batch(b["id"])["status"] == "cancelling"
    assert store.active_batches_using(b["input_file_id"]) == [b["id"]]


def test_cursor_pages_newest_first(tmp_path):
    store = BatchStore(tmp_path)
    fid = _file(store)["id"]
    ids = [store.create_batch("/v1/completions", fid, 3600, "24h", None)["id"] for _ in range(5)]
    seen, after = [], None
    for _ in range(10):
        page, more = store.list_batches(after, 2)
        seen += [b["id"] for b in page]
        if not more:
            break
        after = page[-1]["id"]
    assert seen == ids[::-1]
    files, more = store.list_files("batch", None, 10, "asc")
    assert [f["id"] for f in files] == [fid] and not more
    assert store.list_files("batch_output", None, 10, "desc") == ([], False)


def test_state_survives_reopen_and_crash_leftovers_are_dropped(tmp_path):
    store = BatchStore(tmp_path)
    f = _file(store, "hello\n")
    b = store.create_batch("/v1/completions", f["id"], 3600, "24h", None)
    store.record_result(b["id"], "a", 1, True, _out("a"))
    store.tmp_path().write_text("half an upload")
    (tmp_path / "files" / "file-orphan").write_text("a finalize cut short")
    store.close()
    again = BatchStore(tmp_path)
    assert again.get_batch(b["id"])["request_counts"]["completed"] == 1
    assert again.file_path(f["id"]).read_text() == "hello\n"
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f["id"]]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert again.delete_file(f["id"]) and not again.file_path(f["id"]).exists()
    assert not again.delete_file(f["id"])


def test_one_live_store_per_directory(tmp_path):
    store = BatchStore(tmp_path)
    with pytest.raises(BatchDirBusy, match="--batch-dir"):
        BatchStore(tmp_path)
    store.close()
    BatchStore(tmp_path).close()  # released with the first
