"""Scrape replicas' Prometheus /metrics for their own queue and KV usage (tokenmill_* or vLLM's vllm:*)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.gateway.replicas import Replica, ReplicaState, ScrapedLoad

# Gauge name -> ScrapedLoad field. vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc in v1.
_GAUGES = {
    "tokenmill_num_requests_waiting": "num_waiting",
    "tokenmill_num_requests_running": "num_running",
    "tokenmill_kv_cache_usage_perc": "kv_usage",
    "vllm:num_requests_waiting": "num_waiting",
    "vllm:num_requests_running": "num_running",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
}


def parse_load(text: str, now: float | None = None) -> ScrapedLoad:
    """Sum request gauges over label sets (one per served model); KV usage is the max."""
    load = ScrapedLoad(scraped_at=time.monotonic() if now is None else now)
    seen: set[str] = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            fname = _GAUGES.get(s.name)
            if fname is None:
                continue
            if fname == "kv_usage":
                load.kv_usage = max(load.kv_usage if fname in seen else 0.0, float(s.value))
            else:
                setattr(load, fname, (getattr(load, fname) if fname in seen else 0.0) + float(s.value))
            seen.add(fname)
    return load


class Scraper:
    """Refreshes `replica.load` for every READY or DRAINING replica every `interval_s`."""

    def __init__(self, client: httpx.AsyncClient, replicas: Callable[[], Iterable[Replica]], interval_s: float, timeout_s: float) -> None:
        self._client = client
        self._replicas = replicas
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def scrape_one(self, replica: Replica) -> None:
        try:
            resp = await self._client.get(f"{replica.url}/metrics", timeout=self.timeout_s)
            if resp.status_code == 200:
                replica.load = parse_load(resp.text)
        except (httpx.HTTPError, ValueError):
            pass  # health checks decide about the replica; a failed scrape keeps the last load

    async def scrape_all(self, replicas: Iterable[Replica]) -> None:
        todo = [r for r in replicas if r.state in (ReplicaState.READY, ReplicaState.DRAINING)]
        await asyncio.gather(*(self.scrape_one(r) for r in todo))

    async def run(self) -> None:
        while True:
            await self.scrape_all(self._replicas())
            await asyncio.sleep(self.interval_s)
