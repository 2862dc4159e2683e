"""OpenAI-shaped errors: every failure a client sees is `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError`; the app turns it (and FastAPI's own validation / HTTP errors, which would
otherwise leak the 422 `{"detail": [...]}` shape) into this body with the right status.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_param(param: str, message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param, code="invalid_parameter")


def model_not_found(model: str, served: list[str]) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist. Served models: {', '.join(served)}.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> APIError:
    """`param` names the prompt field; the error names max_tokens instead when the prompt alone fits."""
    if num_prompt >= max_model_len or max_tokens is None:
        room = ", which leaves no room for the completion" if num_prompt == max_model_len else ""
        msg = (
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {num_prompt} "
            f"tokens{room}. Shorten the prompt."
        )
    else:
        param = "max_tokens"
        msg = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
            f"Lower max_tokens to at most {max_model_len - num_prompt}, or shorten the prompt."
        )
    return APIError(400, msg, "invalid_request_error", param=param, code="context_length_exceeded")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", code="service_unavailable")


def engine_dead(detail: str | None = None) -> APIError:
    # a replica fault (5xx, so a gateway retries elsewhere); the server restarts the core or exits
    msg = ("The engine core process is not running: the server restarts it, or exits once it cannot "
           "(first start failed, or more than --max-core-restarts deaths); retry shortly.")
    if detail:
        msg += f" ({detail})"
    return APIError(503, msg, "engine_error", code="engine_dead", headers={"Retry-After": "2"})


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """Every pydantic error as one line naming its field, joined with "; ", and the first field as param.

    Union fields report one member only (the one the input got furthest into), or one "expected a or b"
    line when the input matches no member's type: pydantic's raw output lists every member's failure.
    """
    errors = _resolve_unions(list(exc.errors()))
    if not errors:
        return "invalid request body", None
    lines: list[str] = []
    params: list[str | None] = []
    for err in errors:
        param, line = _describe(err)
        if line not in lines:
            lines.append(line)
            params.append(param)
    shown = lines[:_MAX_ERRORS_SHOWN]
    if len(lines) > len(shown):
        shown.append(f"and {len(lines) - len(shown)} more errors")
    return "; ".join(shown), params[0]


_MAX_ERRORS_SHOWN = 6
# Error types our own validators raise (protocol.py): their message is complete, the input is not echoed.
_OWN_TYPES = {"request_conflict", "unsupported_content", "prompt_shape", "union_mismatch"}


def _describe(err: dict[str, Any]) -> tuple[str | None, str]:
    ctx = err.get("ctx") or {}
    loc = _clean_loc(err.get("loc", ()))
    param = ctx.get("param") if isinstance(ctx.get("param"), str) else _param_name(loc)
    kind = err.get("type", "")
    if kind == "request_conflict":
        return param, str(err.get("msg"))
    if kind == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}"
    if kind == "missing":
        return param, f"Missing required parameter: {param}"
    msg = f"Invalid value for {param or 'body'}: {err.get('msg', 'invalid')}"
    if kind not in _OWN_TYPES:
        given = err.get("input")
        shown = json.dumps(given)[:80] if _jsonable(given) else repr(given)[:80]
        msg += f" (got {shown})"
    return param, msg


def _clean_loc(loc: Any) -> list[Any]:
    # "body" is FastAPI's prefix; union member names ("str", "list[int]") only confuse users.
    return [p for p in loc if p != "body" and not (isinstance(p, str) and _is_type_tag(p))]


def _param_name(loc: list[Any]) -> str | None:
    """OpenAI's spelling: messages[0].content[1].type."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _resolve_unions(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep one member's errors per failed union (see validation_message)."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for err in errors:
        loc = tuple(err.get("loc", ()))
        i = next((j for j, p in enumerate(loc) if isinstance(p, str) and _is_type_tag(p)), None)
        if i is not None:
            groups.setdefault(loc[:i], {}).setdefault(loc[i], []).append(err)
    out: list[dict[str, Any]] = []
    done: set[tuple] = set()
    for err in errors:
        loc = tuple(err.get("loc", ()))
        prefix = next((loc[:j] for j in range(len(loc)) if loc[:j] in groups), None)
        if prefix is None:
            out.append(err)
        elif prefix not in done:
            done.add(prefix)
            out.extend(_pick_member(prefix, groups[prefix]))
    return out


def _pick_member(prefix: tuple, members: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    depth = len(prefix) + 1  # errors at this depth: the input is not even of this member's type
    deepest = max(members.items(), key=lambda m: (max(len(e["loc"]) for e in m[1]), -len(m[1])))
    if max(len(e["loc"]) for e in deepest[1]) > depth:
        return deepest[1]
    first = next(iter(members.values()))[0]
    words = [_type_words(tag) for tag in members]
    wanted = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    return [{"type": "union_mismatch", "loc": prefix, "msg": f"expected {wanted}, got {_json_type(first.get('input'))}",
             "input": first.get("input")}]


def _type_words(tag: str) -> str:
    words = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
             "list[str]": "a list of strings", "list[int]": "a list of integers (token ids)",
             "list[list[int]]": "a list of lists of integers"}
    if tag in words:
        return words[tag]
    return "a list" if tag.startswith("list[") else "an object" if tag.startswith("dict[") else tag


def _json_type(v: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _is_type_tag(p: str) -> bool:
    return p in {"str", "int", "float", "bool"} or p.startswith(("list[", "dict[", "function-", "tagged-union["))


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def http_error_body(method: str, path: str, exc: StarletteHTTPException) -> dict[str, Any]:
    """Starlette's routing errors (404, 405) in OpenAI's shape; `code` is a string like every other code."""
    status = exc.status_code
    allow = (getattr(exc, "headers", None) or {}).get("Allow")
    if status == 405 and allow:
        msg = f"Method {method} is not allowed for {path}; allowed: {allow}."
    elif status == 404 and exc.detail == "Not Found":
        msg = f"No route for {method} {path}."
    else:
        msg = str(exc.detail)
    try:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")  # "method_not_allowed"
    except ValueError:
        code = f"http_{status}"
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return error_body(msg, kind, None, code)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_parameter"), status_code=400)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(http_error_body(request.method, request.url.path, exc), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        msg = f"internal server error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(msg, "internal_error", None, "internal_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
