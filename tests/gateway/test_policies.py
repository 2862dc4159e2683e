"""Load-balancing policies, consistent hashing and the bounded-load cap (pure, no network)."""

from __future__ import annotations

import random
from collections import Counter

from tokenmill.gateway.replicas import Replica, ReplicaState
from tokenmill.gateway.router import Affinity, HashRing, LeastOutstanding, PowerOfTwo, RoundRobin, RouteContext

CTX = RouteContext()


def replicas(n: int, **kw) -> list[Replica]:
    return [Replica(url=f"http://r{i}", **kw) for i in range(n)]


def test_round_robin_cycles_evenly_and_honours_weights():
    rs = replicas(3)
    rr = RoundRobin()
    picks = [rr.choose(rs, CTX).url for _ in range(9)]
    assert Counter(picks) == {"http://r0": 3, "http://r1": 3, "http://r2": 3}
    assert picks[:3] != [picks[0]] * 3  # interleaved, not bursts
    rs[0].weight = 2.0
    picks = Counter(rr.choose(rs, CTX).url for _ in range(40))
    assert picks["http://r0"] == 20 and picks["http://r1"] == 10 and picks["http://r2"] == 10


def test_round_robin_skips_full_and_not_ready():
    rs = replicas(3, max_concurrency=1)
    rs[0].outstanding = 1
    rs[1].state = ReplicaState.EJECTED
    rr = RoundRobin()
    assert {rr.choose(rs, CTX).url for _ in range(4)} == {"http://r2"}
    rs[2].outstanding = 1
    assert rr.choose(rs, CTX) is None


def test_least_outstanding_picks_least_loaded_and_counts_scraped_waiting():
    rs = replicas(3)
    rs[0].outstanding, rs[1].outstanding, rs[2].outstanding = 5, 1, 3
    lo = LeastOutstanding()
    assert lo.choose(rs, CTX).url == "http://r1"
    rs[1].load.num_waiting = 10  # the replica says it has a queue of its own
    assert lo.choose(rs, CTX).url == "http://r2"


def test_least_outstanding_breaks_ties_by_kv_usage():
    rs = replicas(3)
    rs[0].load.kv_usage, rs[1].load.kv_usage, rs[2].load.kv_usage = 0.9, 0.2, 0.5
    lo = LeastOutstanding()
    assert {lo.choose(rs, CTX).url for _ in range(5)} == {"http://r1"}


def test_least_outstanding_spreads_ties():
    rs = replicas(3)
    lo = LeastOutstanding()
    assert len({lo.choose(rs, CTX).url for _ in range(3)}) == 3


def test_power_of_two_never_picks_the_most_loaded_of_three_when_others_are_idle():
    rs = replicas(3)
    rs[0].outstanding = 10
    p2 = PowerOfTwo(random.Random(0))
    picks = Counter(p2.choose(rs, CTX).url for _ in range(300))
    assert picks["http://r0"] == 0
    assert picks["http://r1"] > 50 and picks["http://r2"] > 50


def test_hash_ring_is_stable_and_moves_only_the_removed_replicas_keys():
    urls = [f"http://r{i}" for i in range(4)]
    ring = HashRing(urls)
    keys = [f"session-{i}" for i in range(400)]
    owner = {k: ring.walk(k)[0] for k in keys}
    assert owner == {k: HashRing(urls).walk(k)[0] for k in keys}  # deterministic
    counts = Counter(owner.values())
    assert min(counts.values()) > 50  # virtual nodes spread keys
    smaller = HashRing(urls[:3])
    for k in keys:
        if owner[k] != "http://r3":
            assert smaller.walk(k)[0] == owner[k]
    assert sorted(ring.walk("x")) == sorted(urls)


def test_affinity_keeps_a_session_on_one_replica():
    rs = replicas(3)
    aff = Affinity(load_factor=1.25)
    homes = {aff.choose(rs, RouteContext("user-42")).url for _ in range(10)}
    assert len(homes) == 1
    spread = {aff.choose(rs, RouteContext(f"user-{i}")).url for i in range(60)}
    assert len(spread) == 3


def test_affinity_bounded_load_overflows_a_hot_key_to_the_next_replica():
    rs = replicas(3)
    aff = Affinity(load_factor=1.25)
    ctx = RouteContext("hot-prefix")
    home = aff.choose(rs, ctx)
    placed = []
    for _ in range(12):  # 12 in-flight requests with the same key
        r = aff.choose(rs, ctx)
        r.outstanding += 1
        placed.append(r.url)
    total = sum(r.outstanding for r in rs)
    assert home.outstanding <= -(-1.25 * total // 3)  # never above the cap
    assert len(set(placed)) > 1 and Counter(placed)[home.url] == max(Counter(placed).values())


def test_affinity_without_key_falls_back_to_least_outstanding():
    rs = replicas(2)
    rs[0].outstanding = 3
    assert Affinity().choose(rs, RouteContext(None)).url == "http://r1"
