"""Reading a JSON request body at the HTTP edge: the content type, the size limit (413), the decoding, and
the values no field may hold (nesting too deep, NaN / Infinity, lone UTF-16 surrogates).

Everything here answers a 4xx in OpenAI's error shape; none of it may raise anything else, because an
exception escaping a handler is a 500 and makes uvicorn drop the keep-alive connection with it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from tokenmill.server.errors import APIError, validation_message

M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_DEPTH = 128  # ServerConfig.max_json_depth
# Bodies larger than this are decoded in a worker thread: json.loads of megabytes holds the loop for tens of ms.
_THREAD_BYTES = 256 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request, model: type[M], max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> M:
    """Read and validate a JSON body: 413 over the limit, 415 for a non-JSON content type, 400 for bad
    UTF-8 / JSON / values / fields (never 422, never 500)."""
    raw = await read_limited(request, max_bytes)
    # Checked after reading: a body left unread would cost the client its keep-alive connection.
    check_content_type(request.headers.get("content-type"))
    if len(raw) > _THREAD_BYTES:
        data = await asyncio.to_thread(parse_json_object, raw, max_depth)
    else:
        data = parse_json_object(raw, max_depth)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise APIError(400, msg, param=param, code="invalid_parameter") from None


def check_content_type(value: str | None) -> None:
    """JSON, or no Content-Type at all (raw clients; FastAPI assumes JSON then too); else 415."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise APIError(415, f"Content-Type {media or '(empty)'!r} is not supported: send the body as JSON with "
                   "`Content-Type: application/json`.", code="unsupported_media_type")


async def read_limited(request: Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as the declared or received size passes max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {max_bytes} bytes.",
                       code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"Request body exceeds the limit of {max_bytes} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """Decode a body into a JSON object, or 400 naming what is wrong (and the field, when one is at fault)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.",
                       code="invalid_json") from None
    except RecursionError:  # the decoder recurses once per level: thousands of [[[[ overflow it
        raise APIError(400, f"Request body is nested too deeply: at most {max_depth} levels of arrays and "
                       "objects are accepted.", code="invalid_json") from None
    except ValueError as exc:  # an integer literal past Python's 4300-digit conversion limit
        detail = "a number has too many digits" if "digits" in str(exc) else str(exc)[:200]
        raise APIError(400, f"Request body is not valid JSON: {detail}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"Request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    problem = find_hostile_value(data, max_depth)
    if problem is not None:
        param, msg = problem
        raise APIError(400, f"Invalid value for {param or 'body'}: {msg}.", param=param, code="invalid_parameter")
    return data


def find_hostile_value(data: Any, max_depth: int) -> tuple[str | None, str] | None:
    """(field path, what is wrong) for the first value no field accepts, walking iteratively (no recursion:
    the depth is what is being checked). Python's decoder turns NaN, Infinity and 1e999 into floats and
    keeps \\ud800 escapes as lone surrogates, which tokenizers and JSON encoders then fail on."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(data, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict | list):
            if depth > max_depth:
                return _path(path), f"nested deeper than {max_depth} levels of arrays and objects"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    return _path(path), f"the key {key!r} holds a lone UTF-16 surrogate (not valid Unicode)"
                if isinstance(item, dict | list | str | float):
                    stack.append((item, depth + 1, (*path, key)))
        elif isinstance(value, float):
            if not math.isfinite(value):
                return _path(path), (f"{value} is not a finite number (NaN, Infinity and numbers beyond "
                                     "±1.7976931348623157e308 are not accepted)")
        elif not value.isascii() and _SURROGATE.search(value):
            return _path(path), "the string holds a lone UTF-16 surrogate such as \\ud800 (not valid Unicode)"
    return None


def _path(path: tuple[Any, ...], max_chars: int = 120) -> str | None:
    """OpenAI's spelling of a field path, messages[0].content; a deep one is cut (it is echoed in errors)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
        if len(out) > max_chars:
            return out[:max_chars] + "..."
    return out or None
