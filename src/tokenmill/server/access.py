"""The API-key check and the log line of refused requests, as one plain ASGI middleware.

Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) runs the app in a second task and passes every body
chunk through a memory stream between the two: for a streamed completion that is two task switches per token in
a process that a 2-core machine shares with the engine (measured: ~20% of the server's CPU per streamed
token). Here the app runs in the request's own task and `send` is only wrapped to read the status code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import error_body
from tokenmill.server.request_log import log_rejected, track_http_request

PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # POSTs to these get a log line when refused
# With --api-key every path needs the key except these (a new route is guarded by default): probes and the
# version, and /metrics unless --no-metrics-open.
OPEN_PATHS = frozenset({"/health", "/version"})


class AccessMiddleware:
    """--api-key (a Bearer token, compared by digest) and the "rejected request" line for refused POSTs."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics_open: bool):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.metrics_open = metrics_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        tracked = method == "POST" and path.startswith(PROTECTED)
        t0, summarised = (time.monotonic(), track_http_request()) if tracked else (0.0, [])
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        refusal = self._refusal(scope, path)
        if refusal is not None:
            await refusal(scope, receive, send_status)
        else:
            try:
                await self.app(scope, receive, send_status)
            except asyncio.CancelledError:
                # A non-stream handler cancelled because its client left (streaming.until_disconnect) ends here
                # with no response; a cancellation of this task itself (shutdown) goes on.
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or status:
                    raise
                await Response(status_code=499)(scope, receive, send)  # nginx's "client closed request"
                return
        if tracked and status and status[0] >= 400 and not summarised:  # failed before any engine request was logged
            log_rejected(method, path, status[0], time.monotonic() - t0)

    def _refusal(self, scope: Scope, path: str) -> Response | None:
        """The 401 response for a request without the key, or None."""
        if self.key_digest is None or path in OPEN_PATHS or (path == "/metrics" and self.metrics_open):
            return None
        header = Headers(scope=scope).get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # Digests have one length: compare_digest then takes the same time whatever the token's length.
        if hmac.compare_digest(hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest(), self.key_digest):
            return None
        msg = "Missing API key: send `Authorization: Bearer <key>`." if not token else "Incorrect API key provided."
        return JSONResponse(error_body(msg, "authentication_error", None, "invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

