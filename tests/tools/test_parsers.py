"""The tool-call parsers: one call, several calls, text before, and malformed output left as text."""

from __future__ import annotations

import json

import pytest

from tokenmill.tools import TOOL_PARSERS, ParsedToolCall, get_tool_parser


def calls(name: str, text: str) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in get_tool_parser(name).extract(text).calls]


def test_registry_names_and_unknown_parser():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "pythonic"}
    with pytest.raises(ValueError, match="tool_call_parser='nope'.*hermes, llama3_json, pythonic"):
        get_tool_parser("nope")


# ---- hermes ----

def test_hermes_one_call():
    out = get_tool_parser("hermes").extract('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                            '</tool_call>')
    assert out.calls == [ParsedToolCall("get_weather", '{"city": "Paris"}')]
    assert out.content is None


def test_hermes_several_calls_and_text_before():
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {"y": [1, 2]}}</tool_call>')
    out = get_tool_parser("hermes").extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert out.content == "Let me check.\n"


def test_hermes_unclosed_last_block_still_parses():
    assert calls("hermes", '<tool_call>{"name": "a", "arguments": {}}') == [("a", {})]


@pytest.mark.parametrize("text", [
    "no calls here",
    '<tool_call>{"name": "a", "arguments": {"x": 1}</tool_call>',  # broken JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>oops</tool_call>',  # half good
])
def test_hermes_malformed_is_text(text):
    out = get_tool_parser("hermes").extract(text)
    assert out.calls == [] and out.content == text


# ---- llama3_json ----

def test_llama3_one_call_parameters_or_arguments():
    assert calls("llama3_json", '{"name": "f", "parameters": {"a": 1}}') == [("f", {"a": 1})]
    assert calls("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"a": "x"}}') == [("f", {"a": "x"})]


def test_llama3_several_calls_and_text_before():
    out = get_tool_parser("llama3_json").extract('Sure: {"name": "f", "parameters": {}}; {"name": "g", '
                                                  '"parameters": {"b": true}}')
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [("f", {}), ("g", {"b": True})]
    assert out.content == "Sure: "


@pytest.mark.parametrize("text", [
    "plain answer",
    '{"name": "f", "parameters": {"a": 1}',  # cut short
    '{"name": "f", "parameters": {}} and then prose',  # trailing text is not a call
    '{"title": "not a call"}',
])
def test_llama3_malformed_is_text(text):
    out = get_tool_parser("llama3_json").extract(text)
    assert out.calls == [] and out.content == text


# ---- pythonic ----

def test_pythonic_one_call():
    assert calls("pythonic", '[get_weather(city="Paris", days=3)]') == [("get_weather", {"city": "Paris", "days": 3})]


def test_pythonic_several_calls_text_before_and_literals():
    out = get_tool_parser("pythonic").extract("I'll call two tools.\n[a(x=[1, 2], y={'k': None}), "
                                              "mod.b(flag=True, other=false)]")
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("a", {"x": [1, 2], "y": {"k": None}}), ("mod.b", {"flag": True, "other": False})]
    assert out.content == "I'll call two tools."


def test_pythonic_code_fence_is_stripped():
    assert calls("pythonic", '```tool_code\n[f(a=1)]\n```') == [("f", {"a": 1})]


@pytest.mark.parametrize("text", [
    "the list [1, 2, 3] is not a call",
    "[f(1)]",  # positional arguments have no names
    "[f(a=os.system('rm -rf /'))]",  # not a literal: never evaluated
    "[f(**kw)]",
    "[f(a=1)",  # unclosed
    "[f(a={1, 2})]",  # a set has no JSON form
])
def test_pythonic_malformed_is_text(text):
    out = get_tool_parser("pythonic").extract(text)
    assert out.calls == [] and out.content == text
