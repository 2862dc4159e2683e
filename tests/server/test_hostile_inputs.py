"""Hostile inputs against a live `tokenmill serve` (the tiny Llama: vocab 512, max_model_len 256): every one
gets a 4xx in OpenAI's error shape naming the field, never a 5xx, and the same keep-alive connection then
serves a good request. Cases marked "fuzz" are regressions found by tests/server/test_fuzz_api.py or by
trying the server as a new user (issue 15)."""

from __future__ import annotations

import http.client
import json
import math
import socket
from urllib.parse import urlparse

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.polling import wait_until
from tokenmill.server.body import parse_json_object
from tokenmill.server.errors import APIError

HI = [{"role": "user", "content": "hi"}]
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def _raw(text: str) -> bytes:
    return text.encode()


# (case id, path, body: dict (sent as JSON) or bytes, extra headers, status, param, code)
CASES = [
    ("nested-json-5000", CMPL, b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, None, "invalid_json"),
    ("nested-json-200", CMPL, b'{"prompt": "hi", "response_format": ' + b'{"a": ' * 200 + b"1" + b"}" * 200 + b"}", {},
     400, "response_format.a.a.a...", "invalid_parameter"),  # a long path is cut: "..." matches a prefix
    ("seed-2^70", CMPL, {"prompt": "hi", "seed": 2**70}, {}, 400, "seed", "invalid_parameter"),
    ("seed-below-int64", CMPL, {"prompt": "hi", "seed": -(2**63) - 1}, {}, 400, "seed", "invalid_parameter"),
    ("top_k-2^70", CMPL, {"prompt": "hi", "top_k": 2**70}, {}, 400, "top_k", None),
    ("priority-2^70", CMPL, {"prompt": "hi", "priority": 2**70}, {}, 400, "priority", None),
    ("stop_token_ids-2^70", CMPL, {"prompt": "hi", "stop_token_ids": [2**70]}, {}, 400, "stop_token_ids[0]", None),
    ("stop_token_ids-oov", CMPL, {"prompt": "hi", "stop_token_ids": [512]}, {}, 400, "stop_token_ids", None),
    ("stop_token_ids-many", CMPL, {"prompt": "hi", "stop_token_ids": [1] * 1025}, {}, 400, "stop_token_ids", None),
    ("logit_bias-oov", CMPL, {"prompt": "hi", "logit_bias": {"99999": 5}}, {}, 400, "logit_bias", None),
    ("logit_bias-negative", CMPL, {"prompt": "hi", "logit_bias": {"-1": 5}}, {}, 400, "logit_bias", None),
    ("logit_bias-huge-map", CMPL, {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(5000)}}, {}, 400,
     "logit_bias", None),
    ("chat-logit_bias-oov", CHAT, {"messages": HI, "logit_bias": {"512": 1}}, {}, 400, "logit_bias", None),
    ("stop-5000-strings", CMPL, {"prompt": "hi", "stop": [f"s{i}" for i in range(5000)]}, {}, 400, "stop", None),
    ("stop-long-strings", CMPL, {"prompt": "hi", "stop": ["a" * 5000, "b" * 5000]}, {}, 400, "stop", None),
    ("NaN", CMPL, _raw('{"prompt": "hi", "temperature": NaN}'), {}, 400, "temperature", "invalid_parameter"),
    ("Infinity", CMPL, _raw('{"prompt": "hi", "top_p": Infinity}'), {}, 400, "top_p", "invalid_parameter"),
    ("-Infinity-bias", CMPL, _raw('{"prompt": "hi", "logit_bias": {"5": -Infinity}}'), {}, 400, "logit_bias.5", None),
    ("1e999", CMPL, _raw('{"prompt": "hi", "repetition_penalty": 1e999}'), {}, 400, "repetition_penalty", None),
    ("1e308-top_p", CMPL, {"prompt": "hi", "top_p": 1e308}, {}, 400, "top_p", None),
    ("1e308-penalty", CHAT, {"messages": HI, "presence_penalty": 1e308}, {}, 400, "presence_penalty", None),
    ("NaN-in-schema", CMPL, _raw('{"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": '
                                 '{"name": "x", "schema": {"type": "number", "maximum": NaN}}}}'), {}, 400,
     "response_format.json_schema.schema.maximum", None),
    ("int-5000-digits", CMPL, b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", {}, 400, None, "invalid_json"),
    ("max_tokens-negative", CMPL, {"prompt": "hi", "max_tokens": -1}, {}, 400, "max_tokens", None),
    ("max_tokens-fraction", CMPL, {"prompt": "hi", "max_tokens": 2.5}, {}, 400, "max_tokens", None),
    ("max_completion_tokens-fraction", CHAT, {"messages": HI, "max_completion_tokens": 0.5}, {}, 400,
     "max_completion_tokens", None),
    ("n-huge", CMPL, {"prompt": "hi", "n": 10**9}, {}, 400, "n", None),
    ("chat-n-huge", CHAT, {"messages": HI, "n": 129}, {}, 400, "n", None),
    ("best_of-huge", CMPL, {"prompt": "hi", "best_of": 10**9}, {}, 400, "best_of", None),
    ("seqs-per-request", CMPL, {"prompt": ["hi"] * 9, "n": 128}, {}, 400, "prompt", None),
    ("logprobs-21", CMPL, {"prompt": "hi", "logprobs": 21}, {}, 400, "logprobs", None),
    ("logprobs-negative", CMPL, {"prompt": "hi", "logprobs": -1}, {}, 400, "logprobs", None),
    ("top_logprobs-21", CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, {}, 400, "top_logprobs", None),
    ("prompt_logprobs-21", CMPL, {"prompt": "hi", "prompt_logprobs": 21}, {}, 400, "prompt_logprobs", None),
    ("prompt-ids-oov", CMPL, {"prompt": [1, 2, 512]}, {}, 400, "prompt", None),
    ("prompt-ids-negative", CMPL, {"prompt": [[1, -1]]}, {}, 400, "prompt", None),
    ("prompt-ids-2^70", CMPL, {"prompt": [2**70]}, {}, 400, "prompt", None),
    ("prompt-chars", CMPL, {"prompt": "a" * 9000}, {}, 400, "prompt", "context_length_exceeded"),
    ("prompt-chars-list", CMPL, {"prompt": ["a" * 5000, "b" * 5000]}, {}, 400, "prompt", "context_length_exceeded"),
    ("messages-chars", CHAT, {"messages": [{"role": "user", "content": "a" * 9000}]}, {}, 400, "messages",
     "context_length_exceeded"),
    ("tokenize-chars", "/tokenize", {"prompt": "a" * 9000}, {}, 400, "prompt", "context_length_exceeded"),
    ("invalid-utf8", CMPL, b'{"prompt": "\xff\xfe hi"}', {}, 400, None, "invalid_encoding"),
    ("lone-surrogate", CMPL, _raw('{"prompt": "hi \\ud800"}'), {}, 400, "prompt", None),
    ("lone-surrogate-chat", CHAT, _raw('{"messages": [{"role": "user", "content": "\\udfff"}]}'), {}, 400,
     "messages[0].content", None),
    ("lone-surrogate-tokenize", "/tokenize", _raw('{"prompt": "\\udc00"}'), {}, 400, "prompt", None),
    ("text/plain", CMPL, {"prompt": "hi"}, {"Content-Type": "text/plain"}, 415, None, "unsupported_media_type"),
    ("form-urlencoded", CMPL, b"prompt=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None,
     "unsupported_media_type"),
    ("multipart-to-chat", CHAT, b"--x\r\n\r\n--x--", {"Content-Type": "multipart/form-data; boundary=x"}, 415, None,
     "unsupported_media_type"),
    ("unknown-field", CMPL, {"prompt": "hi", "max_token": 3}, {}, 400, "max_token", None),
    ("unknown-nested-field", CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, {}, 400,
     "messages[0].mood", None),
    ("not-an-object", CMPL, b"[1, 2]", {}, 400, None, "invalid_json"),
    ("detokenize-oov", "/detokenize", {"tokens": [2**70]}, {}, 400, "tokens", None),
    ("template-mro", CHAT, {"messages": HI, "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, {},
     400, "chat_template", None),
    ("fuzz-tool-call-arguments-not-an-object", CHAT, {"messages": [*HI, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "NULL"}}]}]}, {}, 400, "messages", None),
    ("chat_template_kwargs-clash", CHAT, {"messages": HI, "chat_template_kwargs": {"messages": 5}}, {}, 400,
     "chat_template_kwargs", None),
]


