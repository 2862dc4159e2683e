"""The OpenAPI document at /openapi.json: request and response bodies of the model endpoints.

The handlers take a raw `Request` (server/body.py reads it, so limits and errors stay ours instead of
FastAPI's 422), so FastAPI cannot see their bodies; `route_doc` declares them per route and
`install_openapi` puts the pydantic models' JSON schemas into components. Fuzzers (schemathesis,
tests/server/test_fuzz_api.py) and client generators read this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)

_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest, CompletionResponse, ChatCompletionRequest, ChatCompletionResponse, EmbeddingRequest,
    TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
)
_EMBEDDINGS_RESPONSE = {"type": "object", "required": ["object", "data", "model", "usage"]}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def route_doc(request: type[BaseModel], response: type[BaseModel] | None, stream: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a POST route taking `request` as JSON and answering `response` (or SSE)."""
    ok: dict[str, Any] = {"application/json": {"schema": _ref(response) if response else _EMBEDDINGS_RESPONSE}}
    if stream:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    error = {"content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "OK", "content": ok},
                      "4XX": {"description": "The request was refused (OpenAI's error shape).", **error},
                      "5XX": {"description": "The server cannot serve now (loading, engine down).", **error}},
    }


def install_openapi(app: FastAPI) -> None:
    """Serve FastAPI's document (it caches it) with the protocol models added to its components."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        doc = base()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        if ErrorResponse.__name__ not in schemas:  # once per generated document
            for model in _MODELS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
