"""Separate servers for what would disturb the shared one: auth, 429 admission, chat-template override,
503 while loading, killing the engine core, a graceful SIGTERM drain; plus /v1/embeddings on MiniLM."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import struct
import time

import httpx
import openai
import psutil
import pytest

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server, wait_healthy

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
KEY = "s3cret"


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, minilm_dir, tmp_path_factory):
    """Three servers started together (loading overlaps): `guarded`, `victim` and `embedder` (which the
    orphan test kills after the embedding tests)."""
    tmp = tmp_path_factory.mktemp("resilience")
    (tmp / "template.jinja").write_text(TEMPLATE)
    guarded = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS[:-4], "--max-num-seqs", "2", "--max-queued-requests", "1",
                           "--served-model-name", "tiny", "--chat-template", str(tmp / "template.jinja"),
                           "--drain-timeout", "60", tmp_dir=tmp, env={"TOKENMILL_API_KEY": KEY}, wait_ready=False)
    victim = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, tmp_dir=tmp, wait_ready=False)
    embedder = start_server(minilm_dir, "--served-model-name", "minilm", "--task", "embed", tmp_dir=tmp,
                            wait_ready=False)
    everyone = (guarded, victim, embedder)
    try:
        for s in everyone:
            wait_healthy(s)
        yield everyone
    finally:
        for s in everyone:
            s.stop(10)


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_503_while_loading(servers):
    guarded = servers[0]
    assert guarded.startup_responses, "the port opens before the model is loaded"
    for status, body in guarded.startup_responses:
        assert status == 503
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}


def test_api_key(servers):
    url = servers[0].url
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, auth("wrong"), {"Authorization": "Basic abc"}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.post(url + "/v1/completions", json=body, headers=auth()).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # probes need no key
    assert httpx.get(url + "/metrics").status_code == 200


def test_chat_template_override(servers):
    url = servers[0].url
    r = httpx.post(url + "/tokenize", headers=auth(), json={"messages": [{"role": "user", "content": "Hello"}]})
    ids = r.json()["tokens"]
    text = httpx.post(url + "/detokenize", headers=auth(), json={"tokens": ids}).json()["prompt"]
    assert text == "[user] Hello\n[assistant]"


def test_request_chat_template_needs_trust(servers):
    """Without --trust-request-chat-template a request's own template is refused before it renders."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "chat_template": "{{ 'x' }}"}
    r = httpx.post(servers[0].url + "/v1/chat/completions", headers=auth(), json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    del body["chat_template"]
    assert httpx.post(servers[0].url + "/v1/chat/completions", headers=auth(), json=body).status_code == 200


def test_429_over_queue_limit(servers):
    """2 batch slots + 1 queued sequence are admitted, every request past them is turned away: exactly 3."""
    url = servers[0].url

    async def one(client: httpx.AsyncClient, max_tokens: int) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True})

    async def in_flight(client: httpx.AsyncClient) -> int:
        return (await client.get("/debug/stats")).json()["in_flight_seqs"]

    async def main() -> tuple[list[httpx.Response], list[httpx.Response], int]:
        async with httpx.AsyncClient(base_url=url, headers=auth(), timeout=120) as client:
            assert await in_flight(client) == 0
            admitted = [asyncio.create_task(one(client, 200)) for _ in range(3)]
            deadline = time.monotonic() + 30
            while await in_flight(client) < 3:  # the three are in: two running, one queued
                assert time.monotonic() < deadline, "the first three requests were never all admitted"
                await asyncio.sleep(0.01)
            refused = await asyncio.gather(*(one(client, 2) for _ in range(5)))
            # still 3 in flight after the refusals: no slot was freed meanwhile, so 3 is the exact count
            still = await in_flight(client)
            return await asyncio.gather(*admitted), refused, still

    admitted, refused, still = asyncio.run(main())
    assert still == 3
    assert [r.status_code for r in admitted] == [200] * 3
    assert [r.status_code for r in refused] == [429] * 5
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"


def test_embeddings(servers, minilm_dir):
    url = servers[2].url
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    texts = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today."]
    r = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vecs)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2  # a real sentence encoder, not noise
    # the offline engine gives the same vectors
    import tokenmill

    offline = [o.outputs.embedding for o in tokenmill.LLM(str(minilm_dir), dtype="float32", task="embed").embed(texts)]
    assert all(abs(x - y) < 1e-4 for v, w in zip(vecs, offline) for x, y in zip(v, w))
    b64 = client.embeddings.create(model="minilm", input=texts[:1], encoding_format="base64").data[0].embedding
    decoded = struct.unpack("<384f", base64.b64decode(b64))  # little-endian float32, as OpenAI sends
    assert all(abs(x - y) < 1e-6 for x, y in zip(decoded, vecs[0]))
    gen = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
    assert gen.status_code == 400 and gen.json()["error"]["code"] == "wrong_task"


def test_core_exits_when_server_is_killed(servers):
    orphaned = servers[2]  # the embedding tests are done with it
    core_pid = httpx.get(orphaned.url + "/debug/stats").json()["core_pid"]
    core = psutil.Process(core_pid)
    orphaned.proc.send_signal(signal.SIGKILL)  # no clean-up code runs in the server
    orphaned.proc.wait(10)
    core.wait(15)  # the core notices its parent is gone and exits by itself (raises if it does not)
    assert not core.is_running()


def test_kill_core_fails_in_flight_and_health(servers):
    victim = servers[1]
    url = victim.url
    core_pid = httpx.get(url + "/debug/stats").json()["core_pid"]
    assert core_pid in [p.pid for p in victim.children()]
    body = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: {")
        os.kill(core_pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert err["code"] == "engine_dead" and "core" in err["message"]
    h = httpx.get(url + "/health")
    assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert victim.stop(20) == 0
    assert not psutil.pid_exists(core_pid) or psutil.Process(core_pid).status() == psutil.STATUS_ZOMBIE


def test_sigterm_drains_then_exits_zero(servers):
    guarded = servers[0]
    url = guarded.url
    kids = guarded.children()
    assert kids
    body = {"prompt": "Hello", "max_tokens": 48, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, headers=auth()) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        guarded.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 503:  # draining: not ready any more
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(url + "/v1/completions", headers=auth(), json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        rest = [line for line in lines if line]
    # the in-flight stream ran to completion during the drain
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert guarded.proc.wait(30) == 0
    # the engine core and multiprocessing's resource tracker go with the server (the tracker notices the
    # closed pipe a moment after the server exits)
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def test_missing_model_is_a_usage_error(tmp_path):
    server = start_server(tmp_path / "no-such-model", tmp_dir=tmp_path, wait_ready=False)
    try:
        assert server.proc.wait(120) == 2  # refused by the CLI before any engine starts
    finally:
        server.stop(5)
    assert "no such file or folder" in server.log() and "Traceback" not in server.log()


def test_unloadable_model_exits_nonzero(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))  # passes the CLI's path check, fails in the engine's loader
    server = start_server(broken, tmp_dir=tmp_path, wait_ready=False)
    try:
        assert server.proc.wait(120) == 1
    finally:
        server.stop(5)
