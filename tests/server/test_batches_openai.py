"""The Batch API through the official `openai` client on real `tokenmill serve` processes (tiny Llama):
end to end, bad inputs, cancel, and SIGKILL + restart on the same --batch-dir."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import openai
import pytest

from tests.fixtures.servers import TINY_SERVER_FLAGS, LiveServer, start_server

_TERMINAL = ("completed", "failed", "cancelled", "expired")
CHAT = "/v1/chat/completions"


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_lines(n: int, max_tokens: int = 6, **extra) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
             "body": {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}],
                      "max_tokens": max_tokens, "temperature": 0, **extra}} for i in range(n)]


def _upload(client: openai.OpenAI, lines: list[dict] | str) -> str:
    text = lines if isinstance(lines, str) else "".join(json.dumps(x) + "\n" for x in lines)
    return client.files.create(file=("input.jsonl", text.encode()), purpose="batch").id


def _wait(client: openai.OpenAI, bid: str, pred, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(bid)
        if pred(batch):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {bid} never got there: {client.batches.retrieve(bid)}")


def _jsonl(client: openai.OpenAI, fid: str | None) -> list[dict]:
    return [] if fid is None else [json.loads(x) for x in client.files.content(fid).text.splitlines()]


@pytest.fixture(scope="module")
def batch_server(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch_server")
    server = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--batch-dir", str(tmp / "batches"),
                          "--max-batch-inflight", "2", tmp_dir=tmp)
    yield server
    server.stop()


def test_openai_client_end_to_end_matches_interactive(batch_server):
    client = _client(batch_server)
    lines = _chat_lines(8)
    fid = _upload(client, lines)
    assert client.files.retrieve(fid).purpose == "batch"
    batch = client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h",
                                  metadata={"job": "e2e"})
    assert batch.status == "validating" and batch.id.startswith("batch_") and batch.metadata == {"job": "e2e"}
    done = _wait(client, batch.id, lambda b: b.status in _TERMINAL)
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 8, 0)
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    out = _jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]  # each once, in input order
    for line, o in zip(lines, out):
        assert o["error"] is None and o["response"]["status_code"] == 200
        interactive = client.chat.completions.create(**line["body"])
        assert o["response"]["body"]["choices"][0]["message"]["content"] == interactive.choices[0].message.content
        assert o["response"]["body"]["usage"]["completion_tokens"] == interactive.usage.completion_tokens
    assert done.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    assert batch.id in [b.id for b in client.batches.list(limit=1)]  # the cursor pages through every batch
    assert client.files.delete(fid).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(fid)


@pytest.mark.parametrize(("text", "code", "line"), [
    ("{not json\n", "invalid_json_line", 1),
    (json.dumps({"custom_id": "a", "method": "POST", "url": CHAT}) + "\n", "missing_required_parameter", 1),
    ("".join(json.dumps(x) + "\n" for x in _chat_lines(2) + _chat_lines(1)), "duplicate_custom_id", 3),
    (json.dumps({**_chat_lines(1)[0], "url": "/v1/completions"}) + "\n", "invalid_url", 1),
])
def test_bad_input_fails_the_batch_with_line_numbers_and_server_keeps_serving(batch_server, text, code, line):
    client = _client(batch_server)
    batch = client.batches.create(input_file_id=_upload(client, text), endpoint=CHAT, completion_window="24h")
    done = _wait(client, batch.id, lambda b: b.status in _TERMINAL)
    assert done.status == "failed" and done.request_counts.total == 0
    assert [(e.code, e.line) for e in done.errors.data] == [(code, line)]
    assert done.output_file_id is None
    reply = client.chat.completions.create(**_chat_lines(1)[0]["body"])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_request_errors_name_the_field(batch_server):
    client = _client(batch_server)
    fid = _upload(client, _chat_lines(1))
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=fid, endpoint="/v1/images/generations", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    done = _wait(client, client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h").id,
                 lambda b: b.status in _TERMINAL)
    with pytest.raises(openai.ConflictError, match="completed"):
        client.batches.cancel(done.id)


def test_cancel_mid_job_keeps_partial_output(batch_server):
    client = _client(batch_server)
    lines = _chat_lines(30, max_tokens=32, ignore_eos=True)
    fid = _upload(client, lines)
    batch = client.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    _wait(client, batch.id, lambda b: b.request_counts.completed >= 1)
    with pytest.raises(openai.ConflictError, match="file_in_use|still running"):
        client.files.delete(fid)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, lambda b: b.status in _TERMINAL)
    assert done.status == "cancelled"
    out = _jsonl(client, done.output_file_id)
    assert 1 <= len(out) == done.request_counts.completed < 30
    assert len({o["custom_id"] for o in out}) == len(out)


def _kill(server: LiveServer) -> None:
    """SIGKILL the server and its engine core child: the PIDs this test started, nothing else."""
    kids = server.children()
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(30)
    for k in kids:
        k.kill()


def _committed(batch_dir, bid: str) -> dict[str, str]:
    """custom_id -> output line id of the lines the store has committed (read-only, as a crash left it)."""
    db = sqlite3.connect(f"file:{batch_dir / 'batches.sqlite3'}?mode=ro", uri=True)
    try:
        return {cid: json.loads(out)["id"] for cid, out in
                db.execute("SELECT custom_id, output FROM results WHERE batch_id = ?", (bid,))}
    finally:
        db.close()


def test_sigkill_mid_job_then_restart_resumes_without_duplicates(tiny_llama_dir, tmp_path):
    batch_dir = tmp_path / "batches"
    flags = (*TINY_SERVER_FLAGS, "--batch-dir", str(batch_dir), "--max-batch-inflight", "2")
    server = start_server(tiny_llama_dir, *flags, tmp_dir=tmp_path)
    try:
        client = _client(server)
        lines = _chat_lines(8, max_tokens=16, ignore_eos=True)
        batch = client.batches.create(input_file_id=_upload(client, lines), endpoint=CHAT, completion_window="24h")
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 2)
        _kill(server)
    finally:
        server.stop(5)
    before = _committed(batch_dir, batch.id)
    assert 2 <= len(before) < 8, "the job must be cut off mid-way for this test to mean anything"
    server = start_server(tiny_llama_dir, *flags, tmp_dir=tmp_path)
    try:
        client = _client(server)
        done = _wait(client, batch.id, lambda b: b.status in _TERMINAL)
        assert done.status == "completed"
        assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
        out = _jsonl(client, done.output_file_id)
    finally:
        server.stop()
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]  # none twice, none missing
    after = {o["custom_id"]: o["id"] for o in out}
    assert {cid: after[cid] for cid in before} == before  # lines committed before the kill were not rerun
