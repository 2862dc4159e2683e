"""Pool: the replicas serving one model, their policy and admission queue.

acquire() hands out a replica slot (replica.begin()) or parks the request in the queue; every
release() and every change in the set of ready replicas calls dispatch(), which hands freed slots
to waiters in queue order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from tokenmill.gateway.config import PoolConfig, QueueConfig
from tokenmill.gateway.queue import AdmissionQueue, QueueTimeout
from tokenmill.gateway.replicas import Replica, ReplicaState
from tokenmill.gateway.router import Policy, RouteContext, make_policy


@dataclass(slots=True)
class _Ticket:
    ctx: RouteContext
    exclude: frozenset[str]
    future: asyncio.Future[Replica]


class Pool:
    def __init__(self, config: PoolConfig, queue_config: QueueConfig, policy: Policy | None = None) -> None:
        self.config = config
        self.name = config.name
        self.queue_config = queue_config
        self.policy = policy or make_policy(config.policy, config.affinity_load_factor)
        self.replicas: list[Replica] = [
            Replica(url=r.url.rstrip("/"), weight=r.weight, max_concurrency=config.max_concurrency)
            for r in config.replicas
        ]
        self.queue: AdmissionQueue[_Ticket] = AdmissionQueue(queue_config.max_size)
        self.model_names: tuple[str, ...] = (config.model,) if config.model else ()
        self.desired: int = len(self.replicas)
        self.last_request_at: float | None = None
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=256)  # (when, ttft_s)

    # -- replica set -------------------------------------------------------------------------
    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is ReplicaState.READY]

    def remove_replica(self, replica: Replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)

    @property
    def autoscaled(self) -> bool:
        return self.config.autoscale is not None

    # -- admission -------------------------------------------------------------------------
    async def acquire(self, ctx: RouteContext, priority: int = 0, key: str = "",
                      exclude: frozenset[str] = frozenset()) -> tuple[Replica, float]:
        """A replica slot and the seconds spent queued. Raises QueueFull (from the queue) or QueueTimeout."""
        now = time.monotonic()
        self.last_request_at = now
        if not len(self.queue):
            r = self._choose(ctx, exclude)
            if r is not None:
                r.begin()
                return r, 0.0
        fut: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        waiter = self.queue.push(_Ticket(ctx, exclude, fut), priority=priority, key=key, now=now)
        timeout = self.queue_config.max_wait_s
        if self.autoscaled and not self.ready_replicas() and self.config.spec is not None:
            timeout += self.config.spec.startup_timeout_s  # scale from zero: wait for the cold start
        try:
            await asyncio.wait({fut}, timeout=timeout)
        except asyncio.CancelledError:
            self.queue.remove(waiter)
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # admitted just as the client left: hand the slot back
            else:
                fut.cancel()
            raise
        if fut.done() and not fut.cancelled():  # admitted (possibly in the same instant as the timeout)
            return fut.result(), time.monotonic() - now
        self.queue.remove(waiter)
        fut.cancel()
        raise QueueTimeout(f"no replica of pool {self.name!r} became free within {timeout:.0f} s")

    def release(self, replica: Replica) -> None:
        replica.end()
        self.dispatch()

    def dispatch(self) -> None:
        while True:
            w = self.queue.peek()
            if w is None:
                return
            if w.item.future.done():
                self.queue.remove(w)
                continue
            r = self._choose(w.item.ctx, w.item.exclude)
            if r is None:
                return
            self.queue.pop()
            r.begin()
            w.item.future.set_result(r)

    def adapters(self) -> list[str]:
        """LoRA adapter names some replica of this pool serves (from their /v1/models), in first-seen order."""
        return list(dict.fromkeys(a for r in self.replicas for a in sorted(r.adapters)))

    def _choose(self, ctx: RouteContext, exclude: frozenset[str]) -> Replica | None:
        ready = self.ready_replicas()
        if ctx.adapter is not None:  # only replicas serving the adapter (all, if none is known to: stale lists)
            ready = [r for r in ready if ctx.adapter in r.adapters] or ready
        if exclude:
            others = [r for r in ready if r.url not in exclude]
            ready = others or ready
        return self.policy.choose(ready, ctx)

    # -- stats -------------------------------------------------------------------------------
    def record_ttft(self, ttft_s: float) -> None:
        self._ttfts.append((time.monotonic(), ttft_s))

    def ttft_p50(self, window_s: float = 30.0) -> float | None:
        cutoff = time.monotonic() - window_s
        recent = sorted(t for at, t in self._ttfts if at >= cutoff)
        return recent[len(recent) // 2] if recent else None

    def outstanding(self) -> int:
        return sum(r.outstanding for r in self.replicas)
