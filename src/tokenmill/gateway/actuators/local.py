"""Local actuator: each replica is a `tokenmill serve` process on a free loopback port, stopped by PID."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from tokenmill.gateway.actuators import describe, free_port, replica_command
from tokenmill.gateway.config import ReplicaSpec

log = logging.getLogger("tokenmill.gateway")


@dataclass(slots=True)
class _Proc:
    popen: subprocess.Popen
    log_path: str


class LocalActuator:
    """Invariants: every process it started is in `_procs` until stop() has reaped it; each runs in its own
    session, so stopping signals its process group (the server and any engine-core child), never by name."""

    def __init__(self, host: str = "127.0.0.1", stop_timeout_s: float = 30.0) -> None:
        self.host = host
        self.stop_timeout_s = stop_timeout_s
        self._procs: dict[str, _Proc] = {}

    @property
    def urls(self) -> list[str]:
        return list(self._procs)

    def pid(self, url: str) -> int | None:
        p = self._procs.get(url)
        return p.popen.pid if p else None

    async def start(self, spec: ReplicaSpec) -> str:
        port = free_port(self.host)
        cmd = replica_command(spec, self.host, port)
        fd, log_path = tempfile.mkstemp(prefix=f"tokenmill-replica-{port}-", suffix=".log")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        with os.fdopen(fd, "wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        url = f"http://{self.host}:{port}"
        self._procs[url] = _Proc(popen, log_path)
        log.info("started replica pid %d at %s: %s (log %s)", popen.pid, url, describe(cmd), log_path)
        return url

    async def alive(self, url: str) -> bool:
        p = self._procs.get(url)
        return p is not None and p.popen.poll() is None

    async def stop(self, url: str) -> None:
        p = self._procs.pop(url, None)
        if p is None:
            return
        pop = p.popen
        if pop.poll() is None:
            self._signal(pop.pid, signal.SIGTERM)
            for _ in range(int(self.stop_timeout_s / 0.05)):
                if pop.poll() is not None:
                    break
                await asyncio.sleep(0.05)
        # The group may still hold children even after the leader exited.
        self._signal(pop.pid, signal.SIGKILL)
        if pop.poll() is None:
            await asyncio.to_thread(pop.wait)
        try:
            os.unlink(p.log_path)
        except OSError:
            pass

    @staticmethod
    def _signal(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(u) for u in list(self._procs)))
