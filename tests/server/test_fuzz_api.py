"""Schemathesis against /openapi.json of a live `tokenmill serve` (the session's tiny Llama server).

Each documented operation gets bounded, derandomized examples in both of schemathesis' modes (valid bodies
from the request schemas, and bodies that break them), each checked for: no 5xx, and a response that
matches the documented schema (the OpenAI shapes, or OpenAI's error shape for every 4xx / 5xx). Bugs it
found are regression cases in test_hostile_inputs.py.
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

OPERATIONS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize")
# Generated requests are capped to a few tokens: the point is the edge, not long generations on 2 CPU cores.
_MAX_NEW_TOKENS = 4
# Per operation and mode (250 requests in all); TOKENMILL_FUZZ_EXAMPLES=500 for a deeper run by hand.
_MAX_EXAMPLES = int(os.environ.get("TOKENMILL_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")


def test_openapi_documents_the_request_bodies(tiny_server):
    doc = httpx.get(tiny_server.url + "/openapi.json", timeout=30).json()
    for path in OPERATIONS:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = body["$ref"].rsplit("/", 1)[-1]
        assert doc["components"]["schemas"][name]["properties"], path
    completion = doc["components"]["schemas"]["CompletionRequest"]
    assert "prompt" in completion["required"] and completion["additionalProperties"] is False


def _cap(body: object) -> None:
    """Keep valid generations tiny; invalid values (negative, huge, wrong type) are left as generated."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(key), int) and body[key] > _MAX_NEW_TOKENS:
            body[key] = _MAX_NEW_TOKENS
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = _MAX_NEW_TOKENS  # chat's default is the whole remaining context


# schemathesis.pytest.from_fixture breaks on pytest 9 (it reads node._nodeid), so each operation's
# strategy is driven by hypothesis directly: one test per operation and generation mode.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path", OPERATIONS)
def test_fuzz_server_api(api_schema, path, mode):
    operation = api_schema["/" + path.lstrip("/")]["POST"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=_MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        _cap(case.body)
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=120)

    run()
