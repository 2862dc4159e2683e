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


def replica_command(spec: ReplicaSpec, host: str, port: int) -> list[str]:
    """`spec.command` with {host}/{port} filled in, or `tokenmill serve MODEL --host H --port P ARGS`."""
    if spec.command:
        return [part.format(host=host, port=port, python=sys.executable) for part in spec.command]
    return [sys.executable, "-m", "tokenmill.cli", "serve", str(spec.model), "--host", host, "--port", str(port),
            *spec.args]


def describe(cmd: list[str]) -> str:
    return shlex.join(cmd)


def make_actuator(spec: ReplicaSpec) -> Actuator:
    if spec.actuator == "local":
        from tokenmill.gateway.actuators.local import LocalActuator

        return LocalActuator()
    if spec.actuator == "ray":
        from tokenmill.gateway.actuators.ray import RayActuator

        return RayActuator(address=spec.ray_address, num_cpus=spec.ray_num_cpus)
    raise ValueError(f"spec.actuator: {spec.actuator!r} is not allowed; expected local | ray")
