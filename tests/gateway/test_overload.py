"""Overload: a burst of 10x what a replica holds, straight at `tokenmill serve` (its --max-queued-requests
admission) and through the gateway (its pool concurrency and admission queue).

Every admitted request completes with all its tokens, every refused one is a 429 (or a 503 queue timeout)
carrying Retry-After, nothing hangs (the whole burst is bounded), and afterwards the replica is idle and
still serving. The client is benchmarks/overload.py's, which prints the same figures for docs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from benchmarks.overload import burst, summarize
from tests.fixtures.servers import start_server
from tests.gateway.conftest import start_gateway, wait_until
from tests.gateway.test_long_requests import PASSIVE_ONLY
from tests.gateway.test_proxy_live import pool
from tokenmill.gateway.config import GatewayConfig, QueueConfig

MAX_NUM_SEQS, MAX_QUEUED = 2, 2
HOLDS = MAX_NUM_SEQS + MAX_QUEUED
BURST = 10 * HOLDS
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    s = start_server(tiny_llama_dir, "--max-model-len", "256", "--kv-cache-memory", "0.02", "--dtype", "float32",
                     "--served-model-name", "tiny", "--max-num-seqs", str(MAX_NUM_SEQS),
                     "--max-queued-requests", str(MAX_QUEUED), tmp_dir=tmp_path_factory.mktemp("overload"))
    yield s
    s.stop(10)


def gauge(url: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
              if line.startswith((name + "{", name + " "))]
    assert values, f"{url}/metrics has no {name}"
    return sum(values)


def idle_and_serving(url: str) -> None:
    wait_until(lambda: gauge(url, "tokenmill_num_requests_running") == 0
               and gauge(url, "tokenmill_num_requests_waiting") == 0, 30, "the replica idle after the burst")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_burst_against_the_server_alone(server):
    res = summarize(asyncio.run(burst(server.url, BURST, MAX_TOKENS, timeout_s=240)), MAX_TOKENS)
    assert res["other_status"] == [] and res["refused_503"] == 0, res
    assert res["admitted"] + res["refused_429"] == BURST, res
    # all arrive within a few ms while the first take a whole generation: at least what the replica holds is
    # admitted (more only when a slot frees before the last arrivals), and the rest turned away
    assert HOLDS <= res["admitted"] < BURST and res["refused_429"] >= 1, res
    assert res["admitted_all_completed"] and res["refused_all_with_retry_after"], res
    idle_and_serving(server.url)


def test_burst_through_the_gateway_to_the_server(server, gateways):
    queue = QueueConfig(max_size=MAX_QUEUED, max_wait_s=60)
    gw = start_gateway(GatewayConfig(pools=(pool("p", [server.url], max_concurrency=MAX_NUM_SEQS),), queue=queue,
                                     health=PASSIVE_ONLY))
    gateways.append(gw)
    res = summarize(asyncio.run(burst(gw.url, BURST, MAX_TOKENS, timeout_s=240)), MAX_TOKENS)
    # The gateway holds the excess: the replica never sees more than max_concurrency, so it never refuses.
    assert res["other_status"] == [] and res["refused_503"] == 0, res
    assert res["admitted"] + res["refused_429"] == BURST and res["refused_429"] >= 1, res
    assert res["admitted"] >= HOLDS, res
    assert res["admitted_all_completed"] and res["refused_all_with_retry_after"], res
    p = gw.gateway.pools["p"]
    assert p.outstanding() == 0 and len(p.queue) == 0
    assert gw.gateway.metrics.requests.labels("p", server.url, "429")._value.get() == 0  # none from the replica
    idle_and_serving(server.url)


def test_gateway_queue_bounds_the_wait(procs, gateways):
    """A deterministic replica (8 tokens 0.1 s apart): 2 run, 4 wait, the other 34 get 429 at once; a waiter
    never waits past max_wait_s (then 503 queue_timeout), so an admitted TTFT is bounded by the queue."""
    replica = procs.test_replica(token_delay=0.1)
    max_wait_s = 5.0
    gw = start_gateway(GatewayConfig(pools=(pool("p", [replica.url], max_concurrency=2),), health=PASSIVE_ONLY,
                                     queue=QueueConfig(max_size=4, max_wait_s=max_wait_s, retry_after_s=2)))
    gateways.append(gw)
    outcomes = asyncio.run(burst(gw.url, 40, 8, timeout_s=60))
    res = summarize(outcomes, 8)
    assert res["other_status"] == [] and res["admitted_all_completed"], res
    assert res["admitted"] + res["refused_503"] <= 6 and res["refused_429"] >= 34, res  # 2 slots + 4 in the queue
    assert all(o.retry_after == "2" for o in outcomes if o.status != 200), res
    assert {o.code for o in outcomes if o.status == 429} == {"queue_full"}
    hist = gw.gateway.metrics.queue_time.labels("p")
    assert hist._sum.get() <= res["admitted"] * max_wait_s  # no admitted request waited past max_wait_s
    assert res["ttft_max_s"] is not None and res["ttft_max_s"] < max_wait_s + 10
    p = gw.gateway.pools["p"]
    assert p.outstanding() == 0 and len(p.queue) == 0
