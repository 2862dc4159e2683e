"""Non-streamed requests that run longer than the stream timeouts: answered once, never cut or run twice.

A non-stream request sends nothing until generation ends, so the first-byte timeout and the idle watchdog
(read_timeout_s) must not apply to it; only upstream.request_timeout_s (default: none) bounds it, and
past that bound the gateway answers 504 without sending the work to another replica."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.gateway.client import completion, post
from tests.gateway.conftest import start_gateway
from tests.gateway.test_proxy_live import pool
from tokenmill.gateway.config import (
    GatewayConfig,
    HealthConfig,
    UpstreamConfig,
    config_from_dict,
)
from tokenmill.gateway.replicas import ReplicaState

# Active checks only at start, so a replica's failure count is what proxied requests recorded.
PASSIVE_ONLY = HealthConfig(interval_s=600, timeout_s=1.0, failure_threshold=3, eject_s=0.5)


def received(url: str) -> int:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("test_replica_received_total"):
            return int(float(line.split()[-1]))
    raise AssertionError(f"{url}/metrics has no test_replica_received_total")


def test_long_non_stream_is_answered_once_past_the_stream_timeouts(procs, gateways):
    slow = procs.test_replica(ttft_delay=1.5)  # silent for 1.5 s, three times both stream timeouts
    other = procs.test_replica()
    cfg = GatewayConfig(pools=(pool("p", [slow.url, other.url], policy="round-robin"),), health=PASSIVE_ONLY,
                        upstream=UpstreamConfig(first_byte_timeout_s=0.5, read_timeout_s=0.5))
    gw = start_gateway(cfg)
    gateways.append(gw)

    async def main() -> list:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return [await post(c, p, body) for p, body in (
                ("/v1/completions", completion(4, stream=False)),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))]

    results = asyncio.run(main())
    # round-robin: one request went to each replica; the slow one answered after 1.5 s, and nothing was resent
    assert [r.status for r in results] == [200, 200]
    assert {r.replica for r in results} == {slow.url, other.url}
    assert results[0].body["choices"][0]["text"] == " w0 w1 w2 w3"
    assert received(slow.url) == 1 and received(other.url) == 1
    assert gw.gateway.metrics.retries.labels("p")._value.get() == 0
    assert all(r.state is ReplicaState.READY and r.consecutive_failures == 0 for r in gw.gateway.pools["p"].replicas)
    assert gw.gateway.pools["p"].outstanding() == 0


def test_request_timeout_answers_504_and_does_not_run_the_work_twice(procs, gateways):
    stuck = procs.test_replica(ttft_delay=30)
    other = procs.test_replica()
    cfg = GatewayConfig(pools=(pool("p", [stuck.url, other.url], policy="round-robin"),), health=PASSIVE_ONLY,
                        upstream=UpstreamConfig(request_timeout_s=0.5))
    gw = start_gateway(cfg)
    gateways.append(gw)

    async def main():
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return await post(c, "/v1/completions", completion(2, stream=False))

    res = asyncio.run(main())
    assert res.status == 504 and res.body["error"]["code"] == "upstream_timeout"
    assert "retry-after" not in res.headers  # it may have run: no invitation to resend blindly
    assert received(stuck.url) == 1 and received(other.url) == 0
    assert gw.gateway.metrics.retries.labels("p")._value.get() == 0
    stuck_replica = next(r for r in gw.gateway.pools["p"].replicas if r.url == stuck.url)
    assert stuck_replica.consecutive_failures == 1  # a timeout is the replica's fault: counted


def test_request_timeout_config():
    pools = [{"name": "p", "replicas": ["http://127.0.0.1:1"]}]
    assert config_from_dict({"pools": pools}).upstream.request_timeout_s is None  # unbounded by default
    cfg = config_from_dict({"pools": pools, "upstream": {"request_timeout_s": 900}})
    assert cfg.upstream.request_timeout_s == 900.0
    with pytest.raises(ValueError, match=r"upstream\.request_timeout_s: 0\.0 is not allowed; expected > 0"):
        config_from_dict({"pools": pools, "upstream": {"request_timeout_s": 0}})
