"""Actuators start and stop replicas for the autoscaler: `local` processes or `ray` actors."""

from __future__ import annotations

import shlex
import socket
import sys
from typing import Protocol

from tokenmill.gateway.config import ReplicaSpec


class Actuator(Protocol):
    async def start(self, spec: ReplicaSpec) -> str:
        """Launch one replica; return its base URL (it may not be healthy yet)."""
        ...

    async def alive(self, url: str) -> bool:
        """False once the replica's process has exited (stop waiting for it to become healthy)."""
        ...

    async def stop(self, url: str) -> None:
        """Stop the replica (graceful first); idempotent."""
        ...

    async def close(self) -> None:
        """Stop everything this actuator started."""
        ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_command(spec: ReplicaSpec, host: str, port: int, cpu_cores: str | None = None) -> list[str]:
    """`spec.command` with {host}/{port}/{cpu_cores} filled in, or `tokenmill serve MODEL --host H --port P ARGS`
    plus `--cpu-cores LIST` when cores are given and ARGS do not pin already."""
    if spec.command:
        cores = cpu_cores or ""
        return [part.format(host=host, port=port, python=sys.executable, cpu_cores=cores) for part in spec.command]
    user_pinned = any(a.partition("=")[0] == "--cpu-cores" for a in spec.args)
    pin = ["--cpu-cores", cpu_cores] if cpu_cores and not user_pinned else []
    return [sys.executable, "-m", "tokenmill.cli", "serve", str(spec.model), "--host", host, "--port", str(port),
            *spec.args, *pin]


def describe(cmd: list[str]) -> str:
    return shlex.join(cmd)


def make_actuator(spec: ReplicaSpec, max_replicas: int | None = None) -> Actuator:
    """max_replicas: the most replicas the pool runs at once; the local actuator splits the cores among them."""
    if spec.actuator == "local":
        from tokenmill.gateway.actuators.local import LocalActuator

        return LocalActuator(max_replicas=max_replicas)
    if spec.actuator == "ray":
        from tokenmill.gateway.actuators.ray import RayActuator

        return RayActuator(address=spec.ray_address, num_cpus=spec.ray_num_cpus)
    raise ValueError(f"spec.actuator: {spec.actuator!r} is not allowed; expected local | ray")
