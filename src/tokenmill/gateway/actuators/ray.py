"""Ray actuator: each replica is a Ray actor that runs `tokenmill serve` as a child process on its node.

Locally the gateway calls `ray.init()` (a private instance, or `address=` of `ray start --head`); on a
cluster, replicas land wherever Ray places the actors, and Ray's own autoscaler adds nodes when the
requested CPUs do not fit. Ray is imported only when this actuator is used.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokenmill.gateway.config import ReplicaSpec

log = logging.getLogger("tokenmill.gateway")


class ReplicaProcess:
    """Body of the Ray actor (wrapped with ray.remote at first use, so importing this module needs no Ray)."""

    def __init__(self, spec: ReplicaSpec, bind_host: str | None) -> None:
        self.spec = spec
        self.bind_host = bind_host
        self.proc: Any = None

    def start(self) -> str:
        import os
        import subprocess

        import ray

        from tokenmill.gateway.actuators import free_port, replica_command

        node_ip = ray.util.get_node_ip_address()
        # Single machine: loopback; on a cluster the gateway must reach the replica across nodes.
        host = self.bind_host or ("127.0.0.1" if node_ip in ("127.0.0.1", "localhost") else "0.0.0.0")
        port = free_port(host)
        cmd = replica_command(self.spec, host, port)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                                     start_new_session=True)
        url_host = "127.0.0.1" if host == "127.0.0.1" else node_ip
        return f"http://{url_host}:{port}"

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        import os
        import signal
        import subprocess

        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return self.proc.returncode


class RayActuator:
    """Invariants: one actor per started replica, keyed by URL; stop() ends the process, then the actor."""

    def __init__(self, address: str | None = None, num_cpus: float = 1.0, init_kwargs: dict | None = None,
                 bind_host: str | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.init_kwargs = dict(init_kwargs or {})
        self.bind_host = bind_host
        self._actors: dict[str, Any] = {}
        self._remote_cls: Any = None
        self._we_started_ray = False

    def _ensure_ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": False}
            kwargs.update(self.init_kwargs)
            ray.init(address=self.address, **kwargs)
            self._we_started_ray = True
        if self._remote_cls is None:
            self._remote_cls = ray.remote(ReplicaProcess)
        return ray

    def _start_sync(self, spec: ReplicaSpec) -> str:
        ray = self._ensure_ray()
        actor = self._remote_cls.options(num_cpus=self.num_cpus).remote(spec, self.bind_host)
        url = ray.get(actor.start.remote(), timeout=spec.startup_timeout_s)
        self._actors[url] = actor
        return url

    async def start(self, spec: ReplicaSpec) -> str:
        url = await asyncio.to_thread(self._start_sync, spec)
        log.info("ray: started replica actor at %s", url)
        return url

    async def alive(self, url: str) -> bool:
        actor = self._actors.get(url)
        if actor is None:
            return False
        import ray

        try:
            return bool(await asyncio.to_thread(ray.get, actor.alive.remote(), timeout=10))
        except Exception:
            return False

    async def pid(self, url: str) -> int | None:
        import ray

        return await asyncio.to_thread(ray.get, self._actors[url].pid.remote(), timeout=10)

    async def stop(self, url: str) -> None:
        actor = self._actors.pop(url, None)
        if actor is None:
            return
        import ray

        def _stop() -> None:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            finally:
                ray.kill(actor)

        await asyncio.to_thread(_stop)
        log.info("ray: stopped replica actor at %s", url)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(u) for u in list(self._actors)))
        if self._we_started_ray:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._we_started_ray = False
