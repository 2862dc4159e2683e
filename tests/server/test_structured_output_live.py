"""response_format and structured_outputs over HTTP on the tiny-model server, with the `openai` client:
every constrained output parses / matches, and every bad input is a 400 naming the field while the server
keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

MODEL = "tiny"
HI = [{"role": "user", "content": "Describe a person."}]
# Every value bounded, so with whitespace runs capped (8 characters per gap, 13 gaps) even a random model's
# reply fits in ~150 tokens: finish_reason "stop" below also shows that the whitespace cap holds. The name is
# ASCII by pattern: xgrammar 0.2.9 lets byte-level tokens spell UTF-8 surrogates (ED A0-BF xx), which decode
# to three U+FFFD and break a maxLength count.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "pet": {"enum": ["cat", "dog", None]}},
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def post(tiny_server):
    def _post(path: str, body: dict) -> httpx.Response:
        return httpx.post(tiny_server.url + path, json=body, timeout=120)
    return _post


def test_chat_json_schema_validates(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, response_format=PERSON_FORMAT, n=3,
                                       temperature=1.0, seed=7, max_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_chat_json_schema_streamed_validates(client):
    stream = client.chat.completions.create(model=MODEL, messages=HI, response_format=PERSON_FORMAT,
                                            temperature=0.0, max_tokens=200, stream=True)
    parts, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads("".join(parts)), PERSON)


def test_chat_json_object(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, response_format={"type": "json_object"},
                                       temperature=0.0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=HI, response_format={"type": "json_object"}, n=2,
                                       temperature=1.0, seed=3, max_tokens=60)
    for choice in r.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # sampled, a random model may write a long object: what it wrote still opens one
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_completions_regex_choice_and_schema(client):
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, n=3, temperature=1.0, seed=1,
                                  extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}})
    for choice in r.choices:
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", choice.text), choice.text
    options = ["alpha", "beta", "gamma delta"]
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, n=4, temperature=1.0, seed=2,
                                  extra_body={"structured_outputs": {"choice": options}})
    assert all(c.text in options for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model=MODEL, prompt="Person:", max_tokens=200, temperature=0.0,
                                  extra_body={"response_format": PERSON_FORMAT})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_grammar_and_compact_json(client):
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, n=3, temperature=1.0, seed=5,
                                  extra_body={"structured_outputs": {"grammar": grammar}})
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=200, temperature=0.0, extra_body={
        "structured_outputs": {"json": PERSON, "disable_any_whitespace": True}})
    content = r.choices[0].message.content
    value = json.loads(content)
    jsonschema.validate(value, PERSON)
    # one fixed layout (xgrammar's, as vLLM): a space after ':' and ',', no other whitespace
    assert r.choices[0].finish_reason == "stop" and content == json.dumps(value, ensure_ascii=False)


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ("/v1/chat/completions", {"response_format": "json"}, "response_format", "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}}, "response_format",
     "not a valid JSON schema"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format", "'uniqueItems'"),
    ("/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs",
     "not a supported regular expression"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs",
     "not a supported EBNF grammar"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a", "json_object": True}}, "structured_outputs",
     "exactly one"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", "one of response_format or structured_outputs"),
    ("/v1/completions", {"structured_outputs": "json"}, "structured_outputs", "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "a" * 70_000}}, "structured_outputs",
     "limit of 65536 bytes"),
])
def test_bad_input_400_then_still_serving(post, path, body, param, needle):
    prompt = {"messages": HI} if "chat" in path else {"prompt": "hi"}
    r = post(path, {**prompt, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
    assert needle in err["message"] and "\n" not in err["message"], err
    ok = post(path, {**prompt, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_deeply_nested_schema_is_400(post):
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    r = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "structured_outputs": {"json": schema}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs", r.text
    assert "levels deep, more than the limit of 32" in r.json()["error"]["message"]


def test_text_format_is_unconstrained(post):
    plain = post("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0.0})
    text = post("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 0.0,
                                    "response_format": {"type": "text"}})
    assert text.status_code == 200 and text.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_chat_constraint_ends_at_the_templates_end_of_turn(client, tiny_llama_dir):
    """A template whose turns end with a special token other than EOS: a completed grammar stops there."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    turn_id = tok.convert_tokens_to_ids("<|system|>")  # stands in for Gemma's <end_of_turn>
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|system|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    # EOS pushed away, so the reply can only end at the template's end-of-turn token
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, temperature=0.0,
                                       logit_bias={str(tok.eos_token_id): -100},
                                       extra_body={"chat_template": template,
                                                   "structured_outputs": {"choice": ["yes", "no"]}})
    choice = r.choices[0]
    assert choice.message.content in ("yes", "no")
    assert (choice.finish_reason, choice.model_extra.get("stop_reason")) == ("stop", turn_id)
