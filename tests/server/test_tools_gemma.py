"""Tool calling on the default Gemma 3 270M (pythonic convention, tools template swapped in): `required` and
a named function give calls that validate against the tools' schemas; `auto` text goes through the parser."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.fixtures.servers import start_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(default_gemma, tmp_path_factory):
    server = start_server(None, "--kv-cache-memory", "0.5", "--max-model-len", "2048", "--max-num-seqs", "8",
                          "--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                          tmp_dir=tmp_path_factory.mktemp("gemma-tools"))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    server.stop()


def calls_of(client, stream: bool, **kw):
    kw = {"model": "gemma-3-270m", "messages": MESSAGES, "tools": [WEATHER], "temperature": 0, "max_tokens": 80,
          **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        return [(c.function.name, c.function.arguments) for c in m.tool_calls or []], r.choices[0].finish_reason
    calls, reason = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, ["", ""])
                c[0] += tc.function.name or ""
                c[1] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return [tuple(c) for _, c in sorted(calls.items())], reason


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_gemma_required_and_named_calls_validate(client, stream):
    calls, reason = calls_of(client, stream, tool_choice="required", parallel_tool_calls=False)
    assert reason == "tool_calls" and [c[0] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    calls, reason = calls_of(client, stream, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reason == "stop" and [c[0] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_gemma_auto_whole_and_streamed_agree(client):
    whole = calls_of(client, False, tool_choice="auto")
    assert whole == calls_of(client, True, tool_choice="auto")
