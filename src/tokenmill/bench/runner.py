"""Drive a workload against one endpoint: warm-up, arrivals (concurrency and/or gamma process), a hard
time limit, a rich progress bar, then the metrics.

Always bounded: at most `num_prompts` requests, and at `max_duration_s` arrivals stop and in-flight
requests are cancelled and counted as failed, so a stuck server cannot hang the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmill.bench.client import RequestResult, build_payload, first_model, send_request
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.metrics import calculate_result


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One benchmark run. `request_rate` inf means all arrivals at once (bounded by `max_concurrency`)."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    max_concurrency: int | None = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    num_warmups: int = 1
    max_duration_s: float = 600.0
    request_timeout_s: float = 300.0
    ignore_eos: bool = False
    seed: int = 0
    api_key: str | None = None
    percentile_metrics: list[str] = field(default_factory=lambda: ["ttft", "tpot", "itl", "e2el"])
    percentiles: list[float] = field(default_factory=lambda: [90.0, 99.0])
    goodput: dict[str, float] = field(default_factory=dict)
    show_progress: bool = True

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if not self.max_duration_s > 0:
            raise ValueError(f"--max-duration must be > 0 seconds, got {self.max_duration_s}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")


def arrival_offsets(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from start) of n requests: gamma-distributed gaps with mean 1/rate.

    burstiness 1 is a Poisson process; < 1 is burstier, > 1 more regular. Like vLLM, the cumulative
    times are rescaled so the last arrival lands at n/rate, which steadies throughput across seeds.
    """
    if request_rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    times = np.cumsum(gaps)
    if times[-1] > 0:
        times *= (n / request_rate) / times[-1]
    return [float(t) for t in times]


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[tok_s]}"), TimeElapsedColumn(), console=console,
                    disable=not enabled, transient=False)


async def run_benchmark(cfg: RunConfig, requests: list[SampleRequest], tokenizer: Any | None,
                        console: Console | None = None) -> dict[str, Any]:
    """Run the workload and return vLLM-shaped results (plus a few run settings)."""
    cfg.validate()
    console = console or Console(stderr=True)
    base = cfg.base_url.rstrip("/")
    url = base + "/" + cfg.endpoint.lstrip("/")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(requests) + 1, max_keepalive_connections=64)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = cfg.model or await first_model(client, base, headers)
        payloads = [build_payload(cfg.endpoint, model, r, cfg.ignore_eos) for r in requests]
        if cfg.num_warmups:
            # Warm-up uses the first prompt (as vLLM does); its results are discarded.
            warm_ups = asyncio.gather(*[send_request(client, url, payloads[0], requests[0].prompt_len, headers)
                                        for _ in range(cfg.num_warmups)])
            try:  # the time bound covers the warm-up too
                warm = await asyncio.wait_for(warm_ups, timeout=cfg.max_duration_s)
            except TimeoutError:
                raise RuntimeError(f"warm-up did not finish within --max-duration {cfg.max_duration_s}s") from None
            if not any(w.success for w in warm):
                raise RuntimeError(f"warm-up request to {url} failed: {warm[0].error}")
        results, duration = await _timed_run(cfg, client, url, payloads, requests, headers, console)
    out = calculate_result(results, duration, tokenizer, cfg.percentile_metrics, cfg.percentiles, cfg.goodput)
    out.update({
        "backend": "openai-chat" if "chat" in cfg.endpoint else "openai",
        "endpoint_type": "openai-chat" if "chat" in cfg.endpoint else "openai",  # vLLM keeps both names
        "base_url": cfg.base_url, "endpoint": cfg.endpoint, "model_id": model,
        "num_prompts": len(requests), "request_rate": cfg.request_rate, "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "num_unsent": len(requests) - len(results),
        "goodput_config": dict(cfg.goodput),
    })
    return out


async def _timed_run(cfg: RunConfig, client: httpx.AsyncClient, url: str, payloads: list[dict],
                     requests: list[SampleRequest], headers: dict | None,
                     console: Console) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
    done_tokens = 0
    tasks: list[asyncio.Task] = []
    with _progress(console, cfg.show_progress) as progress:
        bar = progress.add_task("bench", total=len(requests), tok_s="")
        start = time.perf_counter()

        async def one(i: int) -> RequestResult:
            nonlocal done_tokens
            arrival = time.perf_counter()
            async with semaphore:
                result = await send_request(client, url, payloads[i], requests[i].prompt_len, headers)
            # start_time stays the send time (throughput and timelines use it); the slot wait is kept apart.
            result.queue_time = max(0.0, result.start_time - arrival) if result.start_time else 0.0
            done_tokens += result.output_tokens or result.num_chunks
            elapsed = time.perf_counter() - start
            progress.update(bar, advance=1, tok_s=f"{done_tokens / max(elapsed, 1e-9):.1f} tok/s")
            return result

        async def issue() -> None:
            for i, offset in enumerate(offsets):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))

        issuer = asyncio.create_task(issue())
        deadline = start + cfg.max_duration_s
        try:
            await asyncio.wait_for(issuer, timeout=cfg.max_duration_s)
            remaining = deadline - time.perf_counter()
            if tasks:
                await asyncio.wait(tasks, timeout=max(remaining, 0.0))
        except TimeoutError:
            pass
        duration = time.perf_counter() - start
        results = []
        for task in tasks:
            if task.done() and not task.cancelled():
                results.append(task.result())
            else:
                task.cancel()
                results.append(RequestResult(error=f"cancelled: --max-duration {cfg.max_duration_s}s reached"))
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    # Keep request order: results follow issue order, which is workload order.
    for r, req in zip(results, requests):
        if not r.success and r.prompt_len == 0:
            r.prompt_len = req.prompt_len
    return results, duration
