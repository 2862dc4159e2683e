"""Admission queue ordering and fairness; pool admission with real asyncio waiting."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.gateway.config import PoolConfig, QueueConfig, ReplicaConfig
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.queue import AdmissionQueue, QueueFull, QueueTimeout
from tokenmill.gateway.router import RouteContext


def drain(q: AdmissionQueue) -> list:
    out = []
    while (w := q.pop()) is not None:
        out.append(w.item)
    return out


def test_lower_priority_value_first_then_fifo():
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("a", priority=0)
    q.push("b", priority=-1)
    q.push("c", priority=0)
    q.push("d", priority=5)
    q.push("e", priority=-1)
    assert drain(q) == ["b", "e", "a", "c", "d"]


def test_fair_across_keys_a_flood_does_not_starve_others():
    q: AdmissionQueue[str] = AdmissionQueue(100)
    for i in range(6):
        q.push(f"A{i}", key="alice")
    q.push("B0", key="bob")
    q.push("B1", key="bob")
    q.push("C0", key="carol")
    order = drain(q)
    assert order[:3] == ["A0", "B0", "C0"]
    assert order.index("B1") < order.index("A2")


def test_idle_key_joins_at_the_current_virtual_time():
    q: AdmissionQueue[str] = AdmissionQueue(100)
    for i in range(4):
        q.push(f"A{i}", key="alice")
    assert q.pop().item == "A0" and q.pop().item == "A1"
    q.push("B0", key="bob")  # bob was idle: starts at the current virtual time, next in line
    assert drain(q) == ["B0", "A2", "A3"]


def test_full_queue_raises_and_removed_waiters_free_room():
    q: AdmissionQueue[str] = AdmissionQueue(2)
    w = q.push("a")
    q.push("b")
    with pytest.raises(QueueFull):
        q.push("c")
    q.remove(w)
    assert len(q) == 1
    q.push("c")
    assert drain(q) == ["b", "c"]


def pool(n: int, max_concurrency: int, max_size: int = 10, max_wait_s: float = 5.0) -> Pool:
    cfg = PoolConfig(name="p", policy="least-outstanding", max_concurrency=max_concurrency,
                     replicas=tuple(ReplicaConfig(url=f"http://r{i}") for i in range(n)))
    return Pool(cfg, QueueConfig(max_size=max_size, max_wait_s=max_wait_s))


def test_pool_admits_in_priority_order_when_slots_free():
    async def main() -> list[str]:
        p = pool(1, 1)
        first, _ = await p.acquire(RouteContext())
        served: list[str] = []

        async def client(name: str, prio: int) -> None:
            r, _waited = await p.acquire(RouteContext(), priority=prio, key=name)
            served.append(name)
            await asyncio.sleep(0)
            p.release(r)

        tasks = []
        for name, prio in [("low1", 5), ("high", -5), ("mid", 0), ("low2", 5)]:
            tasks.append(asyncio.create_task(client(name, prio)))
            await asyncio.sleep(0)
        assert len(p.queue) == 4
        p.release(first)
        await asyncio.gather(*tasks)
        assert p.outstanding() == 0
        return served

    assert asyncio.run(main()) == ["high", "mid", "low1", "low2"]


async def _until(pred, max_iterations: int = 1000) -> None:
    """Yield to the event loop until pred() holds (bounded: the tasks awaited need only a few turns)."""
    for _ in range(max_iterations):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_pool_queue_full_and_timeout_and_cancel_lose_no_slot():
    async def main() -> None:
        p = pool(1, 1, max_size=1, max_wait_s=0.2)
        held, _ = await p.acquire(RouteContext())
        waiter = asyncio.create_task(p.acquire(RouteContext()))
        await _until(lambda: len(p.queue) == 1)  # the waiter holds the one queue place
        with pytest.raises(QueueFull):
            await p.acquire(RouteContext())
        with pytest.raises(QueueTimeout):
            await waiter
        assert len(p.queue) == 0
        cancelled = asyncio.create_task(p.acquire(RouteContext()))
        await _until(lambda: len(p.queue) == 1)  # cancelled while queued, not before it got there
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        p.release(held)
        r, _ = await p.acquire(RouteContext())  # the slot came back
        assert r.outstanding == 1 and len(p.queue) == 0

    asyncio.run(main())
