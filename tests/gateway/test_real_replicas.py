"""The gateway in front of real `tokenmill serve` replicas on tiny random models.

Module-scoped: two tiny-Llama replicas (A, B), one deliberately slow replica (C: a wider, deeper random
Llama with --max-num-seqs 1, same tokenizer and served name) and an all-MiniLM-L6-v2 embedding replica
(for the embedding-similarity scorer), all started in parallel once.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.gateway.client import post
from tests.gateway.conftest import ProcessSet, start_gateway, wait_healthy, wait_until
from tokenmill.gateway.actuators import free_port
from tokenmill.gateway.config import (
    AutoscaleConfig,
    EmbeddingScorerConfig,
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    QueueConfig,
    ReplicaConfig,
    ReplicaSpec,
    RouteConfig,
    RouteExample,
)
from tokenmill.gateway.replicas import ReplicaState

pytestmark = pytest.mark.slow

SERVE = "import typer; from tokenmill.server.cli import serve_command; typer.run(serve_command)"
FLAGS = ["--max-model-len", "256", "--kv-cache-memory", "0.02", "--dtype", "float32", "--served-model-name",
         "tiny", "--max-num-seqs", "16"]
FAST_HEALTH = HealthConfig(interval_s=0.25, timeout_s=2.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.25)
# The policy test counts where requests land, so a replica must not be ejected when, with four replicas and
# the gateway on two cores, its /health answer is slow for a moment (seen once in `make test`: b got 2 of 18).
PATIENT_HEALTH = HealthConfig(interval_s=0.25, timeout_s=10.0, failure_threshold=5, eject_s=0.5, scrape_interval_s=0.25)


def serve_cmd(model: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", SERVE, str(model), "--host", "127.0.0.1", "--port", str(port), *FLAGS, *extra]


class Replicas:
    def __init__(self, procs: ProcessSet, fast: list, slow, embed) -> None:
        self.procs, self.fast, self.slow, self.embed = procs, fast, slow, embed


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_models import build_tiny_model

    # Several times the tiny model's step time even on an idle machine, so "slow" does not depend on load.
    return build_tiny_model(tmp_path_factory.mktemp("gw_slow_llama"), "llama", hidden_size=512,
                            intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir, slow_model_dir, minilm_dir):
    ps = ProcessSet()
    ports = [free_port() for _ in range(4)]
    embed_cmd = [sys.executable, "-c", SERVE, str(minilm_dir), "--host", "127.0.0.1", "--port", str(ports[3]),
                 "--task", "embed", "--served-model-name", "minilm", "--dtype", "float32"]
    cmds = [serve_cmd(tiny_llama_dir, ports[0]), serve_cmd(tiny_llama_dir, ports[1]),
            serve_cmd(slow_model_dir, ports[2], "--max-num-seqs", "1"), embed_cmd]
    try:
        started = [ps.spawn(cmd, port) for cmd, port in zip(cmds, ports)]  # all load in parallel
        for p in started:
            wait_healthy(p.url, p.popen, 180)
        yield Replicas(ps, started[:2], started[2], started[3])
    finally:
        ps.close()


def comp(n: int, **kw: object) -> dict:
    return {"model": "tiny", "prompt": "Hello there, tell me a story", "max_tokens": n, "stream": True,
            "temperature": 0, "ignore_eos": True, **kw}


def finished(r) -> bool:
    return r.status == 200 and r.done and r.error is None and r.events[-1]["choices"][0]["finish_reason"] == "length"


def pool(name: str, urls: list[str], **kw: object) -> PoolConfig:
    return PoolConfig(name=name, replicas=tuple(ReplicaConfig(url=u) for u in urls), **kw)


def test_policies_spread_load_and_avoid_the_slow_replica(replicas, gateways):
    a, b = (r.url for r in replicas.fast)
    c = replicas.slow.url
    gw = start_gateway(GatewayConfig(pools=(
        pool("rr", [a, b, c], policy="round-robin"), pool("lo", [a, b, c], policy="least-outstanding"),
        pool("aff", [a, b], policy="affinity")), health=PATIENT_HEALTH))
    gateways.append(gw)

    async def main() -> dict[str, Counter]:
        out = {}
        async with httpx.AsyncClient(base_url=gw.url, timeout=120) as cl:
            rr = [await post(cl, "/v1/completions", comp(2, model="rr")) for _ in range(6)]
            assert all(finished(r) for r in rr)
            out["rr"] = Counter(r.replica for r in rr)
            res = []

            # Six workers on three replicas: each choice sees requests in flight, and the slow one's stay longer.
            # (With three workers, one per replica, each returned to the replica it had just freed, and the split
            # came down to tie-breaking once the fast workers were done: a fast replica got 4 of 18, as few as C.)
            async def worker() -> None:
                for _ in range(4):
                    res.append(await post(cl, "/v1/completions", comp(6, model="lo")))

            await asyncio.gather(*(worker() for _ in range(6)))
            assert len(res) == 24 and all(finished(r) for r in res)
            out["lo"] = Counter(r.replica for r in res)
            one = [await post(cl, "/v1/completions", comp(2, model="aff"), {"x-session-id": "alice"}) for _ in range(4)]
            out["aff_one"] = Counter(r.replica for r in one)
            many = [await post(cl, "/v1/completions", comp(2, model="aff"), {"x-session-id": f"user-{i}"})
                    for i in range(8)]
            out["aff_many"] = Counter(r.replica for r in many)
        return out

    got = asyncio.run(main())
    assert got["rr"] == Counter({a: 2, b: 2, c: 2})
    assert got["lo"][c] < min(got["lo"][a], got["lo"][b])  # round-robin would give it an equal share
    assert len(got["aff_one"]) == 1
    assert set(got["aff_many"]) == {a, b}


def test_kill_a_real_replica_under_load_then_it_is_readmitted(replicas, gateways):
    victim, other = replicas.fast
    gw = start_gateway(GatewayConfig(pools=(pool("p", [victim.url, other.url]),), health=FAST_HEALTH))
    gateways.append(gw)
    p = gw.gateway.pools["p"]

    async def main() -> list:
        results = []
        streaming: set[str] = set()
        async with httpx.AsyncClient(base_url=gw.url, timeout=120) as cl:
            async def worker() -> None:
                for _ in range(4):
                    results.append(await post(cl, "/v1/completions", comp(24),
                                              on_first=lambda r: streaming.add(r.replica)))

            tasks = [asyncio.create_task(worker()) for _ in range(4)]
            deadline = time.monotonic() + 60
            while victim.url not in streaming:  # bounded: the victim must get a stream within a minute
                assert time.monotonic() < deadline, "no stream reached the victim replica"
                await asyncio.sleep(0.01)
            victim.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)  # never a hang
        return results

    results = asyncio.run(main())
    assert len(results) == 16 and all(r.status == 200 and r.done for r in results)
    broken = [r for r in results if r.error is not None]
    assert all(r.replica == victim.url and r.events for r in broken)  # only streams already running there
    assert all(finished(r) for r in results if r.error is None)
    dead = next(r for r in p.replicas if r.url == victim.url)
    wait_until(lambda: dead.state is ReplicaState.EJECTED, 10, "dead replica ejected")
    replicas.procs.procs.remove(victim)
    new = replicas.procs.restart(victim, timeout_s=180)
    replicas.fast[0] = new
    wait_until(lambda: dead.state is ReplicaState.READY, 10, "replica re-admitted after it came back")

    async def after() -> set:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as cl:
            res = await asyncio.gather(*(post(cl, "/v1/completions", comp(2)) for _ in range(4)))
        assert all(finished(r) for r in res)
        return {r.replica for r in res}

    assert victim.url in asyncio.run(after())


def test_queue_full_429_priorities_first_nothing_lost(replicas, gateways):
    # The slow replica and a long blocker (within --max-model-len 256): on a quiet machine a 32-token
    # tiny-model request ends before the queue has been filled, and the test would race the blocker.
    url = replicas.slow.url
    gw = start_gateway(GatewayConfig(pools=(pool("p", [url], max_concurrency=1),), health=FAST_HEALTH,
                                     queue=QueueConfig(max_size=4, max_wait_s=120, retry_after_s=3)))
    gateways.append(gw)
    p = gw.gateway.pools["p"]

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=120) as cl:
            blocker = asyncio.create_task(post(cl, "/v1/completions", comp(200)))
            await asyncio.to_thread(wait_until, lambda: p.outstanding() == 1, 10, "blocker admitted")
            queued = {}
            for prio in (5, 0, -3, 1):  # lower value first; the header carries it
                queued[prio] = asyncio.create_task(post(cl, "/v1/completions", comp(3), {"x-priority": str(prio)}))
                n = len(queued)
                await asyncio.to_thread(wait_until, lambda n=n: len(p.queue) == n, 10, "queued")
            rejected = await post(cl, "/v1/completions", comp(3))
            assert rejected.status == 429 and rejected.headers["retry-after"] == "3"
            assert rejected.body["error"]["code"] == "queue_full"
            results = {k: await t for k, t in queued.items()}
            assert finished(await blocker)
            assert all(finished(r) for r in results.values())
            assert sorted(results, key=lambda k: results[k].first_event_at) == [-3, 0, 1, 5]

    asyncio.run(main())


def test_routing_greeting_small_code_task_large(replicas, gateways):
    a, b = (r.url for r in replicas.fast)
    gw = start_gateway(GatewayConfig(pools=(pool("small", [a]), pool("large", [b])),
                                     routes=(RouteConfig(alias="auto", small="small", large="large"),),
                                     health=FAST_HEALTH))
    gateways.append(gw)
    greeting = {"model": "auto", "messages": [{"role": "user", "content": "Hi! How are you?"}], "max_tokens": 3}
    task = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": (
        "Write a Python class that implements an LRU cache, then explain step by step how each method works, "
        "analyze the time complexity, and finally compare it with a `functools.lru_cache` based design:\n"
        "1. the data structures\n2. `def get(self, key):` and `def put(self, key, value):`\n3. tests")}]}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as cl:
            g = await post(cl, "/v1/chat/completions", greeting)
            t = await post(cl, "/v1/chat/completions", task)
            s = await post(cl, "/v1/chat/completions", {**task, "stream": True})
        assert g.status == 200 and g.headers["x-tokenmill-pool"] == "small" and g.replica == a
        assert t.status == 200 and t.headers["x-tokenmill-pool"] == "large" and t.replica == b
        assert float(g.headers["x-tokenmill-complexity"]) < 0.5 <= float(t.headers["x-tokenmill-complexity"])
        assert g.body["model"] == "tiny" and g.body["usage"]["completion_tokens"] == 3
        assert s.headers["x-tokenmill-pool"] == "large" and s.done and s.events

    asyncio.run(main())


def test_embedding_scorer_routes_by_similarity_to_labelled_examples(replicas, gateways):
    a, b = (r.url for r in replicas.fast)
    examples = tuple(RouteExample(t, lab) for t, lab in [
        ("Hi, how are you?", "small"), ("Thanks, have a nice day!", "small"),
        ("What is the capital of France?", "small"),
        ("Write a Python function that parses a CSV file and explain the algorithm step by step.", "large"),
        ("Implement a thread-safe LRU cache in Java and analyze its time complexity.", "large"),
        ("Prove that the sum of the first n odd numbers is n squared.", "large")])
    route = RouteConfig(alias="auto", small="small", large="large", scorer="embedding",
                        embedding=EmbeddingScorerConfig(url=replicas.embed.url, model="minilm", examples=examples,
                                                        top_k=2))
    gw = start_gateway(GatewayConfig(pools=(pool("small", [a]), pool("large", [b])), routes=(route,),
                                     health=FAST_HEALTH))
    gateways.append(gw)

    def ask(text: str):
        body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
        return asyncio.run(post(httpx.AsyncClient(base_url=gw.url, timeout=60), "/v1/chat/completions", body))

    hello = ask("Hello! Good morning.")
    code = ask("Write a Rust program that implements a binary search tree with insert and delete, then explain "
               "each step.")
    assert hello.status == 200 and hello.headers["x-tokenmill-pool"] == "small" and hello.replica == a
    assert code.status == 200 and code.headers["x-tokenmill-pool"] == "large" and code.replica == b
    assert float(hello.headers["x-tokenmill-complexity"]) < 0.5 <= float(code.headers["x-tokenmill-complexity"])


def test_autoscaler_raises_a_real_local_pool_and_brings_it_back(tiny_llama_dir, gateways):
    spec = ReplicaSpec(actuator="local", model=str(tiny_llama_dir), args=tuple(FLAGS), startup_timeout_s=180,
                       drain_timeout_s=60)
    auto = AutoscaleConfig(min_replicas=1, max_replicas=2, target_queue_per_replica=1,
                           target_outstanding_per_replica=2, scale_up_cooldown_s=1, scale_down_cooldown_s=2,
                           interval_s=0.25)
    gw = start_gateway(GatewayConfig(pools=(PoolConfig(name="tiny", max_concurrency=2, spec=spec, autoscale=auto),),
                                     health=FAST_HEALTH, queue=QueueConfig(max_size=64, max_wait_s=180)))
    gateways.append(gw)
    p = gw.gateway.pools["tiny"]
    actuator = gw.gateway.scalers["tiny"].actuator
    wait_until(lambda: len(p.ready_replicas()) == 1, 180, "first replica ready")

    core_cpus: dict[str, set[int]] = {}  # replica URL -> cores of its engine process, while both serve

    async def main() -> list:
        results = []
        deadline = time.monotonic() + spec.startup_timeout_s
        async with httpx.AsyncClient(base_url=gw.url, timeout=300) as cl:
            async def worker() -> None:
                # Bounded by the replica start timeout, not a request count: a replica on its own core can
                # serve hundreds of tiny requests while the second one starts.
                while len(p.ready_replicas()) < 2 and time.monotonic() < deadline:
                    results.append(await post(cl, "/v1/completions", comp(8)))
                for r in list(p.ready_replicas()):  # others still have requests in flight: no scale-down yet
                    pid = (await cl.get(r.url + "/debug/stats")).json()["core_pid"]
                    core_cpus[r.url] = os.sched_getaffinity(pid)
                results.append(await post(cl, "/v1/completions", comp(8)))

            await asyncio.gather(*(worker() for _ in range(8)))
        return results

    results = asyncio.run(main())
    assert all(finished(r) for r in results)
    assert len({r.replica for r in results}) == 2  # a second replica came up and served
    if len(os.sched_getaffinity(0)) >= 2:  # the local actuator gave each replica its own cores
        first, second = core_cpus.values()
        assert first and second and not first & second
    wait_until(lambda: p.desired == 1 and len(p.replicas) == 1 and len(actuator.urls) == 1, 60,
               "idle pool drained back to 1 replica")
