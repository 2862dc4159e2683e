"""Gateway behaviour against real replica processes (the quick test replica of replica_server.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.gateway.client import completion, post
from tests.gateway.conftest import start_gateway, wait_until
from tokenmill.gateway.config import (
    ApiKeyConfig,
    EmbeddingScorerConfig,
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    ReplicaConfig,
    RouteConfig,
    RouteExample,
    UpstreamConfig,
)
from tokenmill.gateway.replicas import ReplicaState

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)


def pool(name: str, urls: list[str], **kw: object) -> PoolConfig:
    return PoolConfig(name=name, replicas=tuple(ReplicaConfig(url=u) for u in urls), **kw)


def test_relay_headers_models_health_metrics(procs, gateways):
    r1 = procs.test_replica(model="m1")
    gw = start_gateway(GatewayConfig(pools=(pool("p", [r1.url]),), health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            res = await post(c, "/v1/completions", completion(5, model="m1"))
            assert res.status == 200 and res.done and res.text == " w0 w1 w2 w3 w4"
            assert res.headers["x-tokenmill-pool"] == "p" and res.replica == r1.url
            assert res.headers["content-type"].startswith("text/event-stream")
            res = await post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3, "model": "p"})  # by pool name
            assert res.status == 200 and res.body["choices"][0]["message"]["content"] == " w0 w1 w2"
            assert res.body["model"] == "m1"  # the pool name was rewritten to the served model
            emb = await post(c, "/v1/embeddings", {"input": ["a b", "c"], "model": "m1"})
            assert emb.status == 200 and len(emb.body["data"]) == 2
            models = (await c.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["m1"]
            bad = await post(c, "/v1/completions", completion(2, stream=False, model="nope"))
            assert bad.status == 404 and bad.body["error"]["code"] == "model_not_found"
            bad = await c.post("/v1/completions", content=b"{not json")
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
            assert (await c.get("/health")).json()["pools"]["p"]["ready"] == 1
            text = (await c.get("/metrics")).text
            rep = gw.gateway.pools["p"].replicas[0].url
            assert f'tokenmill_gateway_requests_total{{pool="p",replica="{rep}",status="200"}} 3.0' in text
            # 5 streamed + 3 from usage
            assert f'tokenmill_gateway_output_tokens_total{{pool="p",replica="{rep}"}} 8.0' in text
            assert f'tokenmill_gateway_ttft_seconds_count{{pool="p",replica="{rep}"}} 1.0' in text

    asyncio.run(main())


def test_retry_on_503_then_eject_and_readmit(procs, gateways):
    good = procs.test_replica()
    bad = procs.test_replica(fail_status=503)  # "not started" (e.g. its engine core restarting): retried
    gw = start_gateway(GatewayConfig(pools=(pool("p", [good.url, bad.url], policy="round-robin"),),
                                     health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> list:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return [await post(c, "/v1/completions", completion(3, stream=i % 2 == 0)) for i in range(8)]

    results = asyncio.run(main())
    assert all(r.status == 200 and r.replica == good.url for r in results)
    p = gw.gateway.pools["p"]
    bad_replica = next(r for r in p.replicas if r.url == bad.url)
    # /health of the failing replica still passes, so it is ejected by request failures and then re-admitted.
    assert gw.gateway.metrics.retries.labels("p")._value.get() >= 2
    assert gw.gateway.metrics.ejections.labels("p", bad.url)._value.get() >= 1
    wait_until(lambda: bad_replica.state is ReplicaState.READY, 5, "re-admission after eject_s")


def test_client_disconnect_closes_upstream(procs, gateways):
    r1 = procs.test_replica(token_delay=0.05)
    gw = start_gateway(GatewayConfig(pools=(pool("p", [r1.url]),), health=FAST_HEALTH))
    gateways.append(gw)

    def running() -> float:
        for line in httpx.get(f"{r1.url}/metrics").text.splitlines():
            if line.startswith("tokenmill_num_requests_running"):
                return float(line.split()[-1])
        raise AssertionError("no running gauge")

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            async with c.stream("POST", "/v1/completions", json=completion(200)) as r:
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if n >= 4:
                        break
                assert running() == 1  # still generating while the client holds the stream
        wait_until(lambda: running() == 0, 5, "replica stops generating after the client left")
        assert gw.gateway.pools["p"].outstanding() == 0

    asyncio.run(main())


def test_api_keys_401_and_rate_limit_429(procs, gateways):
    r1 = procs.test_replica()
    keys = (ApiKeyConfig(key="sk-a", name="a", requests_per_minute=2),)
    gw = start_gateway(GatewayConfig(pools=(pool("p", [r1.url]),), api_keys=keys, health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            r = await post(c, "/v1/completions", completion(2, stream=False))
            assert r.status == 401 and r.body["error"]["code"] == "invalid_api_key"
            r = await post(c, "/v1/completions", completion(2, stream=False), {"authorization": "Bearer nope"})
            assert r.status == 401
            ok = {"authorization": "Bearer sk-a"}
            assert (await post(c, "/v1/completions", completion(2, stream=False), ok)).status == 200
            assert (await post(c, "/v1/completions", completion(2), ok)).status == 200
            r = await post(c, "/v1/completions", completion(2, stream=False), ok)
            assert r.status == 429 and int(r.headers["retry-after"]) >= 1
            assert r.body["error"]["code"] == "rate_limit_exceeded"

    asyncio.run(main())


GREETING = {"messages": [{"role": "user", "content": "Hello! How are you today?"}], "max_tokens": 16}
CODE_TASK = {"messages": [{"role": "user", "content": (
    "Implement a Python class that parses a large CSV file, then validates each row against a schema, and finally "
    "writes the clean rows to a SQL database. Explain step by step:\n1. design the schema\n2. write the parser "
    "with `def parse(path):` and type hints\n3. handle malformed rows and return a summary\n4. compare the "
    "trade-offs of batching inserts versus streaming them, and analyze the complexity. ") * 2}],
    "max_tokens": 1024}


def test_alias_routes_small_and_large_with_headers(procs, gateways):
    small = procs.test_replica(model="small-model")
    large = procs.test_replica(model="large-model")
    routes = (RouteConfig(alias="auto", small="small", large="large", threshold=0.5),
              RouteConfig(alias="auto-emb", small="small", large="large", threshold=0.5, scorer="embedding",
                          embedding=EmbeddingScorerConfig(url=small.url, examples=(
                              RouteExample("hello how are you today", "small"),
                              RouteExample("thanks, good morning!", "small"),
                              RouteExample("implement a python parser class and explain step by step", "large"),
                              RouteExample("write sql schema, validate rows, analyze complexity", "large")))))
    gw = start_gateway(GatewayConfig(pools=(pool("small", [small.url]), pool("large", [large.url])), routes=routes,
                                     health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            for alias in ("auto", "auto-emb"):
                g = await post(c, "/v1/chat/completions", {**GREETING, "model": alias})
                assert g.status == 200 and g.headers["x-tokenmill-pool"] == "small"
                assert g.body["model"] == "small-model"
                assert float(g.headers["x-tokenmill-complexity"]) < 0.5
                t = await post(c, "/v1/chat/completions", {**CODE_TASK, "model": alias, "max_tokens": 4})
                assert t.status == 200 and t.headers["x-tokenmill-pool"] == "large"
                assert t.body["model"] == "large-model"
                assert float(t.headers["x-tokenmill-complexity"]) >= 0.5
            ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            assert ids == ["small-model", "large-model", "auto", "auto-emb"]
            missing = await post(c, "/v1/chat/completions", GREETING)  # no model, two pools
            assert missing.status == 400 and missing.body["error"]["param"] == "model"
            huge = await c.post("/v1/completions", content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}')
            assert huge.status_code == 413

    asyncio.run(main())
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'tokenmill_gateway_routing_decisions_total{alias="auto",pool="small"} 1.0' in text
    assert 'tokenmill_gateway_routing_decisions_total{alias="auto",pool="large"} 1.0' in text
    assert gw.gateway.dashboard_extra()["routing"]["auto"] == {"small": 1, "large": 1}


def test_power_of_two_and_round_robin_with_a_slow_replica(procs, gateways):
    """Round-robin ignores load; power-of-two sends fewer requests to a replica that holds them longer.
    (Least-outstanding and affinity run against real tokenmill replicas in test_real_replicas.py.)"""
    fast = procs.test_replica(token_delay=0.005)
    slow = procs.test_replica(token_delay=0.05, max_running=1)
    third = procs.test_replica(token_delay=0.005)
    urls = [fast.url, slow.url, third.url]
    gw = start_gateway(GatewayConfig(pools=(pool("rr", urls, policy="round-robin"),
                                            pool("p2c", urls, policy="power-of-two")), health=FAST_HEALTH))
    gateways.append(gw)

    async def main() -> tuple[Counter, Counter]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            rr = [await post(c, "/v1/completions", completion(2, model="rr")) for _ in range(9)]
            res = []

            async def worker() -> None:
                for _ in range(6):
                    res.append(await post(c, "/v1/completions", completion(8, model="p2c")))

            await asyncio.gather(*(worker() for _ in range(4)))
            assert len(res) == 24 and all(r.status == 200 and r.done for r in res)
            return Counter(r.replica for r in rr), Counter(r.replica for r in res)

    rr, p2c = asyncio.run(main())
    assert rr == Counter({u: 3 for u in urls})
    assert p2c[slow.url] < min(p2c[fast.url], p2c[third.url])


def test_first_byte_timeout_is_retried_on_another_replica(procs, gateways):
    good = procs.test_replica()
    stuck = procs.test_replica(ttft_delay=30)  # accepts, then sends nothing for 30 s
    cfg = GatewayConfig(pools=(pool("p", [stuck.url, good.url], policy="round-robin"),), health=FAST_HEALTH,
                        upstream=UpstreamConfig(first_byte_timeout_s=0.5))
    gw = start_gateway(cfg)
    gateways.append(gw)

    async def main() -> list:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            # streams only: a non-stream request is never cut by this timeout (tests/gateway/test_long_requests.py)
            return await asyncio.gather(*(post(c, "/v1/completions", completion(3)) for i in range(4)))

    results = asyncio.run(main())
    assert all(r.status == 200 and r.replica == good.url for r in results)
    assert gw.gateway.metrics.retries.labels("p")._value.get() >= 1
    assert gw.gateway.pools["p"].outstanding() == 0
