"""Local actuator: each replica is a `tokenmill serve` process on a free loopback port, stopped by PID.

Replicas on one machine get disjoint shares of its cores (`--cpu-cores`): engines that each size their
thread pool to the whole machine fight for the cores, and two such replicas ran 5x slower than one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.cpu_affinity import available_cores, format_cpu_list, plan_core_shares
from tokenmill.gateway.actuators import describe, free_port, replica_command
from tokenmill.gateway.config import ReplicaSpec

log = logging.getLogger("tokenmill.gateway")


@dataclass(slots=True)
class _Proc:
    popen: subprocess.Popen
    log_path: str
    share: int | None  # index into LocalActuator.shares, None when not pinned


class LocalActuator:
    """Invariants: every process it started is in `_procs` until stop() has reaped it; each runs in its own
    session, so stopping signals its process group (the server and any engine-core child), never by name.
    With max_replicas set, `shares` splits the cores among that many replicas and a new replica takes the
    share fewest live replicas use (disjoint while replicas <= cores)."""

    def __init__(self, host: str = "127.0.0.1", stop_timeout_s: float = 30.0, max_replicas: int | None = None,
                 cores: Sequence[int] | None = None) -> None:
        self.host = host
        self.stop_timeout_s = stop_timeout_s
        self._procs: dict[str, _Proc] = {}
        cores = tuple(cores) if cores is not None else available_cores()
        self.shares = plan_core_shares(cores, max_replicas) if max_replicas else []
        if max_replicas and max_replicas > len(cores):
            log.warning("up to %d local replicas on %d cores (%s): replicas will share cores; each gets one",
                        max_replicas, len(cores), format_cpu_list(cores))
        elif self.shares:
            log.info("local replicas get their own cores: %s", " | ".join(format_cpu_list(s) for s in self.shares))

    @property
    def urls(self) -> list[str]:
        return list(self._procs)

    def pid(self, url: str) -> int | None:
        p = self._procs.get(url)
        return p.popen.pid if p else None

    def _users(self, share: int) -> list[str]:
        """Live replicas on any core of shares[share]."""
        cores = set(self.shares[share])
        return [u for u, p in self._procs.items() if p.share is not None and cores & set(self.shares[p.share])]

    def next_share(self) -> int | None:
        """Index of the share the next replica gets: the one whose cores the fewest live replicas use (lowest
        index on ties), so replicas stay on disjoint cores while there are enough."""
        if not self.shares:
            return None
        return min(range(len(self.shares)), key=lambda i: (len(self._users(i)), i))

    async def start(self, spec: ReplicaSpec) -> str:
        port = free_port(self.host)
        share = self.next_share()
        cores = format_cpu_list(self.shares[share]) if share is not None else None
        shared_with = self._users(share) if share is not None else []
        if shared_with:
            log.warning("replica on port %d shares core(s) %s with %s: more replicas than cores",
                        port, cores, ", ".join(shared_with))
        cmd = replica_command(spec, self.host, port, cores)
        fd, log_path = tempfile.mkstemp(prefix=f"tokenmill-replica-{port}-", suffix=".log")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        with os.fdopen(fd, "wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        url = f"http://{self.host}:{port}"
        self._procs[url] = _Proc(popen, log_path, share)
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
