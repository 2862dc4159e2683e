"""FastAPI app factory. The port is open before the model is loaded: until the engine core reports ready,
/health and every model endpoint answer 503, so orchestrators see "loading" rather than "refused"."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import tokenmill
from tokenmill.batch.worker import start_batches, stop_batches
from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.dashboard.router import dashboard_router, process_info
from tokenmill.engine.stats import SchedulerStats
from tokenmill.model.default_model import DEFAULT_MODEL_NAME
from tokenmill.server.access import AccessMiddleware
from tokenmill.server.batches_api import batches_router
from tokenmill.server.core_supervisor import supervise
from tokenmill.server.errors import (
    APIError,
    engine_dead,
    install_error_handlers,
    unavailable,
)
from tokenmill.server.files_api import files_router
from tokenmill.server.lora_api import LoRARegistry, load_static_adapters, lora_router
from tokenmill.server.lora_metrics import LoRAMetrics
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.openapi import install_openapi, route_doc
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
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
                        registry=registry, metrics=ServerMetrics(registry, names[0], _spec_tokens(engine_config)),
                        chat_template=chat_template, created=int(time.time()))
    state.loras = LoRARegistry.from_config(names[0], engine_config.lora)
    if engine_config.lora is not None:
        state.lora_metrics = LoRAMetrics(registry, names[0], engine_config.lora.max_loras, state.metrics.core_counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_run_engine(state, engine_factory))
        start_batches(state)  # resumes the batch jobs a previous process left active
        try:
            yield
        finally:
            state.draining = True
            await stop_batches(state)  # before the engine goes: running lines are rerun on the next start
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.engine is not None:
                await state.engine.shutdown()
            log.info("tokenmill server stopped")

    app = FastAPI(title="tokenmill", version=tokenmill.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    install_openapi(app)
    app.state.tokenmill = state
    install_error_handlers(app)

    app.add_middleware(AccessMiddleware, api_key=server_config.api_key, metrics_open=server_config.metrics_open)

    @app.post("/v1/completions", openapi_extra=route_doc(CompletionRequest, CompletionResponse, stream=True))
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    @app.post("/v1/chat/completions", openapi_extra=route_doc(ChatCompletionRequest, ChatCompletionResponse, stream=True))
    async def chat(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @app.post("/v1/embeddings", openapi_extra=route_doc(EmbeddingRequest, None))
    async def embeddings(request: Request) -> Response:
        return await create_embedding(state, request)

    @app.get("/v1/models")
    async def models() -> Response:
        check_ready(state)  # 503 while loading, like every model endpoint (docs/server.md)
        return list_models(state)

    @app.post("/tokenize", openapi_extra=route_doc(TokenizeRequest, TokenizeResponse))
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(state, request)

    @app.post("/detokenize", openapi_extra=route_doc(DetokenizeRequest, DetokenizeResponse))
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
                raise engine_dead(state.load_error or state.engine.dead_reason)
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
        body = {"ready": state.engine is not None and not state.engine.errored,
                "in_flight_seqs": state.in_flight_seqs, "core_restarts": state.core_restarts}
        if stats is not None:
            body["engine"] = {k: getattr(stats, k) for k in stats.__slots__}
            body["core_pid"] = None if state.engine.errored else state.engine.model_info.extra.get("pid")
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

    app.include_router(files_router(state))
    app.include_router(lora_router(state))
    app.include_router(batches_router(state))
    app.include_router(dashboard_router(registry, extra=dashboard_extra))
    return app


def refresh_engine_metrics(state: ServerState) -> Any:
    """Copy the core's latest SchedulerStats into the gauges / counters; returns them (None if no engine)."""
    if state.engine is None:
        return None
    # a dead core's last figures are stale (its requests all failed), and re-reading its cumulative
    # counters after metrics.engine_restarted() would count them twice
    stats = SchedulerStats() if state.engine.errored else state.engine.stats()
    state.last_num_waiting = stats.num_waiting
    state.metrics.update_engine(stats.num_running, stats.num_waiting, stats.kv_cache_usage,
                                stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions)
    state.metrics.update_grammar(stats)
    state.metrics.update_spec(stats)
    if state.lora_metrics is not None:
        state.lora_metrics.update(stats, len(state.loras.adapters))
    return stats


def _spec_tokens(config: EngineConfig) -> int:
    """Drafts per step (0: no speculative decoding), for the per-position metric's labels."""
    return config.speculative.num_speculative_tokens if config.speculative is not None else 0


async def _run_engine(state: ServerState, factory: EngineFactory) -> None:
    """Load the engine, then keep it running (restarts after a core death, see core_supervisor)."""
    if await _load(state, factory):
        if not await load_static_adapters(state):
            failed = state.extra.get("on_fatal")
            if failed is not None:
                failed()
            return
        await supervise(state, factory)


async def _load(state: ServerState, factory: EngineFactory) -> bool:
    t0 = time.monotonic()
    try:
        engine = await factory(state.engine_config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported on /health and logged; the process stays up
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("engine failed to start: %s", state.load_error)
        failed = state.extra.get("on_fatal")
        if failed is not None:
            failed()
        return False
    state.engine = engine
    info = engine.model_info
    log.debug("model %s ready in %.1fs: max_model_len=%d, KV cache capacity %d tokens", state.model_name,
             time.monotonic() - t0, info.max_model_len, getattr(info, "kv_capacity_tokens", 0))
    ready = state.extra.get("on_ready")
    if ready is not None:
        ready()
    return True
