"""Engine-core death and recovery: in-flight requests fail at once, /health is 503 while the core restarts
(with backoff), requests succeed again with the same greedy output, and past --max-core-restarts the
server exits non-zero. The live test SIGKILLs the core of a `tokenmill serve` it started (PID from
/debug/stats, checked to be that server's child)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import httpx
import psutil
import pytest
from prometheus_client import CollectorRegistry

from tests.fixtures.polling import wait_until
from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server
from tokenmill import SamplingParams
from tokenmill.config import ServerConfig
from tokenmill.engine.args import engine_config
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.inproc_client import InProcessCoreClient
from tokenmill.server.app import refresh_engine_metrics
from tokenmill.server.core_supervisor import RestartBudget, supervise
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.state import ServerState


def test_restart_budget_backoff_doubles_and_window_slides():
    b = RestartBudget(ServerConfig(max_core_restarts=3, core_restart_window_s=100.0, core_restart_backoff_s=1.0,
                                   core_restart_max_backoff_s=3.0))
    delays = []
    for now in (0.0, 1.0, 2.0):
        delays.append(b.next_delay(now))
        b.record(now)
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped
    assert b.next_delay(50.0) is None  # 3 restarts within 100 s: spent
    assert b.next_delay(101.5) == 2.0  # the first two left the window: one restart counts
    assert RestartBudget(ServerConfig(max_core_restarts=0)).next_delay(0.0) is None


def _break_core(engine: AsyncLLM) -> None:
    """Make the in-process core thread fail at its next step (an engine-core death, without a process)."""
    def broken_schedule():
        raise RuntimeError("injected core failure")

    engine.client.core.scheduler.schedule = broken_schedule


def test_supervisor_restarts_dead_engine_then_gives_up(tiny_llama_dir):
    from tokenmill.executor.model_runner import ModelRunner

    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)
    runner = ModelRunner(cfg)  # shared by the engines: the restart logic is under test, not the load
    started: list[AsyncLLM] = []

    async def factory(config):
        started.append(AsyncLLM(config, client=InProcessCoreClient(config, runner)))
        return started[-1]

    registry = CollectorRegistry()
    state = ServerState(engine_config=cfg, server_config=ServerConfig(max_core_restarts=1, core_restart_backoff_s=0.01),
                        served_model_names=["tiny"], registry=registry, metrics=ServerMetrics(registry, "tiny"))
    fatal = threading.Event()
    state.extra["on_fatal"] = fatal.set
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def run(engine, rid):
        return [t async for out in engine.generate([5, 6, 7], greedy, rid) for t in out.outputs[0].token_ids]

    def queried() -> float:  # the prefix-cache lookups counter, after copying the core's figures
        refresh_engine_metrics(state)
        return registry.get_sample_value("tokenmill_prefix_cache_queries_total", {"model_name": "tiny"})

    async def main():
        state.engine = await factory(cfg)
        before = await run(state.engine, "a")
        assert queried() == 3  # the 3 prompt tokens
        watcher = asyncio.create_task(supervise(state, factory))
        _break_core(state.engine)
        with pytest.raises(EngineDeadError, match="injected"):
            await run(state.engine, "b")
        assert refresh_engine_metrics(state).num_running == 0  # a dead core's figures are not reported
        for _ in range(500):  # bounded poll: the new engine replaces the dead one
            if len(started) == 2 and state.engine is started[1]:
                break
            await asyncio.sleep(0.01)
        assert state.engine is started[1] and state.core_restarts == 1 and not fatal.is_set()
        assert await run(state.engine, "c") == before  # same greedy output after the restart
        assert queried() == 6  # the new core counts from 0: its 3 lookups add to the first core's
        _break_core(state.engine)
        with pytest.raises(EngineDeadError):
            await run(state.engine, "d")
        await asyncio.wait_for(watcher, 10)  # budget (1 restart) spent: the supervisor gives up
        assert fatal.is_set() and "--max-core-restarts 1" in state.load_error and len(started) == 2
        await state.engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))


def _core_pid(server) -> int | None:
    try:
        pid = httpx.get(server.url + "/debug/stats", timeout=5).json().get("core_pid")
    except httpx.TransportError:
        return None
    return pid if pid in [p.pid for p in server.children()] else None  # only a child of our server


def _num_running(server) -> int:
    return httpx.get(server.url + "/debug/stats", timeout=5).json()["engine"]["num_running"]


def test_sigkill_core_restarts_then_exits_past_the_limit(tiny_llama_dir, tmp_path):
    flags = list(TINY_SERVER_FLAGS)
    flags[flags.index("--max-model-len") + 1] = "512"
    server = start_server(tiny_llama_dir, *flags, "--max-core-restarts", "1", tmp_dir=tmp_path)
    url = server.url
    greedy = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    try:
        before = httpx.post(url + "/v1/completions", json=greedy, timeout=30).json()["choices"][0]["text"]
        first_core = _core_pid(server)
        assert first_core is not None

        # 1. a stream in flight ends with an error event, then /health is 503 while the core restarts
        body = {"prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(first_core, signal.SIGKILL)
            rest = [line for line in lines if line]
        err = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert rest[-1] == "data: [DONE]" and err["code"] == "engine_dead" and "SIGKILL" in err["message"]
        down = httpx.post(url + "/v1/completions", json=greedy, timeout=30)
        assert down.status_code == 503 and down.headers["retry-after"]  # backoff is 1 s: still down
        assert down.json()["error"]["code"] == "engine_dead"
        assert httpx.get(url + "/health").status_code == 503

        # 2. the new core serves again, with the same greedy output
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 120, "/health 200 after the restart")
        second_core = _core_pid(server)
        assert second_core not in (None, first_core) and not psutil.pid_exists(first_core)
        after = httpx.post(url + "/v1/completions", json=greedy, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == before
        assert httpx.get(url + "/debug/stats").json()["core_restarts"] == 1
        assert 'tokenmill_engine_core_restarts_total{model_name="tiny"} 1.0' in httpx.get(url + "/metrics").text

        # 3. a non-stream request in flight gets a 5xx in OpenAI's shape; the budget (1) is spent: exit 1
        result: dict = {}
        long = {"prompt": "Hello", "max_tokens": 480, "ignore_eos": True}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=long,
                                                                        timeout=60)))
        t.start()
        wait_until(lambda: _num_running(server) > 0, 30, "the long request running")
        os.kill(second_core, signal.SIGKILL)
        t.join(60)
        r = result["r"]
        assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "engine_dead"
        assert server.proc.wait(60) == 1
        log = server.log()
        assert "killed by signal SIGKILL" in log and "restart 1 of at most 1" in log
        assert "--max-core-restarts 1" in log
    finally:
        server.stop(10)
