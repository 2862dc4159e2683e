"""The gateway: an OpenAI-compatible reverse proxy in front of pools of replicas.

A request is authenticated and rate-limited, resolved to a pool (by model name, or by an alias scored
small/large), admitted (a replica slot now, or a wait in the pool's queue), then forwarded; failures
before the first byte are retried once on another replica when that cannot run the work twice
(see proxy.py: a non-streamed request only when refused or answered 503). A 5xx the replica marks
as the request's own (x-tokenmill-error-scope: request) is relayed without counting against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tokenmill.dashboard.router import dashboard_router, process_info
from tokenmill.gateway.actuators import Actuator, make_actuator
from tokenmill.gateway.autoscaler import PoolScaler
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.drain import Drain, DrainGate
from tokenmill.gateway.files_passthrough import add_files_routes
from tokenmill.gateway.health import HealthChecker, quiet_poll_logs
from tokenmill.gateway.limits import AuthError, KeyRing, RateLimiter, estimate_tokens
from tokenmill.gateway.metrics import NO_REPLICA, GatewayMetrics
from tokenmill.gateway.model_router import ModelRouter, Scorer, prompt_text
from tokenmill.gateway.openapi import request_body
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.proxy import (
    Opened,
    Relay,
    RelayResponse,
    RelayResult,
    UpstreamFailure,
    count_tokens,
    open_upstream,
    read_whole,
    upstream_headers,
)
from tokenmill.gateway.queue import QueueFull, QueueTimeout
from tokenmill.gateway.router import RouteContext
from tokenmill.gateway.scraper import Scraper
from tokenmill.gateway.upstream import UpstreamClient

log = logging.getLogger("tokenmill.gateway")


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Gateway:
    """Owns pools, the upstream client and the background loops (health, scrape, autoscale)."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None,
                 scorers: dict[str, Scorer] | None = None, actuators: dict[str, Actuator] | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics(registry)
        self.pools = {p.name: Pool(p, config.queue) for p in config.pools}
        self.keys = KeyRing(config.api_keys)
        self.drain = Drain()
        self.limiter = RateLimiter()
        up = config.upstream
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(up.read_timeout_s, connect=up.connect_timeout_s),
            limits=httpx.Limits(max_connections=up.max_connections, max_keepalive_connections=up.max_connections))
        # Per replica the gateway never has more requests in flight than the pool's max_concurrency.
        per_replica = max((p.max_concurrency for p in config.pools), default=1)
        self.upstream = UpstreamClient(up.connect_timeout_s, up.read_timeout_s, up.max_connections, per_replica)
        self.model_router = ModelRouter(config.routes, self.client, scorers)
        self.health = HealthChecker(self.client, list(self.pools.values()), config.health, self.metrics)
        self.scraper = Scraper(self.client, lambda: [r for p in self.pools.values() for r in p.replicas],
                               config.health.scrape_interval_s, config.health.timeout_s)
        self.scalers: dict[str, PoolScaler] = {}
        for p in self.pools.values():
            if p.config.autoscale is not None:
                act = ((actuators or {}).get(p.name)  # max_replicas: the local actuator splits the cores
                       or make_actuator(p.config.spec, p.config.autoscale.max_replicas))  # type: ignore[arg-type]
                self.scalers[p.name] = PoolScaler(p, act, self.metrics, self.client)
        self.routing_counts: dict[str, dict[str, int]] = {a: {} for a in self.model_router.routes}
        self._tasks: list[asyncio.Task] = []
        self.metrics.watch_replicas(lambda: self.pools.values())
        self.started = time.time()
        for name, pool in self.pools.items():
            self.metrics.queue_depth.labels(name).set_function(lambda p=pool: len(p.queue))
            self.metrics.replicas_ready.labels(name).set_function(lambda p=pool: len(p.ready_replicas()))
            self.metrics.replicas_desired.labels(name).set_function(lambda p=pool: p.desired)

    async def start(self) -> None:
        await self.health.check_all()  # learn model names and drop dead replicas before serving
        self._tasks = [asyncio.create_task(self.health.run()), asyncio.create_task(self.scraper.run())]
        self._tasks += [asyncio.create_task(s.run()) for s in self.scalers.values()]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.scalers.values()), return_exceptions=True)
        await self.client.aclose()
        await self.upstream.close()

    def pool_for(self, model: str | None) -> Pool | None:
        if model is None:
            return next(iter(self.pools.values())) if len(self.pools) == 1 else None
        if model in self.pools:
            return self.pools[model]
        for p in self.pools.values():
            if model in p.model_names or any(model in r.model_names for r in p.replicas):
                return p
        return None

    def model_list(self) -> list[str]:
        names: list[str] = []
        for p in self.pools.values():
            names += list(p.model_names) or [p.config.model or p.name]
            names += p.adapters()
        names += list(self.model_router.routes)
        return list(dict.fromkeys(names))

    def adapter_parents(self) -> dict[str, str]:
        """LoRA adapter name -> the base model of its pool (the `parent` of its /v1/models entry)."""
        return {a: (p.model_names or (p.config.model or p.name,))[0]
                for p in self.pools.values() for a in p.adapters()}

    def dashboard_extra(self) -> dict:
        return {**process_info(self.started, {}),
                "pools": {n: {"replicas_desired": p.desired, "replicas_ready": len(p.ready_replicas()),
                              "queue_depth": len(p.queue), "outstanding": p.outstanding(),
                              "models": list(p.model_names) or [p.config.model or n]}
                          for n, p in self.pools.items()},
                "routing": {a: dict(c) for a, c in self.routing_counts.items()}}

    # -- one request ---------------------------------------------------------------------
    async def handle(self, request: Request, path: str) -> Response:
        arrived = time.monotonic()
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            return error_response(413, f"request body of {len(raw)} bytes exceeds the limit of "
                                  f"{self.config.max_body_bytes} bytes (max_body_bytes)", "invalid_request_error")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON", "invalid_request_error")
        except RecursionError:  # found by fuzzing: a body nested ~5000 levels deep was a 500
            return error_response(400, "request body is nested too deeply (JSON nesting limit: about 900 levels)",
                                  "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", "invalid_request_error")
        hdrs = {k.lower(): v for k, v in request.headers.items()}
        try:
            caller = self.keys.authenticate(hdrs.get("authorization"), hdrs.get("x-api-key"))
        except AuthError as e:
            self.metrics.requests.labels("none", NO_REPLICA, "401").inc()
            return error_response(401, str(e), "invalid_request_error", "invalid_api_key")
        model = body.get("model")
        extra_headers: dict[str, str] = {}
        if isinstance(model, str) and self.model_router.is_alias(model):
            decision = await self.model_router.route(model, body)
            pool = self.pools[decision.pool]
            self.metrics.routing_decisions.labels(model, pool.name).inc()
            counts = self.routing_counts[model]
            counts[pool.name] = counts.get(pool.name, 0) + 1
            extra_headers["x-tokenmill-complexity"] = f"{decision.score.value:.4f}"
        else:
            pool = self.pool_for(model if isinstance(model, str) else None)
        if pool is None and model is None:
            self.metrics.requests.labels("none", NO_REPLICA, "400").inc()
            return error_response(400, f"model: required when the gateway serves several models; available: "
                                  f"{', '.join(self.model_list())}", "invalid_request_error", "missing_model", "model")
        if pool is None:
            self.metrics.requests.labels("none", NO_REPLICA, "404").inc()
            return error_response(404, f"The model `{model}` does not exist; available: "
                                  f"{', '.join(self.model_list())}", "invalid_request_error", "model_not_found", "model")
        extra_headers["x-tokenmill-pool"] = pool.name
        wait = self.limiter.check(caller, estimate_tokens(body), time.monotonic())
        if wait is not None:
            self.metrics.requests.labels(pool.name, NO_REPLICA, "429").inc()
            return error_response(429, f"rate limit of API key {caller.name!r} exceeded; retry in {wait:.1f} s",
                                  "rate_limit_error", "rate_limit_exceeded", retry_after=wait)
        priority = caller.priority + _request_priority(body, hdrs.get(self.config.queue.priority_header.lower()))
        key_text = hdrs.get("x-session-id")
        adapter = model if isinstance(model, str) and model in pool.adapters() else None
        if adapter is not None:  # affinity: one adapter's traffic stays on its home replicas (warm slots)
            key_text = f"lora:{adapter}"
        elif key_text is None and pool.config.policy == "affinity":
            key_text = prompt_text(body)[: pool.config.affinity_prefix_chars] or None
        ctx = RouteContext(affinity_key=key_text, adapter=adapter)
        return await self._forward(pool, path, body, raw, hdrs, ctx, priority, caller.name, arrived, extra_headers)

    async def _admit(self, pool: Pool, ctx: RouteContext, priority: int, key: str,
                     exclude: frozenset[str] = frozenset()):
        try:
            replica, waited = await pool.acquire(ctx, priority, key, exclude)
        except QueueFull as e:
            self.metrics.requests.labels(pool.name, NO_REPLICA, "429").inc()
            return error_response(429, f"{e}; retry later", "rate_limit_error", "queue_full",
                                  retry_after=self.config.queue.retry_after_s)
        except QueueTimeout as e:
            self.metrics.requests.labels(pool.name, NO_REPLICA, "503").inc()
            return error_response(503, str(e), "server_error", "queue_timeout",
                                  retry_after=self.config.queue.retry_after_s)
        self.metrics.queue_time.labels(pool.name).observe(waited)
        return replica

    async def _forward(self, pool: Pool, path: str, body: dict, raw: bytes, hdrs: dict[str, str],
                       ctx: RouteContext, priority: int, key: str, arrived: float,
                       extra_headers: dict[str, str]) -> Response:
        admitted = await self._admit(pool, ctx, priority, key)
        if isinstance(admitted, Response):
            return admitted
        replica = admitted
        up_headers = upstream_headers(hdrs, pool.config.api_key, pass_auth=not self.keys.enabled)
        stream = body.get("stream") is True
        opened: Opened | None = None
        whole: bytes | None = None  # the full body, for anything that is not a 200 stream
        up = self.config.upstream
        for attempt in (0, 1):
            content = raw if ctx.adapter is not None else _body_for(replica.model_names or pool.model_names, body, raw)
            try:
                opened = await open_upstream(self.upstream, f"{replica.url}{path}", content, up_headers,
                                             up.first_byte_timeout_s, stream, up.request_timeout_s)
                if not (stream and opened.status == 200):
                    whole = await read_whole(opened, retry=stream)
                break
            except UpstreamFailure as e:
                log.warning("pool %s: %s", pool.name, e)
                self.health.passive_failure(pool, replica, hard=e.hard)
                pool.release(replica)
                if attempt == 1 or not e.retry:
                    return self._failed(pool, replica.url, e, extra_headers)
                self.metrics.retries.labels(pool.name).inc()
                admitted = await self._admit(pool, ctx, priority, key, frozenset({replica.url}))
                if isinstance(admitted, Response):
                    return admitted
                replica = admitted
        assert opened is not None
        if opened.status < 500:  # a 5xx here is marked as the request's own: neither a failure nor a success
            self.health.passive_success(replica)
        headers = {**opened.headers, **extra_headers, "x-tokenmill-replica": replica.url}
        name = pool.name

        def on_first() -> None:
            ttft = time.monotonic() - arrived
            self.metrics.ttft.labels(name, replica.url).observe(ttft)
            pool.record_ttft(ttft)

        def on_done(res: RelayResult) -> None:
            pool.release(replica)
            self.metrics.upstream_latency.labels(name, replica.url).observe(time.monotonic() - opened.sent_at)
            self.metrics.output_tokens.labels(name, replica.url).inc(res.output_tokens)
            status = "stream_error" if res.failed else str(opened.status)
            self.metrics.requests.labels(name, replica.url, status).inc()
            if res.failed:
                self.health.passive_failure(pool, replica)

        if whole is None:
            return RelayResponse(Relay(opened, on_first, on_done), status_code=opened.status, headers=headers)
        res = RelayResult()
        usage: list[int] = []
        count_tokens(whole, res, usage)
        res.output_tokens = usage[-1] if usage else (res.output_tokens if opened.status == 200 else 0)
        on_done(res)
        return Response(whole, status_code=opened.status, headers=headers)

    def _failed(self, pool: Pool, url: str, e: UpstreamFailure, extra_headers: dict[str, str]) -> Response:
        """What the client gets when no (further) attempt is made: the replica's own 5xx when there was one."""
        if e.response is not None:
            status, rh, data = e.response
            self.metrics.requests.labels(pool.name, url, str(status)).inc()
            return Response(data, status_code=status, headers={**rh, **extra_headers})
        if not e.retry:  # the replica may have run it: say so, and invite no blind resend
            self.metrics.requests.labels(pool.name, url, str(e.status)).inc()
            what = "did not answer in time" if e.status == 504 else "failed"
            return error_response(e.status, f"replica {url} of pool {pool.name!r} {what} after the request was "
                                  f"sent; it was not retried as it may have run: {e}", "server_error",
                                  "upstream_timeout" if e.status == 504 else "upstream_error")
        self.metrics.requests.labels(pool.name, url, "503").inc()
        return error_response(503, f"no replica of pool {pool.name!r} could serve the request: {e}",
                              "server_error", "upstream_unavailable", retry_after=1)


