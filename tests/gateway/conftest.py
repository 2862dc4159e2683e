"""Gateway test harness: test replicas and `tokenmill serve` replicas as real processes, the gateway
served by uvicorn on a background thread (so tests can inspect its pools), all on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from tests.fixtures.polling import wait_until  # noqa: F401 - the gateway tests import it from here
from tokenmill.gateway.actuators import free_port
from tokenmill.gateway.app import Gateway, create_app
from tokenmill.gateway.config import GatewayConfig

REPLICA_SCRIPT = str(Path(__file__).with_name("replica_server.py"))


@dataclass
class Proc:
    url: str
    port: int
    popen: subprocess.Popen
    args: list[str] = field(default_factory=list)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)


def wait_healthy(url: str, popen: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"replica at {url} exited with {popen.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"replica at {url} not healthy within {timeout_s} s")


class ProcessSet:
    """Processes started by one test; all killed (by PID, process group) at teardown."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def spawn(self, cmd: list[str], port: int) -> Proc:
        """Start without waiting (several replicas can then load in parallel)."""
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        p = Proc(f"http://127.0.0.1:{port}", port, popen, cmd)
        self.procs.append(p)
        return p

    def start(self, cmd: list[str], port: int, timeout_s: float = 30.0) -> Proc:
        p = self.spawn(cmd, port)
        wait_healthy(p.url, p.popen, timeout_s)
        return p

    def test_replica(self, port: int | None = None, **opts: object) -> Proc:
        port = port or free_port()
        cmd = [sys.executable, REPLICA_SCRIPT, "--port", str(port)]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        return self.start(cmd, port)

    def restart(self, p: Proc, timeout_s: float = 60.0) -> Proc:
        return self.start(p.args, p.port, timeout_s)

    def close(self) -> None:
        for p in self.procs:
            p.kill()


@pytest.fixture
def procs() -> Iterator[ProcessSet]:
    ps = ProcessSet()
    yield ps
    ps.close()


@dataclass
class GatewayHandle:
    url: str
    gateway: Gateway
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def start_gateway(config: GatewayConfig, **app_kwargs: object) -> GatewayHandle:
    port = free_port()
    app = create_app(config, CollectorRegistry(), **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    return GatewayHandle(f"http://127.0.0.1:{port}", app.state.gateway, server, thread)


@pytest.fixture
def gateways() -> Iterator[list[GatewayHandle]]:
    started: list[GatewayHandle] = []
    yield started
    for g in started:
        g.stop()


