"""Bounded admission queue: priority first, then fair across API keys, then arrival order.

Priority follows vLLM's convention: a LOWER value is served earlier (default 0).

Requests wait here only when no replica of their pool can take them. Fairness is start-time fair
queueing with unit costs: each key's next waiter gets a virtual tag one past that key's previous tag
(or the current virtual time, if the key was idle), and the lowest tag goes first, so a key that
floods the queue cannot starve a key that sends one request.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds max_size waiters already (-> 429)."""


class QueueTimeout(Exception):
    """A waiter was not admitted within max_wait_s (-> 503)."""


@dataclass(slots=True, eq=False)
class Waiter(Generic[T]):
    priority: int
    key: str
    tag: float
    seq: int
    enqueued_at: float
    item: T
    removed: bool = field(default=False)

    def sort_key(self) -> tuple[int, float, int]:
        return (self.priority, self.tag, self.seq)


class AdmissionQueue(Generic[T]):
    """Invariants: len() counts live waiters only; pop() never returns a removed waiter."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heap: list[tuple[tuple[int, float, int], Waiter[T]]] = []
        self._seq = itertools.count()
        self._vtime: dict[int, float] = {}  # per priority: tag of the last waiter popped
        self._last_tag: dict[tuple[int, str], float] = {}  # per (priority, key): tag of its newest waiter
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: T, priority: int = 0, key: str = "", now: float = 0.0) -> Waiter[T]:
        if self._live >= self.max_size:
            raise QueueFull(f"admission queue is full ({self.max_size} waiting)")
        start = max(self._vtime.get(priority, 0.0), self._last_tag.get((priority, key), 0.0))
        tag = start + 1.0
        self._last_tag[(priority, key)] = tag
        w = Waiter(priority=priority, key=key, tag=tag, seq=next(self._seq), enqueued_at=now, item=item)
        heapq.heappush(self._heap, (w.sort_key(), w))
        self._live += 1
        return w

    def peek(self) -> Waiter[T] | None:
        self._drop_removed()
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Waiter[T] | None:
        self._drop_removed()
        if not self._heap:
            return None
        _, w = heapq.heappop(self._heap)
        w.removed = True
        self._live -= 1
        self._vtime[w.priority] = max(self._vtime.get(w.priority, 0.0), w.tag - 1.0)
        return w

    def remove(self, w: Waiter[T]) -> None:
        """Take out a waiter that gave up (timeout, client gone); lazily dropped from the heap."""
        if not w.removed:
            w.removed = True
            self._live -= 1

    def waiters(self) -> list[Waiter[T]]:
        """Live waiters in admission order (for inspection and tests)."""
        return [w for _, w in sorted(self._heap, key=lambda e: e[0]) if not w.removed]

    def _drop_removed(self) -> None:
        while self._heap and self._heap[0][1].removed:
            heapq.heappop(self._heap)
