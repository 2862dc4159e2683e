"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

The first signal flips the server to draining (new requests and /health answer 503), waits until the
in-flight requests finish or `drain_timeout_s` passes, then lets uvicorn close; the lifespan stops the
engine core process. The signal is not re-raised afterwards, so a drained shutdown exits 0.
A second signal while draining exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from types import FrameType

import uvicorn

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.memory import release_free_memory, tree_resident_bytes
from tokenmill.server.app import create_app
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self.state.draining
            return
        self.state.draining = True
        log.info("received %s: draining %d in-flight sequences (up to %.0fs)", signal.Signals(sig).name,
                 self.state.in_flight_seqs, self.state.server_config.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.server_config.drain_timeout_s
        while self.state.in_flight_seqs > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.in_flight_seqs > 0:
            log.warning("drain timeout: cancelling %d in-flight sequences", self.state.in_flight_seqs)
        self.should_exit = True


def run_server(engine_config: EngineConfig, server_config: ServerConfig, chat_template: str | None = None,
               log_level: str = "info") -> int:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app = create_app(engine_config, server_config, chat_template=chat_template)
    state: ServerState = app.state.tokenmill
    url = f"http://{server_config.host}:{server_config.port}"

    def ready() -> None:
        info = state.engine.model_info
        release_free_memory()  # the unpickled tokenizer's parse temporaries: ~270 MB for Gemma's
        kv_gib = info.extra.get("kv_cache_bytes", 0) / (1 << 30)
        log.info("serving model %s (max_model_len %d, KV cache capacity %d tokens in %.2f GiB, resident memory "
                 "%.2f GB with the engine core) at %s/v1", state.model_name, info.max_model_len,
                 getattr(info, "kv_capacity_tokens", 0), kv_gib, tree_resident_bytes() / 1e9, url)

    state.extra["on_ready"] = ready
    log.info("tokenmill server starting at %s; loading model %s", url, engine_config.model.model or "(default)")
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=log_level,
                            timeout_graceful_shutdown=2, access_log=False, lifespan="on")
    server = DrainingServer(config, state)

    def nothing_to_serve() -> None:  # load failed or restart budget spent: exit 1, not 503 forever
        server.should_exit = True

    state.extra["on_fatal"] = nothing_to_serve
    server.run()
    return 0 if state.load_error is None else 1
