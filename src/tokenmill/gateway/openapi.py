"""Request body schemas for the gateway's OpenAPI document (/openapi.json).

The gateway forwards bodies as they are and the replica validates them in full, so these schemas name
only what the gateway itself reads (model, stream, priority, the prompt for routing and rate limits) and
allow any other field. They document the API and let a fuzzer (schemathesis) send realistic bodies.
Plain dicts: the gateway keeps pydantic out (house style: pydantic only in server/)."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "model": {"type": "string", "description": "A served model, a pool name or a routing alias."},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "priority": {"type": "integer", "description": "Lower is served first; added to the API key's tier."},
}
_MESSAGE = {"type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                           "content": {"type": "string"}}}
_SCHEMAS: dict[str, dict[str, Any]] = {
    "/v1/completions": {"type": "object", "required": ["prompt"], "properties": {
        **_COMMON, "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
    "/v1/chat/completions": {"type": "object", "required": ["messages"], "properties": {
        **_COMMON, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1}}},
    "/v1/embeddings": {"type": "object", "required": ["input"], "properties": {
        "model": _COMMON["model"],
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
}


def request_body(path: str) -> dict[str, Any]:
    """`openapi_extra` for the POST route at `path`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _SCHEMAS[path]}}}}
