"""The OpenAI-compatible server on a tiny Llama, driven by the official `openai` client and raw HTTP.

One session-scoped server (tests.fixtures.servers.tiny_server) serves every test here.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def sse_events(body: str) -> list[str]:
    """Split an SSE body into its data payloads, checking the framing on the way."""
    assert body.endswith("\n\n"), body[-100:]
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_completion_greedy_usage_and_n(client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, temperature=0, n=2)
    assert r.object == "text_completion" and r.model == MODEL
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_served_greedy_equals_offline_llm(client, tiny_llama_dir):
    import tokenmill

    prompts = ["Hello world", "The quick brown fox", "Once upon a time there was"]
    llm = tokenmill.LLM(str(tiny_llama_dir), max_model_len=256, kv_cache_memory=0.02, dtype="float32")
    params = tokenmill.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    offline = llm.generate(prompts, params)
    tok = llm.loaded.tokenizer
    for prompt, ref in zip(prompts, offline):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}, logprobs=0)
        assert r.choices[0].text == ref.outputs[0].text
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        # token-for-token, not just text: each served token is the offline token (its text, one per id) and
        # carries the offline token's logprob
        ids = ref.outputs[0].token_ids
        assert r.choices[0].logprobs.tokens == [tok.decode([t]) for t in ids]
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(
            [lp[t].logprob for t, lp in zip(ids, ref.outputs[0].logprobs)], abs=1e-4)


def test_token_id_and_list_prompts(client, tiny_server):
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0, n=2)
    assert sorted(c.index for c in both.choices) == [0, 1, 2, 3]
    assert {c.text for c in both.choices} == {by_text.choices[0].text}
    assert both.usage.prompt_tokens == 2 * len(ids) and both.usage.completion_tokens == 20


def test_completion_stream_and_usage(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_non_stream_and_stream(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == r.choices[0].message.content
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_raw_stream_framing_and_done(tiny_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True, "n": 2}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for idx in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == idx]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == "length"


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    if "\ufffd" not in "".join(lp.tokens):  # byte-fallback tokens decode to U+FFFD one by one
        assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and val <= 0
        assert max(top.values()) == pytest.approx(val, abs=1e-5)  # greedy picks the best token
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
               for t in content)


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[5:8]
    cut = base.index(stop)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[:cut]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = {"model": MODEL, "prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    texts = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3, 4)}
    assert len(texts) > 1  # seeds matter: a near-uniform tiny model cannot repeat 12 tokens 4 times


def test_models_tokenize_version(tiny_server):
    u = tiny_server.url
    models = httpx.get(u + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    ids = httpx.post(u + "/tokenize", json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"])
    text = httpx.post(u + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
    chat_ids = httpx.post(u + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert len(chat_ids) > 2
    version = httpx.get(u + "/version").json()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version["version"])
    # the numeric choices the server made, and why (the fixture server runs --dtype float32)
    assert (version["dtype"], version["kv_cache_dtype"], version["device"]) == ("float32", "float32", "cpu")
    assert version["dtype_reason"] == "dtype=float32 requested" and version["cpu"]
    assert models["data"][0]["metadata"]["dtype"] == "float32"
    assert httpx.get(u + "/health").status_code == 200


def test_embeddings_on_generation_model_is_400(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def _engine_idle(url: str, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(url + "/debug/stats").json()
        eng = stats["engine"]
        if (eng["num_running"] == 0 and eng["num_waiting"] == 0 and eng["num_blocks_free"] == eng["num_blocks_total"]
                and stats["in_flight_seqs"] == 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {stats}")
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts_and_frees_blocks(tiny_server):
    url = tiny_server.url
    _engine_idle(url)
    aborted_before = metric(httpx.get(url + "/metrics").text, "tokenmill_request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Hello " * 10, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # a few chunks: the request is running
        assert any(line.startswith("data: {") for line in got)
        running = httpx.get(url + "/debug/stats").json()
        assert running["in_flight_seqs"] == 1
    # leaving the block closes the connection mid-stream
    stats = _engine_idle(url)
    assert stats["engine"]["num_generation_tokens"] > 0
    after = metric(httpx.get(url + "/metrics").text, "tokenmill_request_success_total", finished_reason="abort")
    assert after == aborted_before + 1


def test_disconnect_non_stream_aborts(tiny_server):
    url = tiny_server.url
    _engine_idle(url)
    aborted_before = metric(httpx.get(url + "/metrics").text, "tokenmill_request_success_total", finished_reason="abort")
    payload = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 20
        while httpx.get(url + "/debug/stats").json()["in_flight_seqs"] == 0:  # wait until it is generating
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # socket closed before any response byte: the server must abort the request, not finish it
    _engine_idle(url)
    after = metric(httpx.get(url + "/metrics").text, "tokenmill_request_success_total", finished_reason="abort")
    assert after == aborted_before + 1


def test_fifty_concurrent_streams(tiny_server):
    async def one(client: httpx.AsyncClient, i: int) -> list[dict]:
        body = {"model": MODEL, "prompt": f"Request number {i}:", "max_tokens": 8, "stream": True,
                "ignore_eos": True, "temperature": 0.7, "seed": i}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    async def main() -> list[list[dict]]:
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=60)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(main())
    ids = set()
    for chunks in results:
        assert len({c["id"] for c in chunks}) == 1
        ids.add(chunks[0]["id"])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert all(c["object"] == "text_completion" for c in chunks)
    assert len(ids) == 50
    _engine_idle(tiny_server.url)


def test_metrics_move(tiny_server, client):
    url = tiny_server.url
    before = httpx.get(url + "/metrics").text
    client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0)
    after = httpx.get(url + "/metrics").text
    for name in ("tokenmill_num_requests_running", "tokenmill_num_requests_waiting", "tokenmill_kv_cache_usage_perc",
                 "tokenmill_prefix_cache_queries_total", "tokenmill_prefix_cache_hits_total",
                 "tokenmill_num_preemptions_total", "tokenmill_request_queue_time_seconds_count",
                 "tokenmill_request_prefill_time_seconds_count", "tokenmill_request_decode_time_seconds_count",
                 "tokenmill_inter_token_latency_seconds_count"):
        assert name in after, name
    moved = ("tokenmill_generation_tokens_total", "tokenmill_prompt_tokens_total",
             "tokenmill_time_to_first_token_seconds_count", "tokenmill_e2e_request_latency_seconds_count",
             "tokenmill_prefix_cache_queries_total")
    for name in moved:
        assert metric(after, name, model_name=MODEL) > metric(before, name, model_name=MODEL), name
    assert metric(after, "tokenmill_generation_tokens_total") - metric(before, "tokenmill_generation_tokens_total") == 5
    assert metric(after, "tokenmill_request_success_total", finished_reason="length") == \
        metric(before, "tokenmill_request_success_total", finished_reason="length") + 1
    # the same prompt again is served from the prefix cache
    client.completions.create(model=MODEL, prompt="Hello world " * 8, max_tokens=2, temperature=0)
    client.completions.create(model=MODEL, prompt="Hello world " * 8, max_tokens=2, temperature=0)
    final = httpx.get(url + "/metrics").text
    assert metric(final, "tokenmill_prefix_cache_hits_total") > metric(after, "tokenmill_prefix_cache_hits_total")


def test_echo_logit_bias_and_penalties_reach_the_sampler(client, tiny_server):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hello world")
    forced = httpx.post(tiny_server.url + "/tokenize", json={"prompt": " fox", "add_special_tokens": False}).json()
    tid = forced["tokens"][-1]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                                  logit_bias={str(tid): 100}, logprobs=0)
    assert len(r.choices[0].logprobs.tokens) == 4
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": r.choices[0].text, "add_special_tokens": False})
    assert set(ids.json()["tokens"]) == {tid}
    # frequency_penalty reaches the sampler: the tiny model's greedy run repeats tokens, the penalised one less
    plain = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}, logprobs=0).choices[0].logprobs.tokens
    penalised = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, extra_body={"ignore_eos": True, "min_tokens": 12},
                                          logprobs=0).choices[0].logprobs.tokens
    assert len(set(plain)) < 12
    assert len(penalised) == 12 and len(set(penalised)) > len(set(plain))


def test_dashboard_mounted(tiny_server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    page = httpx.get(tiny_server.url + "/dashboard")
    assert page.status_code == 200 and "<html" in page.text.lower()
    stats = httpx.get(tiny_server.url + "/dashboard/stats").json()
    assert stats["extra"]["model"] == MODEL and stats["extra"]["ready"] is True
    assert stats["extra"]["num_blocks_free"] == stats["extra"]["num_blocks_total"] > 0


def _forced_token(tiny_server) -> int:
    """A token id that logit_bias +100 makes the sampler pick at every step."""
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": " fox", "add_special_tokens": False}).json()
    return ids["tokens"][-1]


def test_sampled_token_listed_in_completion_top_logprobs(client, tiny_server):
    """OpenAI / vLLM: completions top_logprobs holds the top k plus the sampled token when it is not among them."""
    tid = _forced_token(tiny_server)  # logit_bias moves sampling, not the reported (raw) logprobs
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2,
                                  logit_bias={str(tid): 100}, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    outside = 0
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[tok] == pytest.approx(val)
        others = sorted((v for t, v in top.items() if t != tok), reverse=True)
        if len(top) == 3:  # the sampled token ranked below the two best
            outside += 1
            assert len(others) == 2 and val < others[-1]
        else:
            assert len(top) == 2 and val >= min(top.values())
    assert outside > 0, "the forced token should rank outside the top 2 at some step of a random model"
    # chat keeps exactly top_logprobs entries (the k likeliest); the sampled token is the entry itself
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2, logit_bias={str(tid): 100})
    for t in c.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 2 and all(a.logprob >= t.logprob - 1e-6 for a in t.top_logprobs)


def test_stop_token_text_left_out_unless_asked(client, tiny_server):
    tid = _forced_token(tiny_server)
    kw = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "logit_bias": {str(tid): 100}, "logprobs": 0}
    r = client.completions.create(**kw, extra_body={"stop_token_ids": [tid]})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == tid
    assert c.text == "" and len(c.logprobs.tokens) == 1  # the token was generated, its text is not shown
    kept = client.completions.create(**kw, extra_body={"stop_token_ids": [tid], "include_stop_str_in_output": True})
    assert kept.choices[0].text == kept.choices[0].logprobs.tokens[0] != ""
    streamed = list(client.completions.create(**kw, stream=True, extra_body={"stop_token_ids": [tid]}))
    assert "".join(ch.choices[0].text for ch in streamed) == ""
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_stream_options_needs_stream(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       stream_options={"include_usage": True})
    assert info.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=False,
                                  stream_options={"include_usage": True})
    assert "only allowed when 'stream' is enabled" in info.value.body["message"]
