"""response_format / structured_outputs -> StructuredOutputsParams, and every bad input -> 400 naming the field
(server/structured_outputs.py on the pydantic request models, no server process)."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.tiny_models import make_tokenizer
from tokenmill.config import ServerConfig
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.structured_outputs import (
    end_of_turn_ids,
    request_structured_outputs,
    request_structured_outputs_async,
    with_constraint,
)

CONFIG = ServerConfig()
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"]}


def parse(**fields) -> StructuredOutputsParams | None:
    body = CompletionRequest.model_validate({"prompt": "hi", **fields})
    return request_structured_outputs(body, CONFIG)


def rejected(param: str, *needles: str, config: ServerConfig = CONFIG, **fields) -> str:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})
    with pytest.raises(APIError) as info:
        request_structured_outputs(body, config)
    err = info.value
    assert (err.status, err.param, err.code) == (400, param, "invalid_parameter"), err.message
    for needle in needles:
        assert needle in err.message, err.message
    return err.message


def schema_format(schema, **extra) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


def test_response_format_kinds():
    assert parse() is None
    assert parse(response_format={"type": "text"}) is None
    assert parse(response_format={"type": "json_object"}) == StructuredOutputsParams(json_object=True)
    so = parse(response_format=schema_format(PERSON, strict=True, description="a person"))
    assert so.kind == "json" and so.json == PERSON


def test_vllm_field_kinds():
    assert parse(structured_outputs={"regex": "[a-z]+"}).regex == "[a-z]+"
    assert parse(structured_outputs={"choice": ["yes", "no"]}).choice == ["yes", "no"]
    assert parse(structured_outputs={"grammar": 'root ::= "a" | "b"'}).kind == "grammar"
    assert parse(structured_outputs={"json_object": True}).kind == "json_object"
    so = parse(structured_outputs={"json": '{"type": "integer"}', "disable_any_whitespace": True})
    assert so.json == {"type": "integer"} and so.disable_any_whitespace
    # response_format "text" is no constraint, so it combines with the vLLM field
    assert parse(response_format={"type": "text"}, structured_outputs={"regex": "a"}).regex == "a"


@pytest.mark.parametrize("fields,param,needles", [
    ({"response_format": {"type": "xml"}}, "response_format", ["response_format.type", "'json_schema'"]),
    ({"response_format": {}}, "response_format", ["response_format.type=null"]),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format", ["unexpected field 'schema'"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["response_format.json_schema: required"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format",
     ["json_schema.name"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": PERSON}}},
     "response_format", ["json_schema.name"]),
    ({"response_format": schema_format(PERSON, strict="yes")}, "response_format", ["json_schema.strict"]),
    ({"response_format": schema_format(PERSON, extra=1)}, "response_format", ["unexpected field 'extra'"]),
    ({"response_format": schema_format(None)}, "response_format", ["json_schema.schema: required", "got null"]),
    ({"response_format": schema_format({"type": "strng"})}, "response_format",
     ["not a valid JSON schema", "at $.type"]),
    ({"response_format": schema_format({"properties": {"a": {"minimum": "x"}}})}, "response_format",
     ["not a valid JSON schema", "$.properties.a.minimum"]),
    ({"response_format": schema_format({"type": "array", "items": {"type": "string"}, "uniqueItems": True})},
     "response_format", ["unsupported JSON schema feature 'uniqueItems' at $"]),
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"not": {"type": "string"}}}})},
     "response_format", ["'not' at $.properties.a"]),
    ({"response_format": schema_format({"$ref": "https://example.com/s.json"})}, "response_format",
     ["remote $ref"]),
    ({"response_format": schema_format({"$ref": "#/$defs/missing"})}, "response_format",
     ["not a supported JSON schema"]),
    ({"response_format": schema_format({"type": "string", "pattern": "a(b"})}, "response_format",
     ["'a(b' is not a 'regex'"]),
    ({"response_format": schema_format({"type": "object", "minProperties": 2, "additionalProperties": False})},
     "response_format", ["not a supported JSON schema", "minProperties"]),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     ["one of response_format or structured_outputs"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one", "regex, choice"]),
    ({"structured_outputs": {}}, "structured_outputs", ["exactly one", "got none"]),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs",
     ["structured_outputs.regex", "not a supported regular expression", "parenthesis"]),
    ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs",
     ["structured_outputs.grammar", "not a supported EBNF grammar", "foo"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", ["structured_outputs.choice"]),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs", ["must be a list of strings"]),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs", ["structured_outputs.regex: must be a string"]),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", ["not valid JSON"]),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs", ["structured_outputs.json: must be a JSON schema"]),
    ({"structured_outputs": {"json": {"type": "integer"}, "whitespace_pattern": " "}}, "structured_outputs",
     ["unexpected field 'whitespace_pattern'", "allowed: json, regex"]),
])
def test_bad_input_is_400_naming_the_field(fields, param, needles):
    rejected(param, *needles, **fields)


def test_size_and_depth_limits():
    small = ServerConfig(max_structured_output_bytes=200, max_json_schema_depth=4)
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
    rejected("response_format", "more than the limit of 200 bytes", config=small,
             response_format=schema_format(wide))
    rejected("structured_outputs", "structured_outputs.regex", "limit of 200 bytes", config=small,
             structured_outputs={"regex": "a" * 201})
    rejected("structured_outputs", "limit of 200 bytes", config=small,
             structured_outputs={"choice": ["x" * 50] * 5})
    deep: dict = {"type": "string"}
    for _ in range(3):  # each level adds two: the schema object and its "properties" map
        deep = {"type": "object", "properties": {"a": deep}}
    rejected("response_format", "nested 7 levels deep", "limit of 4", config=small,
             response_format=schema_format(deep))
    # the defaults allow ordinary schemas and state the bounds
    assert (CONFIG.max_structured_output_bytes, CONFIG.max_json_schema_depth) == (64 * 1024, 32)
    assert parse(response_format=schema_format(deep)).json == deep


def test_allowed_keywords_pass():
    schema = {"type": "object", "additionalProperties": False, "unevaluatedProperties": False,
              "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}},
              "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1},
                             "not": {"type": "integer"},  # a property *named* "not" is no keyword
                             "when": {"type": "string", "format": "date"},
                             "kind": {"anyOf": [{"const": 1}, {"type": "null"}]}},
              "required": ["tags"]}
    assert parse(response_format=schema_format(schema)).json == schema


def test_with_constraint_adds_stop_ids_once():
    params = SamplingParams(max_tokens=5, stop_token_ids=[7])
    so = StructuredOutputsParams(regex="a+")
    out = with_constraint(params, so, [7, 9])
    assert out.structured_outputs is so and out.stop_token_ids == [7, 9]
    assert params.stop_token_ids == [7] and params.structured_outputs is None
    assert with_constraint(params, so).stop_token_ids == [7]


def test_end_of_turn_ids_from_the_template(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    # the fixtures' template closes every turn with </s>
    assert end_of_turn_ids(tok, tok.chat_template) == [tok.eos_token_id]
    turn_token = "<|system|>"  # a special token standing in for Gemma's <end_of_turn>
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + turn_token + "\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert end_of_turn_ids(tok, template) == [tok.convert_tokens_to_ids(turn_token)]
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_ids(tok, plain) == []  # plain text after the reply: no token to add
    assert end_of_turn_ids(tok, "{{ raise_exception('no') }}") == []


def test_async_variant_checks_the_same_off_the_loop():
    def body(**fields):
        return CompletionRequest.model_validate({"prompt": "hi", **fields})

    assert asyncio.run(request_structured_outputs_async(body(), CONFIG)) is None
    so = asyncio.run(request_structured_outputs_async(body(response_format=schema_format(PERSON)), CONFIG))
    assert so == StructuredOutputsParams(json=PERSON)
    with pytest.raises(APIError) as info:
        asyncio.run(request_structured_outputs_async(body(structured_outputs={"regex": "("}), CONFIG))
    assert info.value.param == "structured_outputs"
