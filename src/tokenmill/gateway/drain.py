"""Graceful shutdown. On SIGTERM (or SIGINT) the gateway answers new requests with 503, lets the requests in
flight finish (up to `drain_timeout_s`), then shuts down (the lifespan stops locally started replicas by
PID) and exits 0. A second signal stops waiting for in-flight requests; a third forces the exit.

Stock uvicorn instead stops listening at once and re-raises the signal after shutdown (exit status -15),
which orchestrators read as a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from types import FrameType

import uvicorn

log = logging.getLogger("tokenmill.gateway")

_REJECT_BODY = json.dumps({"error": {
    "message": "the gateway is shutting down and takes no new requests; retry on another gateway instance",
    "type": "server_error", "param": None, "code": "shutting_down"}}).encode()


class Drain:
    """The draining flag and the number of HTTP requests in flight (counted by DrainGate)."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False when `timeout_s` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.active == 0


class DrainGate:
    """Pure ASGI middleware (no per-chunk cost on streams): counts requests until their response is fully
    sent, and while draining answers 503 to everything except the paths in `open_paths` (health, metrics)."""

    def __init__(self, app, drain: Drain, open_paths: tuple[str, ...] = ("/health", "/metrics")) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.drain = drain
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in self.open_paths:
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(_REJECT_BODY)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": _REJECT_BODY})
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain first and never re-raise the signal (exit status 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: it records the signal to re-raise it after shutdown.
        if not self.drain.draining and self._loop is not None:
            self.drain.draining = True
            self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)
        elif not self.should_exit:
            self.should_exit = True
        else:
            self.force_exit = True

    def _start_drain(self, name: str) -> None:
        log.info("%s: draining; new requests get 503, %d in flight may take up to %s s",
                 name, self.drain.active, self.drain_timeout_s)
        self._drain_task = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.drain.wait_idle(self.drain_timeout_s):
            log.warning("drain timeout (%s s): %d request(s) still in flight are cut", self.drain_timeout_s,
                        self.drain.active)
        self.should_exit = True
