"""tokenmill_gateway_* metrics on the gateway's own CollectorRegistry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenmill_gateway_requests", "Requests finished, by pool and HTTP status",
                                ["pool", "status"], registry=r)
        self.queue_depth = Gauge("tokenmill_gateway_queue_depth", "Requests waiting in the admission queue",
                                 ["pool"], registry=r)
        self.queue_time = Histogram("tokenmill_gateway_queue_time_seconds", "Time spent in the admission queue",
                                    ["pool"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("tokenmill_gateway_upstream_latency_seconds",
                                          "Time from sending upstream to the last byte relayed",
                                          ["pool"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tokenmill_gateway_ttft_seconds", "Time from arrival at the gateway to the first "
                              "response byte relayed", ["pool"], buckets=_LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("tokenmill_gateway_output_tokens", "Generated tokens relayed (usage when the "
                                     "replica reports it, else stream events)", ["pool"], registry=r)
        self.retries = Counter("tokenmill_gateway_retries", "Requests retried on another replica", ["pool"],
                               registry=r)
        self.ejections = Counter("tokenmill_gateway_ejections", "Replicas taken out of rotation", ["pool"],
                                 registry=r)
        self.replicas_desired = Gauge("tokenmill_gateway_replicas_desired", "Replicas the pool should have",
                                      ["pool"], registry=r)
        self.replicas_ready = Gauge("tokenmill_gateway_replicas_ready", "Replicas in rotation", ["pool"],
                                    registry=r)
        self.routing_decisions = Counter("tokenmill_gateway_routing_decisions", "Alias requests routed to a pool",
                                         ["alias", "pool"], registry=r)
