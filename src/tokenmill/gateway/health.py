"""Active health checks (GET /health) and the passive side: ejection after consecutive failures."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import httpx

from tokenmill.gateway.config import HealthConfig
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.replicas import Replica, ReplicaState

log = logging.getLogger("tokenmill.gateway")

# Paths that monitors poll every few seconds; their uvicorn access lines are DEBUG, not INFO.
_POLL_PATHS = ("/health", "/metrics", "/dashboard/stats")


class _PollsAtDebug(logging.Filter):
    """Demotes INFO records about polls to DEBUG: dropped unless the gateway logs at DEBUG.

    On the `httpx` logger every record is a poll of a replica (health checks, metrics scrapes, model
    lists: one INFO line each, several per second); on `uvicorn.access` only requests for _POLL_PATHS are.
    """

    def __init__(self, only_poll_paths: bool) -> None:
        super().__init__()
        self.only_poll_paths = only_poll_paths

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        if self.only_poll_paths:
            args = record.args if isinstance(record.args, tuple) else ()
            path = str(args[2]).split("?")[0] if len(args) >= 3 else ""
            if path not in _POLL_PATHS:
                return True
        if not log.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_poll_logs() -> None:
    """Install the DEBUG demotion on `httpx` and `uvicorn.access` (once per process)."""
    for name, only_polls in (("httpx", False), ("uvicorn.access", True)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PollsAtDebug) for f in logger.filters):
            logger.addFilter(_PollsAtDebug(only_polls))


async def fetch_models(client: httpx.AsyncClient, url: str,
                       timeout_s: float) -> tuple[tuple[str, ...], frozenset[str]] | None:
    """(every model id, the LoRA adapters among them) from the replica's /v1/models, None when it did not
    answer. An adapter is an entry with a `parent` (the base model it runs on, as vLLM lists them)."""
    try:
        resp = await client.get(f"{url}/v1/models", timeout=timeout_s)
        if resp.status_code == 200:
            cards = [m for m in resp.json().get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
            return tuple(m["id"] for m in cards), frozenset(m["id"] for m in cards if m.get("parent"))
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        pass
    return None


class HealthChecker:
    """Invariants: a replica leaves rotation (EJECTED) after `failure_threshold` consecutive failures, counted
    from active checks and from proxied requests alike; it comes back only through a passing /health at
    least `eject_s` after the ejection. STARTING replicas become READY on their first passing check."""

    def __init__(self, client: httpx.AsyncClient, pools: Sequence[Pool], config: HealthConfig,
                 metrics: GatewayMetrics) -> None:
        self._client = client
        self._pools = pools
        self.config = config
        self._metrics = metrics

    def passive_failure(self, pool: Pool, replica: Replica, hard: bool = False) -> None:
        """A proxied request failed before its first byte; `hard` (connection refused) ejects at once."""
        ejected = replica.eject_now() if hard else replica.record_failure(self.config.failure_threshold)
        if ejected:
            self._metrics.ejections.labels(pool.name, replica.url).inc()
            log.warning("pool %s: ejected %s after request failures", pool.name, replica.url)

    def passive_success(self, replica: Replica) -> None:
        replica.record_success()

    async def probe(self, replica: Replica) -> bool:
        try:
            resp = await self._client.get(f"{replica.url}/health", timeout=self.config.timeout_s)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    async def check_replica(self, pool: Pool, replica: Replica) -> None:
        if replica.state is ReplicaState.DRAINING or replica.state is ReplicaState.STARTING and replica.managed:
            return  # draining replicas are on their way out; the scaler watches its own starting ones
        ok = await self.probe(replica)
        now = time.monotonic()
        if ok:
            # every check: LoRA adapters come and go at run time (/v1/load_lora_adapter)
            got = await fetch_models(self._client, replica.url, self.config.timeout_s)
            if got is not None and got[0]:
                replica.model_names, replica.adapters = got
                self._merge_names(pool, replica)
            if replica.state is ReplicaState.STARTING:
                replica.readmit()
                log.info("pool %s: replica %s is ready", pool.name, replica.url)
                pool.dispatch()
            elif replica.state is ReplicaState.EJECTED and now - (replica.ejected_at or now) >= self.config.eject_s:
                replica.readmit()
                log.info("pool %s: re-admitted %s", pool.name, replica.url)
                pool.dispatch()
            elif replica.state is ReplicaState.READY:
                replica.record_success()
        elif replica.state is ReplicaState.READY and replica.record_failure(self.config.failure_threshold, now):
            self._metrics.ejections.labels(pool.name, replica.url).inc()
            log.warning("pool %s: ejected %s (health check failed)", pool.name, replica.url)

    @staticmethod
    def _merge_names(pool: Pool, replica: Replica) -> None:
        # adapters are not the pool's own names: they are listed while a replica serves them (Pool.adapters)
        if pool.config.model is None:
            base = tuple(n for n in replica.model_names if n not in replica.adapters)
            pool.model_names = tuple(dict.fromkeys(pool.model_names + base))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check_replica(p, r) for p in self._pools for r in list(p.replicas)))
        for p in self._pools:
            self._metrics.replicas_ready.labels(p.name).set(len(p.ready_replicas()))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval_s)