def _request_priority(body: dict, header: str | None) -> int:
    p = body.get("priority")
    if isinstance(p, int) and not isinstance(p, bool):
        return p
    if header is not None:
        with contextlib.suppress(ValueError):
            return int(header)
    return 0


def _body_for(served: tuple[str, ...], body: dict, raw: bytes) -> bytes:
    """The body as sent, or with `model` rewritten when the client named an alias or a pool."""
    model = body.get("model")
    if not served or model in served or model is None:
        return raw
    return json.dumps({**body, "model": served[0]}).encode()


def _endpoint(gw: Gateway, path: str):  # a closure, so `path` is no parameter in the OpenAPI document
    async def endpoint(request: Request) -> Response:
        return await gw.handle(request, path)
    return endpoint


def create_app(config: GatewayConfig, registry: CollectorRegistry | None = None,
               scorers: dict[str, Scorer] | None = None, actuators: dict[str, Actuator] | None = None) -> FastAPI:
    gw = Gateway(config, registry, scorers, actuators)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="tokenmill gateway", lifespan=lifespan)
    app.state.gateway = gw
    app.add_middleware(DrainGate, drain=gw.drain)

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        app.add_api_route(path, _endpoint(gw, path), methods=["POST"], name=path, openapi_extra=request_body(path))
    add_files_routes(app, gw)  # /v1/files, /v1/batches: pinned to the replica that holds the file

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        now = int(time.time())
        parents = gw.adapter_parents()
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "tokenmill",
             **({"parent": parents[m]} if m in parents else {})} for m in gw.model_list()]})

    @app.get("/health")
    async def health() -> JSONResponse:
        pools = {n: {"ready": len(p.ready_replicas()), "desired": p.desired, "queued": len(p.queue)}
                 for n, p in gw.pools.items()}
        ok = any(v["ready"] or gw.pools[n].autoscaled for n, v in pools.items())
        status = "draining" if gw.drain.draining else "ok" if ok else "unavailable"
        return JSONResponse({"status": status, "pools": pools}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(dashboard_router(gw.metrics.registry, extra=gw.dashboard_extra))
    quiet_poll_logs()
    return app
