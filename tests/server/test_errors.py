"""Every client error comes back in OpenAI's shape with the right status, never FastAPI's 422 or a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "tiny"


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def post(tiny_server):
    def _post(path: str, body=None, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
        return httpx.post(tiny_server.url + path, json=body, content=content, headers=headers, timeout=60)
    return _post


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 100000}, "n"),
    ({"prompt": "hi", "n": "two"}, "n"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "hi", "stop": 7}, "stop"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "max_tokns": 3}, "max_tokns"),  # unknown field: rejected, named
    ({}, "prompt"),
])
def test_completion_invalid_params(post, body, param):
    err = assert_error(post("/v1/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools_x": []}, "tools_x"),
])
def test_chat_invalid_params(post, body, param):
    assert_error(post("/v1/chat/completions", body), 400, param=param)


def test_context_length_exceeded(post):
    err = assert_error(post("/v1/completions", {"prompt": "hello " * 300, "max_tokens": 5}), 400,
                       code="context_length_exceeded")
    assert "256" in err["message"]
    assert_error(post("/v1/completions", {"prompt": "hi", "max_tokens": 400}), 400, code="context_length_exceeded")
    assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}), 400,
                 code="context_length_exceeded")


def test_unknown_model_404(post, tiny_server):
    err = assert_error(post("/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, param="model",
                       code="model_not_found")
    assert "gpt-9" in err["message"]
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_malformed_bodies(post):
    assert_error(post("/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}),
                 400, code="invalid_json")
    assert_error(post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}),
                 400, code="invalid_encoding")
    assert_error(post("/v1/completions", content=b'[1, 2]', headers={"content-type": "application/json"}),
                 400, code="invalid_json")
    assert_error(post("/v1/completions", content=b'', headers={"content-type": "application/json"}), 400)


def test_body_over_limit_413(post):
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert_error(post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)


def test_not_found_route_shape(tiny_server):
    r = httpx.get(tiny_server.url + "/v1/nope")
    assert_error(r, 404)


def test_openai_client_raises_bad_request(tiny_server):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", temperature=-3)
    assert info.value.body["param"] == "temperature"


IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param,needles", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, IMAGE_PART]}]},
     "messages[0].content[1]", ["content part type 'image_url' is not supported", "text only"]),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt", ["only strings, only token ids", "integers and strings"]),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt", ["expected a string, a list of strings", "got an object"]),
    ("/v1/chat/completions", {"prompt": "hi"}, "messages",
     ["Missing required parameter: messages", "Unrecognized request argument supplied: prompt"]),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
     ["only allowed when 'stream' is enabled"]),
    ("/v1/chat/completions", {"messages": HI, "stream": False, "stream_options": {"include_usage": True}},
     "stream_options", ["only allowed when 'stream' is enabled"]),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {"description": "f"}}]},
     "tools", ["invalid tools[0].function.name=None"]),
    ("/v1/chat/completions", {"messages": HI, "tool_choice": "auto"}, "tool_choice", ["requires `tools`"]),
    ("/v1/chat/completions", {"messages": HI, "functions": [{"name": "f"}]}, "functions", ["not supported yet"]),
    ("/v1/chat/completions", {"messages": HI, "function_call": {"name": "f"}}, "function_call", ["not supported yet"]),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format",
     ["response_format.json_schema: required"]),
])
def test_clear_one_line_messages(post, path, body, param, needles):
    err = assert_error(post(path, body), 400, param=param)
    assert "\n" not in err["message"] and "more error" not in err["message"], err
    for needle in needles:
        assert needle in err["message"], err


def test_defaults_of_unsupported_fields_are_accepted(post):
    body = {"messages": HI, "max_tokens": 2, "tools": [], "tool_choice": "none", "function_call": "none",
            "response_format": {"type": "text"}, "parallel_tool_calls": False}
    assert post("/v1/chat/completions", body).status_code == 200
    assert post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "text"}}).status_code == 200
    streamed = post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True,
                                        "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")


def test_context_length_names_the_cause(post):
    # the prompt fits, prompt + max_tokens does not: max_tokens (or the field the client used) is the cause
    err = assert_error(post("/v1/completions", {"prompt": "hi", "max_tokens": 400}), 400, param="max_tokens",
                       code="context_length_exceeded")
    assert "256" in err["message"] and "max_tokens" in err["message"]
    assert_error(post("/v1/chat/completions", {"messages": HI, "max_tokens": 400}), 400, param="max_tokens")
    err = assert_error(post("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 400}), 400,
                       param="max_completion_tokens", code="context_length_exceeded")
    assert "max_completion_tokens" in err["message"]
    # the prompt alone is too long, with or without max_tokens
    for extra in ({}, {"max_tokens": 5}):
        assert_error(post("/v1/completions", {"prompt": "hello " * 300, **extra}), 400, param="prompt",
                     code="context_length_exceeded")
        assert_error(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}], **extra}),
                     400, param="messages", code="context_length_exceeded")


def test_routing_errors_have_string_codes(tiny_server):
    err = assert_error(httpx.get(tiny_server.url + "/v1/completions"), 405, code="method_not_allowed")
    assert "POST" in err["message"] and "/v1/completions" in err["message"]
    assert_error(httpx.get(tiny_server.url + "/v1/nope"), 404, code="not_found")
