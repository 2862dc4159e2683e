"""Request-level failures vs replica faults.

A request the engine fails alone (or rejects) must not count against the replica: tokenmill serve answers
4xx, or a 5xx marked `x-tokenmill-error-scope: request`, which the gateway relays as is, without a
recorded failure or a retry. An unmarked 5xx, a refused connection or a timeout is a replica fault and
still counts. A 503 ("not started", e.g. the engine core restarting) is retried on another replica.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.gateway.client import completion, post
from tests.gateway.conftest import start_gateway
from tests.gateway.test_long_requests import PASSIVE_ONLY, received
from tests.gateway.test_proxy_live import pool
from tokenmill.engine.errors import RequestError
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.replicas import ReplicaState
from tokenmill.server.serving_engine import ERROR_SCOPE_HEADER, request_failed


def _replica(gw, url: str):
    return next(r for p in gw.gateway.pools.values() for r in p.replicas if r.url == url)


def test_a_burst_of_bad_requests_ejects_no_replica(procs, gateways):
    a = procs.test_replica(fail_prompt="POISON")
    b = procs.test_replica(fail_prompt="POISON")
    gw = start_gateway(GatewayConfig(pools=(pool("p", [a.url, b.url]),), health=PASSIVE_ONLY))
    gateways.append(gw)
    bad_bodies = [completion(4, stream=i % 2 == 0, prompt="POISON pill") for i in range(12)]  # engine fails it
    bad_bodies += [completion(4, stream=False, max_tokens="many") for _ in range(6)]  # rejected: 400

    async def main() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            bad = await asyncio.gather(*(post(c, "/v1/completions", b) for b in bad_bodies))
            good = await asyncio.gather(*(post(c, "/v1/completions", completion(3, stream=i % 2 == 0))
                                          for i in range(6)))
            return bad, good

    bad, good = asyncio.run(main())
    assert [r.status for r in bad] == [500] * 12 + [400] * 6
    assert all(r.body["error"]["code"] == "request_failed" for r in bad[:12])
    assert all(r.headers[ERROR_SCOPE_HEADER] == "request" for r in bad[:12])  # relayed as is
    assert all(r.status == 200 for r in good)
    assert gw.gateway.metrics.retries.labels("p")._value.get() == 0
    assert received(a.url) + received(b.url) == len(bad_bodies) + len(good)  # each sent exactly once
    for url in (a.url, b.url):
        rep = _replica(gw, url)
        assert rep.state is ReplicaState.READY and rep.consecutive_failures == 0
        assert gw.gateway.metrics.ejections.labels("p", url)._value.get() == 0


def test_an_unmarked_500_is_a_replica_fault_relayed_not_resent(procs, gateways):
    broken = procs.test_replica(fail_status=500)
    other = procs.test_replica()
    gw = start_gateway(GatewayConfig(pools=(pool("p", [broken.url, other.url], policy="round-robin"),),
                                     health=PASSIVE_ONLY))
    gateways.append(gw)

    async def main():
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return await post(c, "/v1/completions", completion(2, stream=False))

    res = asyncio.run(main())
    # Non-stream: the replica answered, so it may have run the work; the client gets its 500, no resend.
    assert res.status == 500 and res.body["error"]["message"] == "test replica failing on purpose"
    assert received(broken.url) == 1 and received(other.url) == 0
    assert _replica(gw, broken.url).consecutive_failures == 1


def test_503_is_retried_on_another_replica_before_the_first_byte(procs, gateways):
    restarting = procs.test_replica(fail_status=503)  # answers 503 + Retry-After, as during a core restart
    healthy = procs.test_replica()
    gw = start_gateway(GatewayConfig(pools=(pool("p", [restarting.url, healthy.url], policy="round-robin"),),
                                     health=PASSIVE_ONLY))
    gateways.append(gw)

    async def main() -> list:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return [await post(c, "/v1/completions", completion(3, stream=s)) for s in (False, True, False, True)]

    results = asyncio.run(main())
    assert all(r.status == 200 and r.replica == healthy.url for r in results)
    assert results[1].done and results[1].text == " w0 w1 w2"
    n_restarting = received(restarting.url)
    assert n_restarting >= 1 and received(healthy.url) == 4
    assert gw.gateway.metrics.retries.labels("p")._value.get() == n_restarting


# -- the server's side: how an engine error on one request is answered --------------------------

def test_request_failed_mapping_of_real_engine_errors(tiny_llama_dir):
    from tokenmill import SamplingParams
    from tokenmill.engine.args import engine_config
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.inproc_client import InProcessCoreClient
    from tokenmill.executor.model_runner import ModelRunner

    async def never_fits() -> RequestError:
        cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=10, max_model_len=256)
        eng = AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))
        try:
            with pytest.raises(RequestError) as e:  # 40 prompt tokens never fit in 9 blocks of 4
                async for _ in eng.generate(list(range(10, 50)), SamplingParams(max_tokens=4), "huge"):
                    pass
            return e.value
        finally:
            await eng.shutdown()

    err = request_failed(asyncio.run(never_fits()))
    assert err.status == 400 and err.param == "prompt" and err.code == "context_length_exceeded"
    assert ERROR_SCOPE_HEADER not in err.headers
    err = request_failed(RequestError("grammar rejected token 7"))
    assert err.status == 500 and err.headers[ERROR_SCOPE_HEADER] == "request"
    err = request_failed(RequestError("model runner error: RuntimeError('CUDA error')"))
    assert err.status == 500 and ERROR_SCOPE_HEADER not in err.headers  # may be the replica: counted