@pytest.fixture(scope="module")
def conn(tiny_server):
    url = urlparse(tiny_server.url)
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    yield c
    c.close()


def _send(c: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    c.request("POST", path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read()


def assert_openai_error(status: int, raw: bytes, want_status: int, param: str | None, code: str | None) -> dict:
    assert status == want_status, raw[:500]
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None and param.endswith("..."):
        assert err["param"].startswith(param[:-3]) and err["param"].endswith("..."), err
    else:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_4xx_and_the_connection_keeps_serving(conn, case):
    _, path, body, headers, status, param, code = case
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    got, answer = _send(conn, path, raw, {**JSON, **headers})
    assert_openai_error(got, answer, status, param, code)
    sock = conn.sock
    assert sock is not None, "the server closed the connection after the error"
    got, answer = _send(conn, CMPL, json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), JSON)
    assert got == 200, answer[:300]
    assert conn.sock is sock, "the good request needed a new connection"
    assert json.loads(answer)["choices"][0]["finish_reason"] == "length"


def test_sandboxed_template_cannot_reach_the_host(tiny_server, tmp_path):
    marker = tmp_path / "pwned"
    evil = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
    r = httpx.post(tiny_server.url + CHAT, json={"messages": HI, "chat_template": evil}, timeout=60)
    err = assert_openai_error(r.status_code, r.content, 400, "chat_template", "invalid_parameter")
    assert "unsafe" in err["message"]
    assert not marker.exists()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(tiny_server, chunked):
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    content = (big[i:i + 65536] for i in range(0, len(big), 65536)) if chunked else big
    with httpx.Client(timeout=60) as client:
        r = client.post(tiny_server.url + CMPL, content=content, headers=JSON)
        assert_openai_error(r.status_code, r.content, 413, None, "request_too_large")
        assert client.post(tiny_server.url + CMPL, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_openai_client_extra_body_fields_keep_working(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=3, seed=2**63 - 1, stop=["x"] * 128,
                                    logit_bias={"5": 100}, extra_body={"top_k": 1, "min_p": 0.0, "ignore_eos": True,
                                                                       "stop_token_ids": [511], "priority": -5})
    assert out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", extra_body={"top_kk": 1})
    assert info.value.body["param"] == "top_kk"


def _stats(url: str) -> dict:
    return httpx.get(url + "/debug/stats", timeout=10).json()


def test_client_disconnect_aborts_the_request_and_frees_its_kv(tiny_server):
    """A non-streamed request whose client leaves while it runs is aborted in the engine (it does not run to
    max_tokens) and every KV block comes back, without an error traceback in the server log."""
    url = urlparse(tiny_server.url)
    log_start = len(tiny_server.log())
    n, max_tokens = 32, 240
    before = _stats(tiny_server.url)["engine"]
    body = json.dumps({"prompt": "hi", "n": n, "max_tokens": max_tokens, "ignore_eos": True}).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        wait_until(lambda: _stats(tiny_server.url)["engine"]["num_running"] > 0, 60, "the request to be scheduled",
                   interval_s=0.02)
        running = _stats(tiny_server.url)["engine"]
        assert running["num_blocks_free"] < running["num_blocks_total"]  # it holds KV now
    finally:
        sock.close()
    after = wait_until(lambda: (s := _stats(tiny_server.url)) and s["in_flight_seqs"] == 0
                  and s["engine"]["num_running"] == 0 and s["engine"]["num_waiting"] == 0 and s, 60,
                  "the aborted request to leave the engine", interval_s=0.02)
    engine = after["engine"]
    assert engine["num_blocks_free"] == engine["num_blocks_total"]
    generated = engine["num_generation_tokens"] - before["num_generation_tokens"]
    assert generated < n * max_tokens, "the request ran to completion: it was not aborted"
    r = httpx.post(tiny_server.url + CMPL, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert "Traceback" not in tiny_server.log()[log_start:]



_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                     max_leaves=40)


def _hostile(v) -> bool:
    """The oracle: a non-finite number or a lone surrogate anywhere."""
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in v)
    if isinstance(v, list):
        return any(_hostile(x) for x in v)
    if isinstance(v, dict):
        return any(_hostile(k) or _hostile(x) for k, x in v.items())
    return False


@given(_JSON)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_body_parser_accepts_clean_json_and_refuses_the_rest_with_a_400(value):
    raw = json.dumps({"v": value}).encode()  # NaN / Infinity / \ud800 escapes, as a client could send them
    try:
        data = parse_json_object(raw)
    except APIError as exc:
        assert exc.status == 400 and _hostile(value), exc.message
        assert exc.param is not None and exc.param.startswith("v")
    else:
        assert not _hostile(value)
        assert data == {"v": value}


@given(st.binary(max_size=64) | st.integers(1, 400).map(lambda d: b"[" * d + b"]" * d))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_body_parser_raises_nothing_but_400s(raw):
    try:
        parse_json_object(b'{"a": ' + raw + b"}", max_depth=128)
    except APIError as exc:
        assert exc.status == 400
