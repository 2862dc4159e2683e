"""Tool calling end to end: the `openai` client against a tiny-model server started with
--enable-auto-tool-choice --tool-call-parser hermes.

The tiny model's weights are random, so calls come from the constraints: `required` and a named function are
JSON-constrained by the server; for `auto`, a regex constraint (vLLM's structured_outputs field) makes the
model write a hermes call that the parser must find.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# A template that renders tools itself (so it is used as is), compactly: the tiny model has 512 positions.
COMPACT_TEMPLATE = ("{% for t in tools or [] %}{{ t.function.name }};{% endfor %}{% for m in messages %}"
                    "<|{{ m.role }}|>{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}"
                    "{% endfor %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
HERMES_CALL = '<tool_call>{"name": "get_time", "arguments": {"utc": true}}</tool_call>'


@pytest.fixture(scope="module")
def tools_server(tiny_llama_dir, tmp_path_factory):
    flags = [f for f in TINY_SERVER_FLAGS]
    flags[flags.index("--max-model-len") + 1] = "512"  # the model's limit: tool definitions take room
    server = start_server(tiny_llama_dir, *flags, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                          "--chat-template", COMPACT_TEMPLATE,
                          tmp_dir=tmp_path_factory.mktemp("tools"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tools_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tools_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(client, stream=False, **kw):
    kw = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.type, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return m.content, calls, r.choices[0].finish_reason
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "type": None, "name": "", "arguments": ""})
                if tc.id:
                    assert c["id"] is None, "id sent twice for one call"
                    c["id"], c["type"], c["name"] = tc.id, tc.type, tc.function.name
                c["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return (content or None), [(c["id"], c["type"], c["name"], c["arguments"]) for _, c in sorted(calls.items())], \
        reason


def check_calls(calls):
    assert calls
    for call_id, kind, name, arguments in calls:
        assert call_id.startswith("chatcmpl-tool-") and kind == "function"
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_gives_calls_that_validate(client, stream):
    content, calls, reason = create(client, stream, tool_choice="required", parallel_tool_calls=False)
    assert content is None and reason == "tool_calls" and len(calls) == 1
    check_calls(calls)


def test_required_stream_and_whole_response_agree(client):
    whole = create(client, False, tool_choice="required")
    streamed = create(client, True, tool_choice="required")
    assert [c[2:] for c in whole[1]] == [c[2:] for c in streamed[1]] and whole[2] == streamed[2]
    if whole[2] == "tool_calls":  # unless the random model ran to max_tokens, every call validates
        check_calls(whole[1])


def test_required_with_n_samples_each_choice_has_its_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, n=3, temperature=1.0, seed=7, max_tokens=200)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        check_calls([(c.id, c.type, c.function.name, c.function.arguments) for c in ch.message.tool_calls])
    ids = [c.id for ch in r.choices for c in ch.message.tool_calls]
    assert len(set(ids)) == len(ids)


def test_tool_constraints_are_counted_as_tools(client, tools_server):
    def tools_count() -> float:
        text = httpx.get(tools_server.url + "/metrics", timeout=30).text
        m = re.search(r'tokenmill_constrained_requests_total{kind="tools",model_name="[^"]+"} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    before = tools_count()
    create(client, tool_choice="required", max_tokens=60)
    create(client, tool_choice="none", max_tokens=2)  # not constrained: not counted
    assert tools_count() == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_finishes_with_stop(client, stream):
    content, calls, reason = create(client, stream, tool_choice=NAMED)
    assert reason == "stop" and [c[2] for c in calls] == ["get_weather"] and not content
    check_calls(calls)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_hermes_call(client, stream):
    content, calls, reason = create(client, stream, tool_choice="auto",
                                    extra_body={"structured_outputs": {"regex": "Sure\\. " + _re(HERMES_CALL)}})
    assert content == "Sure. " and reason == "tool_calls"
    assert [(c[2], json.loads(c[3])) for c in calls] == [("get_time", {"utc": True})]
    check_calls(calls)


def test_auto_is_the_default_and_plain_text_stays_content(client):
    for stream in (False, True):
        content, calls, reason = create(client, stream, max_tokens=8)
        assert calls == [] and isinstance(content, str) and reason in ("stop", "length")


def test_none_never_returns_calls(client):
    for stream in (False, True):
        content, calls, _ = create(client, stream, tool_choice="none", max_tokens=150,
                                   extra_body={"structured_outputs": {"regex": _re(HERMES_CALL)}})
        assert calls == [] and content == HERMES_CALL  # "none": the text is the answer, unparsed


def test_earlier_calls_and_tool_results_are_accepted(client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    content, calls, _ = create(client, messages=history, tool_choice="none", max_tokens=5)
    assert isinstance(content, str) and calls == []


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"not": {}}}}}}],
      "tool_choice": "required"}, "tools"),  # a schema feature the constraint cannot enforce
    ({"tools": [WEATHER] * 2}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_get_400_naming_the_field(tools_server, body, param):
    payload = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    ok = httpx.post(tools_server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES,
                                                                    "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # the server keeps serving


def test_auto_without_the_flags_is_a_400(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]
    # tools without tool_choice on such a server: the model sees them (its template cannot render tools, so
    # they go into a system turn), no calls are parsed
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "tools": [{"type": "function", "function": {"name": "t"}}]}, timeout=60)
    assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


def _re(text: str) -> str:
    """A regex matching exactly `text` (only the metacharacters escaped, as every regex dialect reads them)."""
    return "".join("\\" + ch if ch in "\\^$.|?*+()[]{}" else ch for ch in text)
