"""Gateway logs and metrics: replica polls logged at DEBUG only, per-replica series, no phantom pool after a
404, client 4xx counted apart from errors, and the dashboard's process info."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from tests.gateway.client import completion
from tests.gateway.conftest import start_gateway
from tokenmill.gateway.app import create_app
from tokenmill.gateway.config import (
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    ReplicaConfig,
)
from tokenmill.gateway.health import quiet_poll_logs
from tokenmill.gateway.replicas import ReplicaState

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)


def config(url: str) -> GatewayConfig:
    return GatewayConfig(pools=(PoolConfig(name="p", replicas=(ReplicaConfig(url=url),)),), health=FAST_HEALTH)


def poll_once(url: str) -> None:
    """One round of health checks and metric scrapes, as the gateway's background loops do."""
    gw = create_app(config(url)).state.gateway

    async def main() -> None:
        try:
            await gw.health.check_all()
            await gw.scraper.scrape_all(gw.pools["p"].replicas)
        finally:
            await gw.client.aclose()

    asyncio.run(main())
    rep = gw.pools["p"].replicas[0]
    assert rep.state is ReplicaState.READY and rep.load.scraped_at is not None  # the polls did happen


def test_replica_polls_are_debug_lines(procs, caplog: pytest.LogCaptureFixture) -> None:
    r1 = procs.test_replica(model="m1")
    with caplog.at_level(logging.INFO):
        poll_once(r1.url)
    assert not [r for r in caplog.records if r.name == "httpx"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        poll_once(r1.url)
    polls = [r for r in caplog.records if r.name == "httpx"]
    assert polls and all(r.levelno == logging.DEBUG for r in polls)
    assert any("/health" in r.getMessage() for r in polls) and any("/metrics" in r.getMessage() for r in polls)


def test_access_log_of_poll_paths_is_debug() -> None:
    quiet_poll_logs()
    access = logging.getLogger("uvicorn.access")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    access.addHandler(handler)
    old = access.level
    access.setLevel(logging.INFO)
    try:
        fmt = '%s - "%s %s HTTP/%s" %d'
        for path in ("/health", "/metrics", "/dashboard/stats?x=1", "/v1/completions"):
            access.info(fmt, "127.0.0.1:5000", "GET" if path != "/v1/completions" else "POST", path, "1.1", 200)
    finally:
        access.removeHandler(handler)
        access.setLevel(old)
    assert [r.args[2] for r in seen] == ["/v1/completions"]


def test_replica_label_client_errors_apart_and_no_phantom_pool(procs, gateways) -> None:
    r1 = procs.test_replica(model="m1")
    gw = start_gateway(config(r1.url))
    gateways.append(gw)
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        assert c.post("/v1/completions", json=completion(3, stream=False, model="m1")).status_code == 200
        assert c.post("/v1/completions", json=completion(3, stream=True, model="m1")).status_code == 200
        assert c.post("/v1/completions", json=completion(2, stream=False, model="nope")).status_code == 404
        text = c.get("/metrics").text
        stats = c.get("/dashboard/stats").json()
    rep = f'pool="p",replica="{r1.url}"'
    assert f'tokenmill_gateway_requests_total{{{rep},status="200"}} 2.0' in text
    assert f'tokenmill_gateway_upstream_latency_seconds_count{{{rep}}} 2.0' in text
    assert f'tokenmill_gateway_replica_in_flight{{{rep}}} 0.0' in text
    assert f'tokenmill_gateway_replica_ready{{{rep}}} 1.0' in text
    assert 'tokenmill_gateway_requests_total{pool="none",replica="",status="404"} 1.0' in text
    g = stats["gateway"]
    assert list(g["pools"]) == ["p"]  # the 404's pool="none" label is not a pool
    assert g["errors_total"] == 0 and g["client_errors_total"] == 1
    assert g["replicas"][r1.url]["ready"] == 1 and g["replicas"][r1.url]["errors_total"] == 0
    extra = stats["extra"]
    assert extra["pools"]["p"]["models"] == ["m1"] and extra["uptime_s"] >= 0 and extra["cpu"]
