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
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
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
