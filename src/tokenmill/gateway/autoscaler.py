"""Autoscaling: a pure decide() per pool, and the loop that applies it through an actuator.

decide() is a function of its inputs only (no clock, no I/O), so every rule is unit-testable:
- scale up (by enough replicas for the backlog, at least one) when queued requests per ready replica
  exceed target_queue_per_replica, a replica's KV cache is fuller than kv_usage_high, or the recent
  TTFT p50 exceeds ttft_target_s; not within scale_up_cooldown_s of the last scale-up;
- from zero, any queued request starts one replica at once (it waits for the cold start);
- scale down by one when nothing waits, KV and TTFT are fine and the in-flight load would fit in one
  replica fewer at target_outstanding_per_replica; not within scale_down_cooldown_s of any change;
- with min_replicas 0, a pool idle for idle_to_zero_s goes to zero;
- always within [min_replicas, max_replicas].
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import httpx

from tokenmill.gateway.actuators import Actuator
from tokenmill.gateway.config import AutoscaleConfig
from tokenmill.gateway.health import fetch_models
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.replicas import Replica, ReplicaState

log = logging.getLogger("tokenmill.gateway")


@dataclass(frozen=True, slots=True)
class PoolStats:
    desired: int  # the current target
    num_ready: int
    num_queued: int  # waiting in the gateway's admission queue
    num_outstanding: int  # in flight at the gateway
    num_replica_waiting: float = 0.0  # sum of replicas' own waiting queues (scraped)
    max_kv_usage: float = 0.0  # fullest replica's KV cache, 0..1
    ttft_p50_s: float | None = None
    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    last_request_at: float | None = None


def decide(stats: PoolStats, config: AutoscaleConfig, now: float) -> int:
    """Desired replica count for one pool."""
    cur = stats.desired
    lo, hi = config.min_replicas, config.max_replicas
    backlog = stats.num_queued + stats.num_replica_waiting
    if cur == 0:
        return min(hi, max(lo, 1)) if backlog > 0 or stats.num_outstanding > 0 else lo

    def since(t: float | None) -> float:
        return math.inf if t is None else now - t

    pressure = (
        backlog / max(1, stats.num_ready) > config.target_queue_per_replica
        or stats.max_kv_usage > config.kv_usage_high
        or (config.ttft_target_s is not None and stats.ttft_p50_s is not None
            and stats.ttft_p50_s > config.ttft_target_s)
    )
    if pressure and cur < hi and since(stats.last_scale_up_at) >= config.scale_up_cooldown_s:
        demand = stats.num_outstanding + backlog
        return min(hi, max(cur + 1, math.ceil(demand / config.target_outstanding_per_replica)))
    if cur > hi:
        return hi
    if cur < lo:
        return lo
    if pressure or backlog > 0:
        return cur
    quiet = min(since(stats.last_scale_up_at), since(stats.last_scale_down_at))
    if quiet < config.scale_down_cooldown_s:
        return cur
    if lo == 0 and stats.num_outstanding == 0 and since(stats.last_request_at) >= config.idle_to_zero_s:
        return 0
    if cur > max(lo, 1) and stats.num_outstanding <= (cur - 1) * config.target_outstanding_per_replica * 0.5:
        return cur - 1
    return cur


class PoolScaler:
    """Applies decide() to one pool: starts replicas through the actuator (STARTING until /health passes)
    and drains surplus ones (out of rotation, in-flight requests finish, then stopped)."""

    def __init__(self, pool: Pool, actuator: Actuator, metrics: GatewayMetrics, client: httpx.AsyncClient) -> None:
        assert pool.config.autoscale is not None and pool.config.spec is not None
        self.pool = pool
        self.config: AutoscaleConfig = pool.config.autoscale
        self.spec = pool.config.spec
        self.actuator = actuator
        self.metrics = metrics
        self._client = client
        self.last_scale_up_at: float | None = None
        self.last_scale_down_at: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self._failed_starts = 0
        self._retry_start_at = 0.0
        pool.desired = self.config.min_replicas

    def stats(self) -> PoolStats:
        p = self.pool
        ready = p.ready_replicas()
        return PoolStats(
            desired=p.desired, num_ready=len(ready), num_queued=len(p.queue), num_outstanding=p.outstanding(),
            num_replica_waiting=sum(r.load.num_waiting for r in ready),
            max_kv_usage=max((r.load.kv_usage for r in ready), default=0.0), ttft_p50_s=p.ttft_p50(),
            last_scale_up_at=self.last_scale_up_at, last_scale_down_at=self.last_scale_down_at,
            last_request_at=p.last_request_at)

    def live(self) -> list[Replica]:
        return [r for r in self.pool.replicas if r.state is not ReplicaState.DRAINING]

    async def _reap_dead(self) -> None:
        """A managed replica that was ejected and whose process is gone is removed, so it gets replaced."""
        for r in list(self.pool.replicas):
            if r.managed and r.state is ReplicaState.EJECTED and not await self.actuator.alive(r.url):
                log.warning("pool %s: replica %s died; replacing it", self.pool.name, r.url)
                self.pool.remove_replica(r)
                await self.actuator.stop(r.url)

    async def step(self) -> None:
        await self._reap_dead()
        now = time.monotonic()
        desired = decide(self.stats(), self.config, now)
        if desired > self.pool.desired:
            self.last_scale_up_at = now
        elif desired < self.pool.desired:
            self.last_scale_down_at = now
        if desired != self.pool.desired:
            log.info("pool %s: desired replicas %d -> %d", self.pool.name, self.pool.desired, desired)
        self.pool.desired = desired
        self.metrics.replicas_desired.labels(self.pool.name).set(desired)
        live = self.live()
        if now >= self._retry_start_at:  # after failed starts, back off instead of respawning every step
            for _ in range(desired - len(live)):
                self._spawn(self._start_one())
        surplus = len(live) - desired
        if surplus > 0:
            # Prefer replicas still starting, then the least busy.
            order = sorted(live, key=lambda r: (r.state is not ReplicaState.STARTING, r.outstanding))
            for r in order[:surplus]:
                r.state = ReplicaState.DRAINING
                self._spawn(self._drain(r))
            self.pool.dispatch()

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _start_one(self) -> None:
        # Placeholder replica so concurrent steps count it as live while the process starts.
        placeholder = Replica(url=f"pending://{id(object())}", state=ReplicaState.STARTING, managed=True)
        self.pool.replicas.append(placeholder)
        try:
            url = await self.actuator.start(self.spec)
        except Exception:
            log.exception("pool %s: replica start failed", self.pool.name)
            self.pool.remove_replica(placeholder)
            self._start_failed()
            return
        if placeholder.state is ReplicaState.DRAINING:  # scaled down while starting
            self.pool.remove_replica(placeholder)
            await self.actuator.stop(url)
            return
        placeholder.url = url
        placeholder.max_concurrency = self.pool.config.max_concurrency
        if await self._wait_ready(url):
            placeholder.model_names, placeholder.adapters = await fetch_models(self._client, url, 5.0) or ((), frozenset())
            if self.pool.config.model is None:  # LoRA adapters are listed from the replicas (Pool.adapters)
                base = tuple(n for n in placeholder.model_names if n not in placeholder.adapters)
                self.pool.model_names = tuple(dict.fromkeys(self.pool.model_names + base))
            self._failed_starts = 0
            if placeholder.state is ReplicaState.STARTING:
                placeholder.readmit()
                log.info("pool %s: replica %s is ready", self.pool.name, url)
                self.pool.dispatch()
        elif placeholder.state is not ReplicaState.DRAINING:
            log.error("pool %s: replica %s did not become healthy; stopping it", self.pool.name, url)
            self.pool.remove_replica(placeholder)
            await self.actuator.stop(url)
            self._start_failed()

    def _start_failed(self) -> None:
        self._failed_starts += 1
        delay = min(60.0, 2.0 ** self._failed_starts)
        self._retry_start_at = time.monotonic() + delay
        log.warning("pool %s: next replica start in %.0f s", self.pool.name, delay)

    async def _wait_ready(self, url: str) -> bool:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            try:
                resp = await self._client.get(f"{url}/health", timeout=2.0)
                if resp.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if not await self.actuator.alive(url):
                return False
            await asyncio.sleep(0.2)
        return False

    async def _drain(self, r: Replica) -> None:
        deadline = time.monotonic() + self.spec.drain_timeout_s
        while r.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.pool.remove_replica(r)
        if not r.url.startswith("pending://"):
            await self.actuator.stop(r.url)
            log.info("pool %s: drained and stopped %s", self.pool.name, r.url)

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.config.interval_s)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in list(self.pool.replicas):
            if r.managed and not r.url.startswith("pending://"):
                await self.actuator.stop(r.url)
            self.pool.remove_replica(r)
        await self.actuator.close()
