"""The local actuator gives each replica on the machine its own share of the cores (--cpu-cores)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.gateway.conftest import wait_healthy, wait_until
from tokenmill.gateway.actuators import free_port, replica_command
from tokenmill.gateway.actuators.local import LocalActuator
from tokenmill.gateway.cli import _replicas_text, build_config
from tokenmill.gateway.config import ReplicaSpec

# A stand-in replica that only sleeps: its command line shows the cores it was given.
_SLEEPER = ReplicaSpec(command=("{python}", "-c", "import time; time.sleep(120)", "{cpu_cores}"))


def test_replica_command_adds_cpu_cores_unless_the_args_pin():
    spec = ReplicaSpec(model="m", args=("--kv-cache-memory", "0.5"))
    assert replica_command(spec, "127.0.0.1", 8001, "2-3")[-4:] == ["--kv-cache-memory", "0.5", "--cpu-cores", "2-3"]
    assert "--cpu-cores" not in replica_command(spec, "127.0.0.1", 8001)
    pinned = ReplicaSpec(model="m", args=("--cpu-cores=5",))
    assert replica_command(pinned, "127.0.0.1", 8001, "0")[-1] == "--cpu-cores=5"
    assert replica_command(_SLEEPER, "h", 1, "0,2")[-1] == "0,2"


def _cores_of(act: LocalActuator, url: str) -> str:
    proc = psutil.Process(act.pid(url))
    for _ in range(100):  # /proc/PID/cmdline can read empty for a moment around exec
        if cmd := proc.cmdline():
            return cmd[-1]
        time.sleep(0.05)
    raise AssertionError(f"no command line for {url}")


def test_local_actuator_plans_disjoint_shares():
    assert LocalActuator(max_replicas=2, cores=(0, 1)).shares == [(0,), (1,)]
    assert LocalActuator(max_replicas=2, cores=(0, 1, 2, 3, 4)).shares == [(0, 1, 2), (3, 4)]
    assert LocalActuator(cores=(0, 1)).shares == []  # replica count unknown: not pinned


def test_local_actuator_starts_replicas_on_their_own_cores_and_reuses_freed_ones():
    async def run() -> None:
        act = LocalActuator(max_replicas=2, cores=(0, 1, 2, 3), stop_timeout_s=5)
        try:
            a, b = await act.start(_SLEEPER), await act.start(_SLEEPER)
            assert (_cores_of(act, a), _cores_of(act, b)) == ("0-1", "2-3")
            await act.stop(a)
            c = await act.start(_SLEEPER)
            assert _cores_of(act, c) == "0-1"  # the share a freed, not one b holds
        finally:
            await act.close()
        assert act.urls == []

    asyncio.run(run())


def test_more_replicas_than_cores_share_and_say_so(caplog):
    async def run() -> None:
        act = LocalActuator(max_replicas=3, cores=(0, 1), stop_timeout_s=5)
        try:
            urls = [await act.start(_SLEEPER) for _ in range(3)]
            assert [_cores_of(act, u) for u in urls] == ["0", "1", "0"]
        finally:
            await act.close()

    with caplog.at_level(logging.INFO, logger="tokenmill.gateway"):
        asyncio.run(run())
    text = caplog.text
    assert "up to 3 local replicas on 2 cores (0-1): replicas will share cores" in text
    assert "shares core(s) 0 with http://127.0.0.1:" in text


def test_build_config_local_replicas_is_a_fixed_local_pool():
    cfg = build_config(None, None, None, None, None, None, local_replicas=2, model="/m",
                       serve_args="--kv-cache-memory 0.5 --chat-template '{{ x }}'")
    pool = cfg.pools[0]
    assert (pool.autoscale.min_replicas, pool.autoscale.max_replicas, pool.spec.actuator) == (2, 2, "local")
    cmd = replica_command(pool.spec, "127.0.0.1", 8001, "1")
    assert cmd[1:] == ["-m", "tokenmill.cli", "serve", "/m", "--host", "127.0.0.1", "--port", "8001", "--cpu-cores",
                       "1", "--kv-cache-memory", "0.5", "--chat-template", "{{ x }}"]
    assert _replicas_text(pool) == "2 local replicas, each on its own cores"
    no_model = build_config(None, None, None, None, None, None, local_replicas=1).pools[0].spec
    assert replica_command(no_model, "h", 1, "0")[3:5] == ["serve", "--host"]  # the default model


@pytest.mark.parametrize("kw, message", [
    ({"local_replicas": 0}, "--local-replicas: 0 is not allowed; must be >= 1"),
    ({"local_replicas": 2, "replica": ["http://x"]}, "--local-replicas: not allowed together with --replica"),
    ({"local_replicas": 2, "serve_args": "--cpu-cores 0"}, "--serve-args: leave out --cpu-cores"),
    ({"local_replicas": 2, "serve_args": "'open"}, "--serve-args: \"'open\" does not parse"),
])
def test_build_config_local_replicas_errors_name_the_option(kw, message):
    args = {"config": None, "replica": None, "policy": None, "host": None, "port": None, "max_concurrency": None, **kw}
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config(**args)


@pytest.mark.slow
def test_gateway_local_replicas_run_on_disjoint_cores(tiny_llama_dir):
    """`tokenmill gateway --local-replicas 2`: two real replicas, each engine on its own core(s), serving."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = "--max-model-len 256 --kv-cache-memory 0.02 --dtype float32 --served-model-name tiny"
    gw = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "gateway", "--local-replicas", "2", "--model",
                           str(tiny_llama_dir), "--serve-args", flags, "--port", str(port), "--log-level", "warning"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url, gw, 60)
        wait_until(lambda: httpx.get(f"{url}/health").json()["pools"]["default"]["ready"] == 2, 180, "2 replicas up")
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        servers = [c.cmdline() for c in psutil.Process(gw.pid).children() if "serve" in c.cmdline()]
        ports = [cmd[cmd.index("--port") + 1] for cmd in servers]
        pids = [httpx.get(f"http://127.0.0.1:{p}/debug/stats").json()["core_pid"] for p in ports]
        cores = [os.sched_getaffinity(pid) for pid in pids]  # of each replica's engine core process
        assert len(cores) == 2
        if len(os.sched_getaffinity(0)) >= 2:
            assert not cores[0] & cores[1]
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=90) == 0
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()
