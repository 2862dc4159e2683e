"""Tools in the prompt: the Gemma tools template, and the rewrite for templates that cannot render tools."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny_models import CHAT_TEMPLATE, make_tokenizer
from tokenmill.model.gguf_tokenizer import GEMMA_CHAT_TEMPLATE
from tokenmill.tools import get_tool_parser
from tokenmill.tools.prompt import gemma_tools_template, with_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Rome", "metric": true}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def render(tok, convo, tools, template, parser=None):
    convo, tools, template = with_tools(convo, tools, template, parser)
    return tok.apply_chat_template(convo, tools=tools, chat_template=template, tokenize=False,
                                   add_generation_prompt=True)


def test_gemma_template_is_swapped_and_renders_tools_calls_and_results(tok):
    text = render(tok, CONVO, [WEATHER], GEMMA_CHAT_TEMPLATE)
    turns = text.split("<start_of_turn>")
    assert turns[0] == tok.bos_token
    first_user = turns[1]
    assert first_user.startswith("user\nBe brief.\n\nYou have access to functions.")
    assert json.dumps(WEATHER["function"]) in first_user  # the definition as JSON
    assert "[func_name1(params_name1=params_value1" in first_user
    assert first_user.endswith("Weather in Paris and Rome?<end_of_turn>\n")
    model_turn = turns[2]
    assert model_turn == 'model\n[get_weather(city="Paris"), get_weather(city="Rome", metric=True)]<end_of_turn>\n'
    # both results share one user turn, in order
    assert turns[3] == "user\n```tool_output\n18C sunny\n```\n```tool_output\n25C\n```\n<end_of_turn>\n"
    assert turns[4] == "model\n"
    # what the template shows as earlier calls, the pythonic parser reads back as the same calls
    calls = get_tool_parser("pythonic").extract(model_turn.removeprefix("model\n").split("<end")[0]).calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Rome", "metric": True})]


def test_gemma_tools_template_without_tools_matches_plain_gemma(tok):
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    ours = tok.apply_chat_template(convo, chat_template=gemma_tools_template(), tokenize=False,
                                   add_generation_prompt=True)
    assert ours == tok.apply_chat_template(convo, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)


def test_template_that_renders_tools_is_kept():
    template = "{% for t in tools %}{{ t.function.name }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    convo, tools, chosen = with_tools([{"role": "user", "content": "x"}], [WEATHER], template)
    assert chosen == template and tools == [WEATHER] and convo[0]["content"] == "x"


@pytest.mark.parametrize("parser, call_text", [
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (None, '[get_weather(city="Paris"), get_weather(city="Rome", metric=True)]'),
])
def test_plain_template_gets_tools_in_system_and_calls_in_parser_format(tok, parser, call_text):
    text = render(tok, CONVO[:4], [WEATHER], CHAT_TEMPLATE, parser)
    assert text.startswith("<s><|system|>Be brief.\n\nYou can call these functions")
    assert "<|user|>Weather in Paris and Rome?</s>" in text
    assert call_text in text
    assert "<|user|>Tool result: 18C sunny</s>" in text and text.endswith("<|assistant|>")
    if parser:  # the server's parser reads the rendered earlier call back
        assert call_text in text and get_tool_parser(parser).extract(call_text).calls[0].name == "get_weather"


def test_no_tools_leaves_conversation_and_template_alone():
    convo = [{"role": "user", "content": "hi"}]
    out, tools, template = with_tools(convo, None, GEMMA_CHAT_TEMPLATE)
    assert tools is None and template == GEMMA_CHAT_TEMPLATE and out == [{"role": "user", "content": "hi"}]
