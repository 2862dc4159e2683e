"""Run one batch line through the same handler an HTTP request reaches, without HTTP.

The endpoint handlers take a Starlette `Request`; rather than fork them, a line becomes a `Request` over an
in-memory ASGI channel (its body, then no disconnect ever). The handlers thus parse, validate, render and
answer exactly as for an HTTP client, so a batch line's body equals the interactive answer to the same
request. Works on any ServerState with an engine: the server's, or one `tokenmill run-batch` builds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from tokenmill.batch.validate import SUPPORTED_ENDPOINTS
from tokenmill.server.errors import APIError, error_body
from tokenmill.server.serving_chat import create_chat_completion
from tokenmill.server.serving_completions import create_completion
from tokenmill.server.serving_embeddings import create_embedding
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.batch")

Handler = Callable[[ServerState, Request], Awaitable[Response]]
HANDLERS: dict[str, Handler] = {  # one per batch/validate.py SUPPORTED_ENDPOINTS
    "/v1/chat/completions": create_chat_completion,
    "/v1/completions": create_completion,
    "/v1/embeddings": create_embedding,
}


def _request(endpoint: str, raw: bytes) -> Request:
    """A POST `Request` whose body is `raw` and whose client never disconnects."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # never set: the handler is ended by its caller, not a disconnect
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": endpoint, "raw_path": endpoint.encode(),
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": None, "server": None}
    return Request(scope, receive)


def effective_priority(body: dict[str, Any], priority: int) -> int:
    """A line may lower its own priority (a larger number) but never rise above the batch's."""
    own = body.get("priority", 0)
    return max(priority, own) if isinstance(own, int) and not isinstance(own, bool) else priority


async def execute_line(state: ServerState, endpoint: str, body: dict[str, Any], *,
                       priority: int) -> tuple[int, dict[str, Any]]:
    """(status code, response body) of one non-streaming request, as the HTTP endpoint answers it.

    4xx/5xx bodies are OpenAI's error shape. A line asking to stream is refused (400, param "stream"), as
    OpenAI's Batch API does. Cancelling the caller aborts the engine request (the handler's finally).
    """
    handler = HANDLERS.get(endpoint)
    if handler is None:
        allowed = ", ".join(SUPPORTED_ENDPOINTS)
        return 400, error_body(f"invalid url {endpoint!r}: must be one of {allowed}", "invalid_request_error",
                               "url", "invalid_url")
    if body.get("stream"):
        return 400, error_body("invalid stream=true: batch requests cannot stream; omit stream or set it false",
                               "invalid_request_error", "stream", "invalid_parameter")
    if endpoint != "/v1/embeddings":
        body = {**body, "priority": effective_priority(body, priority)}
    raw = json.dumps(body, ensure_ascii=False).encode()
    try:
        response = await handler(state, _request(endpoint, raw))
    except APIError as exc:
        return exc.status, exc.body()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # one line's failure is that line's 500, not the job's
        log.exception("batch line on %s failed", endpoint)
        return 500, error_body(f"{type(exc).__name__}: {exc}", "internal_error", None, "internal_error")
    return response.status_code, json.loads(bytes(response.body))
