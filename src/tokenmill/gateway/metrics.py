"""tokenmill_gateway_* metrics on the gateway's own CollectorRegistry.

Per-request series carry `pool` and `replica` (the replica's URL; empty for requests answered by the
gateway itself: bad JSON, unknown model, auth, rate limits, queue full). `status` is the HTTP status, or
`stream_error` for a stream cut mid-way: 4xx are the client's doing and are never counted as errors by the
dashboards (errors = 5xx + stream_error). Per-replica gauges (in flight, ready, the load each replica
reports) are read from the live pools at scrape time, so replicas that come and go need no bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.gateway.replicas import ReplicaState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NO_REPLICA = ""  # the `replica` label of requests the gateway answered without a replica


def is_error_status(status: str) -> bool:
    """Gateway / upstream failures: 5xx and streams cut mid-way. 4xx (including 429) are not errors."""
    return status == "stream_error" or status.startswith("5")


def is_client_error_status(status: str) -> bool:
    return status.startswith("4")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        per_req = ["pool", "replica"]
        self.requests = Counter("tokenmill_gateway_requests", "Requests finished, by pool, replica and HTTP status "
                                "(stream_error: cut mid-stream)", ["pool", "replica", "status"], registry=r)
        self.queue_depth = Gauge("tokenmill_gateway_queue_depth", "Requests waiting in the admission queue",
                                 ["pool"], registry=r)
        self.queue_time = Histogram("tokenmill_gateway_queue_time_seconds", "Time spent in the admission queue",
                                    ["pool"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("tokenmill_gateway_upstream_latency_seconds",
                                          "Time from sending upstream to the last byte relayed",
                                          per_req, buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tokenmill_gateway_ttft_seconds", "Time from arrival at the gateway to the first "
                              "response byte relayed", per_req, buckets=_LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("tokenmill_gateway_output_tokens", "Generated tokens relayed (usage when the "
                                     "replica reports it, else stream events)", per_req, registry=r)
        self.retries = Counter("tokenmill_gateway_retries", "Requests retried on another replica", ["pool"],
                               registry=r)
        self.ejections = Counter("tokenmill_gateway_ejections", "Replicas taken out of rotation", per_req,
                                 registry=r)
        self.replicas_desired = Gauge("tokenmill_gateway_replicas_desired", "Replicas the pool should have",
                                      ["pool"], registry=r)
        self.replicas_ready = Gauge("tokenmill_gateway_replicas_ready", "Replicas in rotation", ["pool"],
                                    registry=r)
        self.routing_decisions = Counter("tokenmill_gateway_routing_decisions", "Alias requests routed to a pool",
                                         ["alias", "pool"], registry=r)

    def watch_replicas(self, pools: Callable[[], Iterable]) -> None:
        """Expose per-replica gauges of `pools()` (objects with `.name` and `.replicas`) on every scrape."""
        self.registry.register(ReplicaCollector(pools))


class ReplicaCollector(Collector):
    """tokenmill_gateway_replica_* gauges, one series per replica the pools hold right now."""

    def __init__(self, pools: Callable[[], Iterable]) -> None:
        self._pools = pools

    def describe(self) -> list:
        return []  # series come and go with replicas; nothing to check for name clashes up front

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lbl = ["pool", "replica"]
        fams = {
            "in_flight": GaugeMetricFamily("tokenmill_gateway_replica_in_flight",
                                           "Requests the gateway has sent to the replica and not finished relaying", labels=lbl),
            "ready": GaugeMetricFamily("tokenmill_gateway_replica_ready", "1 while the replica is in rotation", labels=lbl),
            "waiting": GaugeMetricFamily("tokenmill_gateway_replica_num_requests_waiting",
                                         "Requests waiting at the replica (its own /metrics, last scrape)", labels=lbl),
            "running": GaugeMetricFamily("tokenmill_gateway_replica_num_requests_running",
                                         "Requests running at the replica (its own /metrics, last scrape)", labels=lbl),
            "kv": GaugeMetricFamily("tokenmill_gateway_replica_kv_cache_usage_perc",
                                    "KV cache usage the replica reports (0..1, last scrape)", labels=lbl),
        }
        for pool in self._pools():
            for rep in list(pool.replicas):
                key = [pool.name, rep.url]
                fams["in_flight"].add_metric(key, rep.outstanding)
                fams["ready"].add_metric(key, 1.0 if rep.state is ReplicaState.READY else 0.0)
                fams["waiting"].add_metric(key, rep.load.num_waiting)
                fams["running"].add_metric(key, rep.load.num_running)
                fams["kv"].add_metric(key, rep.load.kv_usage)
        yield from fams.values()
