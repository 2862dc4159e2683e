"""Replica: one upstream server as the gateway sees it (state, in-flight count, scraped load)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class ReplicaState(enum.Enum):
    STARTING = "starting"  # launched by an actuator, not yet passing /health
    READY = "ready"  # in rotation
    EJECTED = "ejected"  # failed checks or requests; re-admitted by a passing /health after eject_s
    DRAINING = "draining"  # leaving: takes no new requests, in-flight ones finish, then it stops


@dataclass(slots=True)
class ScrapedLoad:
    """What the replica's own /metrics said last time (None: never scraped or not exposed)."""

    num_waiting: float = 0.0
    num_running: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float | None = None


@dataclass(slots=True, eq=False)
class Replica:
    """Invariants: `outstanding` counts requests the gateway has sent and not yet finished relaying;
    it never goes negative; only READY replicas are picked for new requests."""

    url: str
    weight: float = 1.0
    max_concurrency: int = 32
    state: ReplicaState = ReplicaState.READY
    managed: bool = False  # started by an actuator (stopped by it on scale-down)
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_at: float | None = None
    total_requests: int = 0
    model_names: tuple[str, ...] = ()  # every id of its /v1/models, the base model first
    adapters: frozenset[str] = frozenset()  # the LoRA adapters among them (ids listed with a `parent`)
    load: ScrapedLoad = field(default_factory=ScrapedLoad)

    @property
    def ready(self) -> bool:
        return self.state is ReplicaState.READY

    @property
    def has_capacity(self) -> bool:
        return self.ready and self.outstanding < self.max_concurrency

    def load_score(self) -> float:
        """In-flight requests at the gateway plus requests the replica reports queued, per unit weight."""
        return (self.outstanding + self.load.num_waiting) / self.weight

    def begin(self) -> None:
        self.outstanding += 1
        self.total_requests += 1

    def end(self) -> None:
        assert self.outstanding > 0, f"{self.url}: end() without begin()"
        self.outstanding -= 1

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, threshold: int, now: float | None = None) -> bool:
        """Count a failure; returns True when this failure ejected the replica."""
        self.consecutive_failures += 1
        if self.state is ReplicaState.READY and self.consecutive_failures >= threshold:
            self.state = ReplicaState.EJECTED
            self.ejected_at = time.monotonic() if now is None else now
            return True
        return False

    def readmit(self) -> None:
        self.state = ReplicaState.READY
        self.consecutive_failures = 0
        self.ejected_at = None

    def eject_now(self, now: float | None = None) -> bool:
        """Eject immediately (e.g. connection refused: the process is gone)."""
        if self.state is not ReplicaState.READY:
            return False
        self.state = ReplicaState.EJECTED
        self.ejected_at = time.monotonic() if now is None else now
        return True
