"""FastAPI app factory. The port is open before the model is loaded: until the engine core reports ready,
/health and every model endpoint answer 503, so orchestrators see "loading" rather than "refused"."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import tokenmill
from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.dashboard.router import dashboard_router, process_info
from tokenmill.model.default_model import DEFAULT_MODEL_NAME
from tokenmill.server.errors import (
    APIError,
    engine_dead,
    error_body,
    install_error_handlers,
    unavailable,
)
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.request_log import log_rejected, track_http_request
from tokenmill.server.serving_chat import create_chat_completion
from tokenmill.server.serving_completions import create_completion
from tokenmill.server.serving_embeddings import create_embedding
from tokenmill.server.serving_engine import check_ready
from tokenmill.server.serving_tokenize import (
    detokenize,
    list_models,
    precision,
    tokenize,
)
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.server")

EngineFactory = Callable[[EngineConfig], Awaitable[Any]]
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")


async def start_multiprocess_engine(config: EngineConfig) -> Any:
    """AsyncLLM whose core runs in a spawned process behind the ZeroMQ client."""
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.core_client import MPCoreClient

    client = await MPCoreClient.start(config)
    return AsyncLLM(config, client=client)


def create_app(engine_config: EngineConfig, server_config: ServerConfig,
               engine_factory: EngineFactory = start_multiprocess_engine,
               chat_template: str | None = None) -> FastAPI:
    registry = CollectorRegistry()
    started = time.time()
    names = [engine_config.model.served_model_name or engine_config.model.model or DEFAULT_MODEL_NAME]
    state = ServerState(engine_config=engine_config, server_config=server_config, served_model_names=names,
                        registry=registry, metrics=ServerMetrics(registry, names[0]), chat_template=chat_template,
                        created=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state, engine_factory))
        try:
            yield
        finally:
            state.draining = True
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.engine is not None:
                await state.engine.shutdown()
            log.info("tokenmill server stopped")

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenmill = state
    install_error_handlers(app)

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # One middleware for both: each BaseHTTPMiddleware layer costs a task per request.
        if request.method != "POST" or not request.url.path.startswith(_PROTECTED):
            return await auth(request, call_next)
        t0, summarised = time.monotonic(), track_http_request()
        response = await auth(request, call_next)
        if response.status_code >= 400 and not summarised:  # failed before any engine request was logged
            log_rejected(request.method, request.url.path, response.status_code, time.monotonic() - t0)
        return response

    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = server_config.api_key
        if key and request.url.path.startswith(_PROTECTED):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                msg = "Missing API key: send `Authorization: Bearer <key>`." if not token else "Incorrect API key provided."
                return JSONResponse(error_body(msg, "authentication_error", None, "invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await create_embedding(state, request)

    @app.get("/v1/models")
    async def models() -> Response:
        check_ready(state)  # 503 while loading, like every model endpoint (docs/server.md)
        return list_models(state)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(state, request)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await detokenize(state, request)

    @app.get("/health")
    async def health() -> Response:
        try:
            if state.draining:
                raise unavailable("The server is shutting down.")
            if state.engine is None:
                raise engine_dead(state.load_error) if state.load_error else unavailable("The model is loading.")
            if state.engine.errored:
                raise engine_dead()
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": tokenmill.__version__, **precision(state)})

    @app.get("/metrics")
    async def metrics() -> Response:
        refresh_engine_metrics(state)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug/stats")
    async def debug_stats() -> Response:
        """Raw engine scheduler stats (block counts included), for tests and operators."""
        stats = refresh_engine_metrics(state)
        body = {"ready": state.engine is not None, "in_flight_seqs": state.in_flight_seqs}
        if stats is not None:
            body["engine"] = {k: getattr(stats, k) for k in stats.__slots__}
            body["core_pid"] = state.engine.model_info.extra.get("pid")
        return JSONResponse(body)

    def dashboard_extra() -> dict[str, Any]:
        # Refresh the lazily updated engine gauges so the page sees current values.
        stats = refresh_engine_metrics(state)
        info = state.engine.model_info if state.engine is not None else None
        return {"model": state.model_name, **process_info(started, precision(state)),
                "ready": state.engine is not None and not state.engine.errored,
                "in_flight_seqs": state.in_flight_seqs,
                "kv_capacity_tokens": info.kv_capacity_tokens if info is not None else None,
                "num_blocks_free": stats.num_blocks_free if stats is not None else None,
                "num_blocks_total": stats.num_blocks_total if stats is not None else None}

    app.include_router(dashboard_router(registry, extra=dashboard_extra))
    return app


def refresh_engine_metrics(state: ServerState) -> Any:
    """Copy the core's latest SchedulerStats into the gauges / counters; returns them (None if no engine)."""
    if state.engine is None:
        return None
    stats = state.engine.stats()
    state.last_num_waiting = stats.num_waiting
    state.metrics.update_engine(stats.num_running, stats.num_waiting, stats.kv_cache_usage,
                                stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
    state.metrics.update_grammar(stats)
    return stats


async def _load(state: ServerState, factory: EngineFactory) -> None:
    t0 = time.monotonic()
    try:
        engine = await factory(state.engine_config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported on /health and logged; the process stays up
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("engine failed to start: %s", state.load_error)
        failed = state.extra.get("on_load_error")
        if failed is not None:
            failed()
        return
    state.engine = engine
    info = engine.model_info
    log.debug("model %s ready in %.1fs: max_model_len=%d, KV cache capacity %d tokens", state.model_name,
             time.monotonic() - t0, info.max_model_len, getattr(info, "kv_capacity_tokens", 0))
    ready = state.extra.get("on_ready")
    if ready is not None:
        ready()
