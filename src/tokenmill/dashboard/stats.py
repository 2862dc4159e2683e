"""Live dashboard figures from a prometheus_client registry: rates and histogram percentiles over a sliding
window of snapshots, plus a short history for the page's charts.

Works on whatever tokenmill metrics the registry holds: server ones (`tokenmill_*`), gateway ones
(`tokenmill_gateway_*`), or both; absent metrics simply give absent sections.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

Samples = dict[str, list[tuple[dict[str, str], float]]]
PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class Snapshot:
    """Every sample of the registry at one instant (`t` from time.monotonic())."""

    t: float
    samples: Samples = field(default_factory=dict)

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.samples.get(name, []) if _matches(labels, match))

    def by_label(self, name: str, label: str, **match: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in self.samples.get(name, []):
            if label in labels and _matches(labels, match):
                out[labels[label]] = out.get(labels[label], 0.0) + v
        return out

    def buckets(self, name: str, **match: str) -> dict[float, float]:
        """Cumulative bucket counts by upper bound, summed over label sets."""
        out: dict[float, float] = {}
        for labels, v in self.samples.get(name + "_bucket", []):
            if _matches(labels, match):
                le = float(labels["le"])
                out[le] = out.get(le, 0.0) + v
        return out

    def has(self, name: str) -> bool:
        return name in self.samples


def _matches(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def take_snapshot(registry: CollectorRegistry, now: float | None = None) -> Snapshot:
    snap = Snapshot(t=time.monotonic() if now is None else now)
    for family in registry.collect():
        for s in family.samples:
            snap.samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return snap


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear inside the bucket holding the rank."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: the best we can say is that bound
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _delta_buckets(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {le: max(0.0, v - old.get(le, 0.0)) for le, v in new.items()}


class DashboardStats:
    """Keeps snapshots for `window_s` seconds and a history of computed points for the charts.

    Not thread-safe by design: FastAPI runs the (sync-free) stats handler on the event loop only.
    """

    def __init__(self, registry: CollectorRegistry, window_s: float = 30.0, history_len: int = 300,
                 min_interval_s: float = 0.25) -> None:
        self.registry = registry
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self._snaps: deque[Snapshot] = deque()
        self.history: deque[dict[str, Any]] = deque(maxlen=history_len)
        self._last: dict[str, Any] | None = None

    def compute(self, now: float | None = None) -> dict[str, Any]:
        snap = take_snapshot(self.registry, now)
        if self._last is not None and self._snaps and snap.t - self._snaps[-1].t < self.min_interval_s:
            return self._last  # many viewers polling at once share one computation
        self._snaps.append(snap)
        while len(self._snaps) > 2 and snap.t - self._snaps[1].t >= self.window_s:
            self._snaps.popleft()
        old = self._snaps[0]
        dt = snap.t - old.t
        out: dict[str, Any] = {"window_s": round(dt, 3)}
        if snap.has("tokenmill_generation_tokens_total") or snap.has("tokenmill_num_requests_running"):
            out["server"] = server_section(snap, old, dt)
        if any(name.startswith("tokenmill_gateway_") for name in snap.samples):
            out["gateway"] = gateway_section(snap, old, dt)
        point = history_point(out)
        point["t"] = time.time()
        self.history.append(point)
        out["history"] = list(self.history)
        self._last = out
        return out


def _rate(new: Snapshot, old: Snapshot, name: str, dt: float, **match: str) -> float:
    if dt <= 0:
        return 0.0
    return max(0.0, new.total(name, **match) - old.total(name, **match)) / dt


def _percentiles_ms(new: Snapshot, old: Snapshot, name: str, **match: str) -> dict[str, float | None]:
    window = _delta_buckets(new.buckets(name, **match), old.buckets(name, **match))
    out = {}
    for p in PERCENTILES:
        v = histogram_quantile(p / 100.0, window)
        out[f"p{p}"] = None if v is None else v * 1000.0
    return out


def server_section(new: Snapshot, old: Snapshot, dt: float) -> dict[str, Any]:
    queries = new.total("tokenmill_prefix_cache_queries_total") - old.total("tokenmill_prefix_cache_queries_total")
    hits = new.total("tokenmill_prefix_cache_hits_total") - old.total("tokenmill_prefix_cache_hits_total")
    cum_q = new.total("tokenmill_prefix_cache_queries_total")
    return {
        "generation_tokens_per_s": _rate(new, old, "tokenmill_generation_tokens_total", dt),
        "prompt_tokens_per_s": _rate(new, old, "tokenmill_prompt_tokens_total", dt),
        "requests_per_s": _rate(new, old, "tokenmill_request_success_total", dt),
        "ttft_ms": _percentiles_ms(new, old, "tokenmill_time_to_first_token_seconds"),
        "itl_ms": _percentiles_ms(new, old, "tokenmill_inter_token_latency_seconds"),
        "e2e_ms": _percentiles_ms(new, old, "tokenmill_e2e_request_latency_seconds"),
        "running": new.total("tokenmill_num_requests_running"),
        "waiting": new.total("tokenmill_num_requests_waiting"),
        # A mean over model_name label sets; one model per server in practice.
        "kv_cache_usage": _mean(new, "tokenmill_kv_cache_usage_perc"),
        # Over the window when prompts arrived in it, else since start (so an idle server still shows it).
        "prefix_cache_hit_rate": (hits / queries if queries > 0 else
                                  new.total("tokenmill_prefix_cache_hits_total") / cum_q if cum_q > 0 else None),
        "preemptions_total": new.total("tokenmill_num_preemptions_total"),
        "requests_total": new.total("tokenmill_request_success_total"),
        "generation_tokens_total": new.total("tokenmill_generation_tokens_total"),
        # Only on a server with speculative decoding configured (the metrics exist only there).
        "spec_decode": spec_decode_section(new, old) if new.has("tokenmill_spec_decode_num_drafts_total") else None,
    }


def spec_decode_section(new: Snapshot, old: Snapshot) -> dict[str, Any]:
    """vLLM's figures over the window, or since start when nothing was drafted in it (an idle server still
    shows them): acceptance rate = accepted / draft tokens; mean accepted length = 1 + accepted / drafts
    (tokens gained per verifying step, the target's own token included); per position: accepted / drafts."""
    names = ("drafts", "draft_tokens", "accepted_tokens")
    cum = {n: new.total(f"tokenmill_spec_decode_num_{n}_total") for n in names}
    win = {n: cum[n] - old.total(f"tokenmill_spec_decode_num_{n}_total") for n in names}
    pos_new = new.by_label("tokenmill_spec_decode_num_accepted_tokens_per_pos_total", "position")
    pos_old = old.by_label("tokenmill_spec_decode_num_accepted_tokens_per_pos_total", "position")
    if win["drafts"] > 0:
        use, per_pos = win, {p: v - pos_old.get(p, 0.0) for p, v in pos_new.items()}
    else:
        use, per_pos = cum, pos_new
    drafts, tokens = use["drafts"], use["draft_tokens"]
    return {
        "acceptance_rate": use["accepted_tokens"] / tokens if tokens > 0 else None,
        "mean_accepted_length": 1.0 + use["accepted_tokens"] / drafts if drafts > 0 else None,
        "per_position_acceptance_rate": [per_pos[p] / drafts if drafts > 0 else None
                                         for p in sorted(per_pos, key=int)],
        "over_window": win["drafts"] > 0,
        "drafts_total": cum["drafts"], "draft_tokens_total": cum["draft_tokens"],
        "accepted_tokens_total": cum["accepted_tokens"],
    }


def _mean(snap: Snapshot, name: str) -> float:
    values = [v for _, v in snap.samples.get(name, [])]
    return sum(values) / len(values) if values else 0.0


def gateway_section(new: Snapshot, old: Snapshot, dt: float) -> dict[str, Any]:
    # Pools are what the gateway configured (its per-pool gauges), never a label value of a request the
    # gateway answered itself (e.g. pool "none" of a 404 for an unknown model).
    pools = set()
    for name in ("tokenmill_gateway_replicas_desired", "tokenmill_gateway_replicas_ready",
                 "tokenmill_gateway_queue_depth"):
        pools |= set(new.by_label(name, "pool"))
    pool_stats = {}
    for pool in sorted(pools):
        pool_stats[pool] = {
            "replicas_desired": new.total("tokenmill_gateway_replicas_desired", pool=pool),
            "replicas_ready": new.total("tokenmill_gateway_replicas_ready", pool=pool),
            "queue_depth": new.total("tokenmill_gateway_queue_depth", pool=pool),
            "requests_per_s": _rate(new, old, "tokenmill_gateway_requests_total", dt, pool=pool),
            "requests_total": new.total("tokenmill_gateway_requests_total", pool=pool),
        }
    routing: dict[str, dict[str, float]] = {}
    for labels, v in new.samples.get("tokenmill_gateway_routing_decisions_total", []):
        routing.setdefault(labels.get("alias", "?"), {})[labels.get("pool", "?")] = v
    by_status = [(str(labels.get("status", "200")), v)
                 for labels, v in new.samples.get("tokenmill_gateway_requests_total", [])]
    return {
        "requests_per_s": _rate(new, old, "tokenmill_gateway_requests_total", dt),
        "output_tokens_per_s": _rate(new, old, "tokenmill_gateway_output_tokens_total", dt),
        "ttft_ms": _percentiles_ms(new, old, "tokenmill_gateway_ttft_seconds"),
        "queue_time_ms": _percentiles_ms(new, old, "tokenmill_gateway_queue_time_seconds"),
        "upstream_latency_ms": _percentiles_ms(new, old, "tokenmill_gateway_upstream_latency_seconds"),
        "queue_depth": new.total("tokenmill_gateway_queue_depth"),
        "retries_total": new.total("tokenmill_gateway_retries_total"),
        "ejections_total": new.total("tokenmill_gateway_ejections_total"),
        # 5xx and cut streams only; the client's own 4xx (bad request, unknown model, 429) apart.
        "errors_total": sum(v for status, v in by_status if _is_error(status)),
        "client_errors_total": sum(v for status, v in by_status if status.startswith("4")),
        "replicas": replica_section(new, old, dt),
        "pools": pool_stats,
        "routing": routing,  # cumulative decisions per alias -> pool (the split)
    }


def _is_error(status: str) -> bool:
    return status == "stream_error" or status.startswith("5")


def replica_section(new: Snapshot, old: Snapshot, dt: float) -> dict[str, dict[str, Any]]:
    """Per replica (URL): in flight, ready, the load it reports, request rate and errors through the gateway."""
    out: dict[str, dict[str, Any]] = {}
    for labels, v in new.samples.get("tokenmill_gateway_replica_in_flight", []):
        url = labels.get("replica", "")
        match = {"replica": url}
        out[url] = {
            "pool": labels.get("pool"),
            "in_flight": v,
            "ready": new.total("tokenmill_gateway_replica_ready", **match),
            "kv_cache_usage": new.total("tokenmill_gateway_replica_kv_cache_usage_perc", **match),
            "waiting": new.total("tokenmill_gateway_replica_num_requests_waiting", **match),
            "requests_per_s": _rate(new, old, "tokenmill_gateway_requests_total", dt, **match),
            "errors_total": sum(c for lb, c in new.samples.get("tokenmill_gateway_requests_total", [])
                                if lb.get("replica") == url and _is_error(str(lb.get("status", "")))),
        }
    return out


def history_point(stats: dict[str, Any]) -> dict[str, Any]:
    """The few numbers each chart plots over time."""
    point: dict[str, Any] = {}
    if (s := stats.get("server")) is not None:
        point.update(gen_tps=s["generation_tokens_per_s"], prompt_tps=s["prompt_tokens_per_s"],
                     ttft_p50=s["ttft_ms"]["p50"], ttft_p90=s["ttft_ms"]["p90"], ttft_p99=s["ttft_ms"]["p99"],
                     itl_p50=s["itl_ms"]["p50"], itl_p90=s["itl_ms"]["p90"], itl_p99=s["itl_ms"]["p99"],
                     running=s["running"], waiting=s["waiting"], kv=s["kv_cache_usage"],
                     hit_rate=s["prefix_cache_hit_rate"])
        # charts plot the window only (the since-start fallback would draw a flat line)
        if (sd := s.get("spec_decode")) is not None and sd["over_window"]:
            point.update(spec_accept=sd["acceptance_rate"], spec_len=sd["mean_accepted_length"])
    if (g := stats.get("gateway")) is not None:
        point.update(gw_rps=g["requests_per_s"], gw_out_tps=g["output_tokens_per_s"],
                     gw_ttft_p50=g["ttft_ms"]["p50"], gw_ttft_p99=g["ttft_ms"]["p99"],
                     gw_queue=g["queue_depth"])
    return point
