"""LoRA adapters through the gateway: listed as models of their pool, routed only to replicas that serve
them, and (affinity policy) one adapter's traffic kept on its home replica while it has room."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.gateway.client import completion, post
from tests.gateway.conftest import start_gateway, wait_until
from tokenmill.gateway.config import (
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    QueueConfig,
    ReplicaConfig,
)
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.router import Affinity, RouteContext

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)


def pool_of(adapters: list[set[str]], policy: str = "affinity", max_concurrency: int = 32) -> Pool:
    p = Pool(PoolConfig(name="p", policy=policy, max_concurrency=max_concurrency,
                        replicas=tuple(ReplicaConfig(url=f"http://r{i}") for i in range(len(adapters)))), QueueConfig())
    for r, names in zip(p.replicas, adapters):
        r.model_names, r.adapters = ("base", *sorted(names)), frozenset(names)
    return p


def test_every_policy_sends_an_adapter_only_to_replicas_serving_it():
    for policy in ("round-robin", "least-outstanding", "power-of-two", "affinity"):
        p = pool_of([{"a"}, {"a", "b"}, set()], policy)
        picks = Counter(p._choose(RouteContext(adapter="b"), frozenset()).url for _ in range(20))
        assert picks == {"http://r1": 20}, policy
        picks = Counter(p._choose(RouteContext(adapter="a"), frozenset()).url for _ in range(20))
        assert set(picks) <= {"http://r0", "http://r1"}, policy
        assert p.adapters() == ["a", "b"]


def test_affinity_keeps_one_adapter_on_its_home_replica_until_bounded_load_spills():
    p = pool_of([{"a"}, {"a"}, {"a"}, set()], max_concurrency=100)
    ctx = RouteContext(affinity_key="lora:a", adapter="a")
    homes = []
    for _ in range(6):  # sequential requests (each finishes first): always the same home
        r = p._choose(ctx, frozenset())
        homes.append(r.url)
    assert len(set(homes)) == 1
    home = next(r for r in p.replicas if r.url == homes[0])
    # concurrent load: the home takes up to load_factor x the mean, then the ring's next replica that has "a"
    placed = []
    for _ in range(9):
        r = p._choose(ctx, frozenset())
        r.begin()
        placed.append(r.url)
    counts = Counter(placed)
    assert "http://r3" not in counts  # never a replica without the adapter
    assert counts[home.url] == max(counts.values()) and len(counts) >= 2
    assert max(counts.values()) <= Affinity().cap(p.replicas[:3])


def test_adapter_unknown_to_every_replica_falls_back_to_all_ready():
    p = pool_of([set(), set()], policy="round-robin")
    assert p._choose(RouteContext(adapter="stale"), frozenset()) is not None


def test_gateway_lists_adapters_and_routes_them(procs, gateways):
    r0 = procs.test_replica(model="base", adapters="sql")
    r1 = procs.test_replica(model="base", adapters="sql,chat")
    r2 = procs.test_replica(model="base")
    urls = (r0.url, r1.url, r2.url)
    gw = start_gateway(GatewayConfig(pools=(PoolConfig(name="p", policy="affinity", replicas=tuple(
        ReplicaConfig(url=u) for u in urls)),), health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            cards = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
            assert set(cards) == {"base", "sql", "chat"}
            assert cards["sql"]["parent"] == "base" and cards["chat"]["parent"] == "base"
            assert "parent" not in cards["base"]
            sql, chat = Counter(), Counter()
            for i in range(6):
                res = await post(c, "/v1/completions", completion(2, stream=False, model="sql", prompt=f"q{i}"))
                assert res.status == 200 and res.body["model"] == "sql"  # the adapter name reached the replica
                sql[res.replica] += 1
                res = await post(c, "/v1/completions", completion(2, stream=False, model="chat"))
                assert res.status == 200 and res.body["model"] == "chat"
                chat[res.replica] += 1
            assert chat == {r1.url: 6}
            assert len(sql) == 1 and set(sql) <= {r0.url, r1.url}  # one home, whatever the prompt
            # an adapter loaded on r2 at run time is picked up by the health checks and routed there
            await c.post(f"{r2.url}/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/x"})
            wait_until(lambda: "new" in gw.gateway.pools["p"].adapters(), 10, "the gateway to see adapter new")
            res = await post(c, "/v1/completions", completion(2, stream=False, model="new"))
            assert res.status == 200 and res.replica == r2.url and res.body["model"] == "new"
            missing = await post(c, "/v1/completions", completion(2, stream=False, model="nope"))
            assert missing.status == 404 and missing.body["error"]["code"] == "model_not_found"

    asyncio.run(main())
