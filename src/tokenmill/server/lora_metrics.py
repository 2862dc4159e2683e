"""Multi-LoRA metrics (docs/metrics.md), registered only when the server runs with --enable-lora.

tokenmill_lora_requests_info is vLLM's vllm:lora_requests_info: one series whose labels say which adapters
are running and waiting (comma-separated names) and max_lora, and whose value is the Unix time of that
snapshot. Only the current label set is exposed (vLLM leaves the older series behind with older times; a
dashboard reading the newest series sees the same). The counters add the increments of the core's cumulative
figures (server/metrics.py CoreCounts, reset by the supervisor when a new core starts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.engine.stats import SchedulerStats
from tokenmill.server.metrics import CoreCounts


class LoRAMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, model_name: str, max_loras: int, counts: CoreCounts) -> None:
        self.model_name = model_name
        self.max_loras = max_loras
        self.counts = counts
        self.running: list[str] = []
        self.waiting: list[str] = []
        self.info_time = time.time()
        self.requests: dict[str, int] = {}  # server-lifetime totals
        self.swaps = 0
        self.num_loaded = 0
        self.num_served = 0
        registry.register(self)

    def update(self, stats: SchedulerStats, num_served: int) -> None:
        """Copy a SchedulerStats snapshot; num_served: adapter names the server routes to (registry size)."""
        if stats.lora_running != self.running or stats.lora_waiting != self.waiting:
            self.running, self.waiting = list(stats.lora_running), list(stats.lora_waiting)
            self.info_time = time.time()
        for name, count in stats.lora_requests.items():
            self.requests[name] = self.requests.get(name, 0) + self.counts.delta(("lora_requests", name), int(count))
        self.swaps += self.counts.delta("lora_swaps", stats.lora_num_swaps)
        self.num_loaded = stats.lora_num_loaded
        self.num_served = num_served

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.model_name
        info = GaugeMetricFamily("tokenmill_lora_requests_info", "Running and waiting LoRA adapters (vLLM's "
                                 "vllm:lora_requests_info); the value is the Unix time of this snapshot.",
                                 labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([m, str(self.max_loras), ",".join(self.running), ",".join(self.waiting)], self.info_time)
        yield info
        requests = CounterMetricFamily("tokenmill_lora_requests", "Requests admitted through each LoRA adapter.",
                                       labels=["model_name", "lora_name"])
        for name, total in sorted(self.requests.items()):
            requests.add_metric([m, name], total)
        yield requests
        swaps = CounterMetricFamily("tokenmill_lora_swaps", "Adapters written into a slot of the stacked "
                                    "weights (a swap-in; more than max_loras adapters in rotation raise it).",
                                    labels=["model_name"])
        swaps.add_metric([m], self.swaps)
        yield swaps
        loaded = GaugeMetricFamily("tokenmill_lora_adapters_loaded", "Adapters held in the engine's memory "
                                   "(at most --max-cpu-loras).", labels=["model_name"])
        loaded.add_metric([m], self.num_loaded)
        yield loaded
        served = GaugeMetricFamily("tokenmill_lora_adapters_served", "Adapter names this server routes to "
                                   "(--lora-modules plus runtime loads).", labels=["model_name"])
        served.add_metric([m], self.num_served)
        yield served
