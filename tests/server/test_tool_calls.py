"""Tool requests without a model: checks (400 naming the field), the constraint schemas, response building
and the streaming of calls, however the text is split into deltas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tokenmill.server.errors import APIError
from tokenmill.server.tool_calls import plan_tools
from tokenmill.server.tool_stream import ToolCallStream

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Now"}}


def plan(tools=(WEATHER, TIME), choice=None, parallel=None, parser="hermes", max_tools=128):
    return plan_tools(list(tools) if tools is not None else None, choice, parallel, auto_parser=parser,
                      max_tools=max_tools)


def rejected(param: str, match: str, **kw) -> None:
    with pytest.raises(APIError) as e:
        plan(**kw)
    assert e.value.status == 400 and e.value.param == param
    assert match in e.value.message, e.value.message


def test_default_choice_is_auto_with_a_parser_else_none():
    assert plan().mode == "auto"
    assert plan(parser=None).mode == "none"
    assert plan(tools=None).mode == "none" and plan(tools=None).tools == []


@pytest.mark.parametrize("kw, param, match", [
    ({"choice": "required", "tools": None}, "tool_choice", "requires `tools`"),
    ({"choice": {"type": "function", "function": {"name": "get_weather"}}, "tools": None}, "tool_choice",
     "no `tools`"),
    ({"choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope' is not in tools"),
    ({"choice": {"type": "function"}}, "tool_choice", "must be {\"type\": \"function\""),
    ({"choice": "sometimes"}, "tool_choice", "must be \"none\", \"auto\", \"required\""),
    ({"choice": "auto", "parser": None}, "tool_choice", "--enable-auto-tool-choice and --tool-call-parser"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools",
     "tools[0].function.name=None"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "invalid tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "tools[0].function.parameters: must be a JSON schema of type \"object\""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools", "parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools have this name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "1-64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools", "unknown keys"),
    ({"max_tools": 1}, "tools", "2 tools given, at most 1"),
])
def test_bad_tool_requests_name_the_field(kw, param, match):
    rejected(param, match, **kw)


def test_required_schema_accepts_calls_and_refuses_others():
    p = plan(choice="required")
    schema = p.structured_outputs().json
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time",
                                                                                 "arguments": {}}], schema)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = plan(choice="required", parallel=False).structured_outputs().json
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, one)


def test_named_schema_is_the_functions_parameters():
    p = plan(choice={"type": "function", "function": {"name": "get_weather"}})
    assert p.mode == "named" and p.structured_outputs().json == WEATHER["function"]["parameters"]
    assert plan(choice={"type": "function", "function": {"name": "get_time"}}).structured_outputs().json == \
        {"type": "object"}
    assert plan().structured_outputs() is None and plan(choice="none").structured_outputs() is None


def test_extract_and_finish_reason_per_choice():
    req = plan(choice="required")
    out = req.extract('[{"name": "get_time", "arguments": {}}]')
    assert [c.name for c in out.calls] == ["get_time"] and req.finish_reason("stop", True) == "tool_calls"
    assert req.extract('[{"name": "get_ti').calls == []  # cut by max_tokens: left as text
    named = plan(choice={"type": "function", "function": {"name": "get_weather"}})
    out = named.extract('{"city": "Oslo"}')
    assert out.calls[0].name == "get_weather" and json.loads(out.calls[0].arguments) == {"city": "Oslo"}
    assert named.finish_reason("stop", True) == "stop"
    auto = plan()
    assert auto.finish_reason("stop", True) == "tool_calls" and auto.finish_reason("length", True) == "length"
    assert auto.finish_reason("stop", False) == "stop"


def assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """Content and calls as the openai client's users assemble them from stream deltas."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert call["id"] is None and tc["type"] == "function"  # id/type/name come once, first
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
            call["arguments"] += tc["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def run_stream(p, pieces: list[str], reason: str = "stop") -> tuple[str, list[dict], str | None]:
    s = ToolCallStream(p)
    deltas = [d for piece in pieces for d in s.feed(piece)]
    more, final = s.finish(reason)
    content, calls = assemble(deltas + more)
    return content, calls, final


HERMES_TEXT = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
               '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


@pytest.mark.parametrize("split", ["whole", "chars", "sevens"])
def test_auto_stream_same_calls_however_split(split):
    pieces = {"whole": [HERMES_TEXT], "chars": list(HERMES_TEXT),
              "sevens": [HERMES_TEXT[i:i + 7] for i in range(0, len(HERMES_TEXT), 7)]}[split]
    content, calls, reason = run_stream(plan(), pieces)
    assert content == "Checking. " and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                       ("get_time", {})]
    assert all(c["id"].startswith("chatcmpl-tool-") for c in calls) and calls[0]["id"] != calls[1]["id"]


def test_auto_stream_holds_a_marker_prefix_and_releases_plain_text():
    s = ToolCallStream(plan())
    assert s.feed("Hello <tool") == [{"content": "Hello "}]  # "<tool" may open a call: held
    assert s.feed("box> ok") == [{"content": "<toolbox> ok"}]  # not a marker after all: released
    assert s.feed(" <tool_call>{") == [{"content": " "}]  # from a whole marker on, everything is held
    assert s.feed("not json") == []
    assert s.finish("stop") == ([{"content": "<tool_call>{not json"}], "stop")  # no call: the held text


def test_required_stream_parsed_at_the_end():
    text = '[{"name": "get_weather", "arguments": {"city": "Rome"}}]'
    content, calls, reason = run_stream(plan(choice="required"), [text[:10], text[10:]])
    assert content == "" and reason == "tool_calls" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"}


def test_named_stream_sends_arguments_as_they_come():
    s = ToolCallStream(plan(choice={"type": "function", "function": {"name": "get_weather"}}))
    first = s.feed('{"city"')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert s.feed(': "Oslo"}') == [{"tool_calls": [{"index": 0, "function": {"arguments": ': "Oslo"}'}}]}]
    assert s.finish("stop") == ([], "stop")


def test_cli_flags_need_each_other_and_a_known_parser():
    import typer

    from tokenmill.server.cli import _tool_parser

    assert _tool_parser(True, "pythonic") == "pythonic" and _tool_parser(False, None) is None
    for enabled, name, match in ((True, None, "needs a parser"), (False, "hermes", "only with"),
                                 (True, "mistral", "must be one of hermes, llama3_json, pythonic")):
        with pytest.raises(typer.BadParameter, match=match):
            _tool_parser(enabled, name)
