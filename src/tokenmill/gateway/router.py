"""Load-balancing policies: pick one replica of a pool for a request.

Each policy sees only replicas that can take a request now (READY, below max_concurrency), except
affinity, which hashes over every READY replica so a session's home does not move when others fill up.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenmill.gateway.replicas import Replica


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What a policy may look at: the affinity key (x-session-id, or the prompt's first characters; for a
    LoRA adapter, its name) and the adapter the request names (None: the base model)."""

    affinity_key: str | None = None
    adapter: str | None = None


class Policy(Protocol):
    name: str

    def choose(self, ready: Sequence[Replica], ctx: RouteContext) -> Replica | None:
        """`ready`: READY replicas in a stable order. Returns one with capacity, or None to wait."""
        ...


class RoundRobin:
    """Smooth weighted round-robin (nginx's): over a cycle each replica gets its weight's share, interleaved."""

    name = "round-robin"

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, ready: Sequence[Replica], ctx: RouteContext) -> Replica | None:
        cands = [r for r in ready if r.has_capacity]
        if not cands:
            return None
        total = sum(r.weight for r in cands)
        for r in cands:
            self._current[r.url] = self._current.get(r.url, 0.0) + r.weight
        best = max(cands, key=lambda r: self._current[r.url])
        self._current[best.url] -= total
        return best


class LeastOutstanding:
    """Fewest in-flight (+ replica-reported waiting) requests per unit weight, then lowest KV usage;
    remaining ties rotate."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._tick = 0

    def choose(self, ready: Sequence[Replica], ctx: RouteContext) -> Replica | None:
        cands = [r for r in ready if r.has_capacity]
        if not cands:
            return None
        self._tick += 1
        n = len(cands)
        # Rotating the start makes ties spread instead of always hitting the first replica.
        order = [cands[(i + self._tick) % n] for i in range(n)]
        # Equal request load: the replica with the emptier KV cache has more room to batch.
        return min(order, key=lambda r: (r.load_score(), r.load.kv_usage))


class PowerOfTwo:
    """Two random candidates, the less loaded wins: near least-loaded without a global scan."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, ready: Sequence[Replica], ctx: RouteContext) -> Replica | None:
        cands = [r for r in ready if r.has_capacity]
        if len(cands) <= 1:
            return cands[0] if cands else None
        a, b = self._rng.sample(cands, 2)
        return a if (a.load_score(), a.load.kv_usage) <= (b.load_score(), b.load.kv_usage) else b


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing with virtual nodes: removing a replica moves only the keys it owned."""

    def __init__(self, urls: Sequence[str], vnodes: int = 64) -> None:
        points = sorted((_hash(f"{u}#{i}"), u) for u in urls for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]
        self.members = frozenset(urls)

    def walk(self, key: str) -> list[str]:
        """Distinct replica URLs in ring order starting at the key's position."""
        if not self._hashes:
            return []
        start = bisect.bisect(self._hashes, _hash(key)) % len(self._hashes)
        seen: list[str] = []
        for i in range(len(self._hashes)):
            u = self._urls[(start + i) % len(self._hashes)]
            if u not in seen:
                seen.append(u)
                if len(seen) == len(self.members):
                    break
        return seen


class Affinity:
    """Consistent hashing with bounded load (Mirrokni et al.): a key goes to its ring owner unless that
    replica already carries more than `load_factor` x the mean in-flight load; then to the next on the ring.
    Requests without a key fall back to least-outstanding."""

    name = "affinity"

    def __init__(self, load_factor: float = 1.25, vnodes: int = 64) -> None:
        self.load_factor = load_factor
        self._vnodes = vnodes
        self._rings: dict[frozenset[str], HashRing] = {}
        self._fallback = LeastOutstanding()

    def _ring_for(self, urls: Sequence[str]) -> HashRing:
        # one ring per replica set: requests for an adapter see only the replicas serving it
        members = frozenset(urls)
        ring = self._rings.get(members)
        if ring is None:
            if len(self._rings) >= 64:  # replica sets change rarely; drop stale rings wholesale
                self._rings.clear()
            ring = self._rings[members] = HashRing(urls, self._vnodes)
        return ring

    def cap(self, ready: Sequence[Replica]) -> int:
        """Most in-flight requests one replica may hold, counting the one being placed."""
        total = sum(r.outstanding for r in ready) + 1
        return max(1, math.ceil(self.load_factor * total / max(1, len(ready))))

    def choose(self, ready: Sequence[Replica], ctx: RouteContext) -> Replica | None:
        if not ctx.affinity_key:
            return self._fallback.choose(ready, ctx)
        by_url = {r.url: r for r in ready}
        cap = self.cap(ready)
        for url in self._ring_for(list(by_url)).walk(ctx.affinity_key):
            r = by_url[url]
            if r.has_capacity and r.outstanding < cap:
                return r
        return None


def make_policy(name: str, load_factor: float = 1.25, rng: random.Random | None = None) -> Policy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-outstanding":
        return LeastOutstanding()
    if name == "power-of-two":
        return PowerOfTwo(rng)
    if name == "affinity":
        return Affinity(load_factor)
    raise ValueError(f"policy: {name!r} is not allowed; expected round-robin | least-outstanding | power-of-two | affinity")
