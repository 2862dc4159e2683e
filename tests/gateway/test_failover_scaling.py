"""Failover under load, autoscaling a local pool up and down, and the Ray actuator (real processes)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import httpx
import pytest

from tests.gateway.client import completion, post
from tests.gateway.conftest import REPLICA_SCRIPT, start_gateway, wait_until
from tokenmill.gateway.config import (AutoscaleConfig, GatewayConfig, HealthConfig, PoolConfig, QueueConfig,
                                      ReplicaConfig, ReplicaSpec)
from tokenmill.gateway.replicas import ReplicaState

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)


def test_kill_a_replica_under_load(procs, gateways):
    reps = [procs.test_replica(token_delay=0.02) for _ in range(3)]
    victim = reps[1]
    cfg = GatewayConfig(pools=(PoolConfig(name="p", replicas=tuple(ReplicaConfig(url=r.url) for r in reps)),),
                        health=FAST_HEALTH)
    gw = start_gateway(cfg)
    gateways.append(gw)
    p = gw.gateway.pools["p"]

    async def main() -> list:
        results = []
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            async def worker() -> None:
                for _ in range(5):
                    results.append(await post(c, "/v1/completions", completion(20),
                                              on_first=lambda res: streaming.add(res.replica)))

            streaming: set[str] = set()
            tasks = [asyncio.create_task(worker()) for _ in range(6)]
            while victim.url not in streaming:  # kill it while it is streaming to a client
                await asyncio.sleep(0.01)
            victim.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)  # never a hang
        return results

    results = asyncio.run(main())
    assert len(results) == 30 and all(r.status == 200 and r.done for r in results)
    broken = [r for r in results if r.error is not None]
    # Only streams already running on the killed replica may fail, and they end with an error event.
    assert all(r.replica == victim.url and r.events for r in broken)
    assert all(r.text == "".join(f" w{i}" for i in range(20)) for r in results if r.error is None)
    assert 1 <= len(broken) <= 12
    dead = next(r for r in p.replicas if r.url == victim.url)
    wait_until(lambda: dead.state is ReplicaState.EJECTED, 5, "dead replica ejected")
    procs.restart(victim)
    wait_until(lambda: dead.state is ReplicaState.READY, 10, "replica re-admitted after it came back")

    async def after() -> set:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            res = await asyncio.gather(*(post(c, "/v1/completions", completion(10)) for _ in range(6)))
        assert all(r.status == 200 and r.error is None for r in res)
        return {r.replica for r in res}

    assert victim.url in asyncio.run(after())


def replica_spec(**kw: object) -> ReplicaSpec:
    cmd = (sys.executable, REPLICA_SCRIPT, "--host", "{host}", "--port", "{port}", "--token-delay", "0.02")
    return ReplicaSpec(command=cmd, startup_timeout_s=30, drain_timeout_s=30, **kw)


def test_autoscaler_scales_local_pool_up_under_load_and_down_when_idle(gateways):
    auto = AutoscaleConfig(min_replicas=1, max_replicas=3, target_queue_per_replica=1,
                           target_outstanding_per_replica=2, scale_up_cooldown_s=0.5, scale_down_cooldown_s=1.5,
                           interval_s=0.2)
    cfg = GatewayConfig(pools=(PoolConfig(name="auto", max_concurrency=2, spec=replica_spec(), autoscale=auto),),
                        health=FAST_HEALTH, queue=QueueConfig(max_size=64, max_wait_s=60))
    gw = start_gateway(cfg)
    gateways.append(gw)
    p = gw.gateway.pools["auto"]
    actuator = gw.gateway.scalers["auto"].actuator
    wait_until(lambda: len(p.ready_replicas()) == 1, 30, "first replica ready")
    seen_ready: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen_ready.append(len(p.ready_replicas()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def main() -> list:
        results = []
        async with httpx.AsyncClient(base_url=gw.url, timeout=90) as c:
            async def worker() -> None:
                for _ in range(4):
                    results.append(await post(c, "/v1/completions", completion(25)))

            await asyncio.gather(*(worker() for _ in range(10)))
        return results

    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert len(results) == 40 and all(r.status == 200 and r.done and r.error is None for r in results)
    assert max(seen_ready) >= 2
    assert len({r.replica for r in results}) >= 2
    wait_until(lambda: p.desired == 1 and len(p.replicas) == 1, 20, "idle pool back to 1 replica")
    wait_until(lambda: len(actuator.urls) == 1, 10, "drained replicas stopped")
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'tokenmill_gateway_replicas_desired{pool="auto"} 1.0' in text


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
