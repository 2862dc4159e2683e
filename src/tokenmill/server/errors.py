"""OpenAI-shaped errors: every failure a client sees is `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError`; the app turns it (and FastAPI's own validation / HTTP errors, which would
otherwise leak the 422 `{"detail": [...]}` shape) into this body with the right status.
"""

from __future__ import annotations

import json
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


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
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
    if max_tokens is None:
        msg = (
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {num_prompt} tokens. Shorten the prompt."
        )
    else:
        msg = (
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
            f"Reduce the prompt or max_tokens."
        )
    return APIError(400, msg, "invalid_request_error", param=param, code="context_length_exceeded")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", code="service_unavailable")


def engine_dead(detail: str | None = None) -> APIError:
    msg = "The engine core process is not running; the server cannot serve requests."
    if detail:
        msg += f" ({detail})"
    return APIError(503, msg, "engine_error", code="engine_dead")


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as (message naming the field, param)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    # pydantic puts union member names ("str", "list[int]") into loc; they only confuse users.
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) if loc else None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        msg = f"Missing required parameter: {param}"
    else:
        given = err.get("input")
        shown = json.dumps(given)[:80] if _jsonable(given) else repr(given)[:80]
        msg = f"Invalid value for {param}: {err.get('msg', 'invalid')} (got {shown})"
    extra = len(errors) - 1
    if extra > 0:
        msg += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return msg, param


def _is_type_tag(p: str) -> bool:
    return p in {"str", "int", "float", "bool"} or p.startswith(("list[", "dict[", "function-", "tagged-union["))


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_parameter"), status_code=400)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), kind, None, exc.status_code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "internal_error", None, 500), status_code=500)

    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
