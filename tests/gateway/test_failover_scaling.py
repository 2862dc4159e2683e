"""Scale-from-zero on local processes and the Ray actuator, with quick test replicas (real processes).

Killing a replica under load and scaling a pool 1 -> 2 -> 1 run on real tokenmill replicas in
test_real_replicas.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import httpx
import pytest

from tests.gateway.client import completion, post
from tests.gateway.conftest import REPLICA_SCRIPT, start_gateway, wait_until
from tokenmill.gateway.config import AutoscaleConfig, GatewayConfig, HealthConfig, PoolConfig, ReplicaSpec

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)


def replica_spec(**kw: object) -> ReplicaSpec:
    cmd = (sys.executable, REPLICA_SCRIPT, "--host", "{host}", "--port", "{port}", "--token-delay", "0.02")
    return ReplicaSpec(command=cmd, startup_timeout_s=30, drain_timeout_s=30, **kw)


def test_scale_from_zero_first_request_waits_for_cold_start(gateways):
    auto = AutoscaleConfig(min_replicas=0, max_replicas=1, idle_to_zero_s=1.0, scale_down_cooldown_s=0.5,
                           interval_s=0.2)
    cfg = GatewayConfig(pools=(PoolConfig(name="z", spec=replica_spec(), autoscale=auto),), health=FAST_HEALTH)
    gw = start_gateway(cfg)
    gateways.append(gw)
    p = gw.gateway.pools["z"]
    assert p.desired == 0 and not p.replicas
    r = asyncio.run(post(httpx.AsyncClient(base_url=gw.url, timeout=60), "/v1/completions", completion(3)))
    assert r.status == 200 and r.text == " w0 w1 w2"
    wait_until(lambda: p.desired == 0 and not p.replicas, 15, "idle pool back to zero")


def test_a_managed_replica_that_dies_is_replaced(gateways):
    auto = AutoscaleConfig(min_replicas=1, max_replicas=1, interval_s=0.2)
    gw = start_gateway(GatewayConfig(pools=(PoolConfig(name="m", spec=replica_spec(), autoscale=auto),),
                                     health=FAST_HEALTH))
    gateways.append(gw)
    p = gw.gateway.pools["m"]
    act = gw.gateway.scalers["m"].actuator
    wait_until(lambda: len(p.ready_replicas()) == 1, 30, "replica ready")
    first = p.ready_replicas()[0].url
    os.killpg(act.pid(first), signal.SIGKILL)
    wait_until(lambda: [r.url for r in p.ready_replicas()] not in ([], [first]), 30, "a new replica in rotation")
    assert act.urls == [p.ready_replicas()[0].url]
    r = asyncio.run(post(httpx.AsyncClient(base_url=gw.url, timeout=30), "/v1/completions", completion(2)))
    assert r.status == 200 and r.text == " w0 w1"


def test_ray_actuator_starts_and_stops_a_replica():
    pytest.importorskip("ray")
    from tokenmill.gateway.actuators.ray import RayActuator

    act = RayActuator(num_cpus=0.5, init_kwargs={"num_cpus": 2, "include_dashboard": False})

    async def main() -> None:
        try:
            url = await act.start(replica_spec())
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "ray replica never became healthy"
                await asyncio.sleep(0.2)
            assert await act.alive(url)
            res = await post(httpx.AsyncClient(timeout=30), f"{url}/v1/completions", completion(2, stream=False))
            assert res.body["choices"][0]["text"] == " w0 w1"
            await act.stop(url)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/health", timeout=2)
            assert not await act.alive(url)
        finally:
            await act.close()

    asyncio.run(main())
    import ray

    assert not ray.is_initialized()


def test_failing_replica_starts_back_off(gateways):
    bad = ReplicaSpec(command=(sys.executable, "-c", "import sys; sys.exit(3)"), startup_timeout_s=10)
    gw = start_gateway(GatewayConfig(pools=(PoolConfig(name="b", spec=bad, autoscale=AutoscaleConfig(interval_s=0.1)),),
                                     health=FAST_HEALTH))
    gateways.append(gw)
    scaler = gw.gateway.scalers["b"]
    wait_until(lambda: scaler._failed_starts >= 2, 20, "two failed starts")
    time.sleep(1.0)
    assert scaler._failed_starts <= 3  # backoff 2 s, 4 s, ...: not one start per 0.1 s step
    assert not gw.gateway.pools["b"].ready_replicas()
    r = httpx.get(f"{gw.url}/health").json()
    assert r["pools"]["b"]["ready"] == 0
