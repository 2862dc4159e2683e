"""Turn per-request results into `vllm bench serve`'s figures, under vLLM's key names.

Definitions follow vLLM so the numbers agree on the same workload:
- output tokens per request: the server's usage count, else the tokenizer's count of the text, else the
  number of token-carrying chunks;
- TPOT = (E2E - TTFT) / (output_tokens - 1), only for requests with more than one output token;
- ITL = every gap between consecutive token-carrying chunks, pooled over requests;
- throughputs divide by the wall-clock duration of the whole run; goodput counts completed requests
  meeting every SLO given (a 1-token request's TPOT counts as 0 for goodput);
- mean/median/std/percentiles are numpy's (linear interpolation, population std), in milliseconds;
- client_queue_time = time a request waited for a --max-concurrency slot before it was sent (vLLM's
  `queue_times`), e2el_including_client_queue = E2E + that wait; both only when asked for in
  --percentile-metrics, as in vLLM.

One definition differs on purpose: `max_concurrent_requests` is the exact peak number of requests in flight
at once; vLLM counts, per one-second bucket, every request active at any time in that second, which can
exceed --max-concurrency when requests end and start within the same second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenmill.bench.client import RequestResult

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue")
GOODPUT_NAMES = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for pair in item.split():
            name, sep, value = pair.partition(":")
            if not sep:
                raise ValueError(f"--goodput: expected NAME:MILLISECONDS, got {pair!r}")
            if name not in GOODPUT_NAMES:
                raise ValueError(f"--goodput: metric must be one of {', '.join(GOODPUT_NAMES)}, got {name!r}")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput: {name} needs a number of milliseconds, got {value!r}") from None
            if ms < 0:
                raise ValueError(f"--goodput: {name} must be >= 0 ms, got {ms}")
            slos[name] = ms
    return slos


def parse_list(text: str, field: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise ValueError(f"{field}: {item!r} is not one of {', '.join(allowed)}")
    return items


def parse_percentiles(text: str) -> list[float]:
    values = []
    for item in parse_list(text, "--metric-percentiles"):
        try:
            p = float(item)
        except ValueError:
            raise ValueError(f"--metric-percentiles: {item!r} is not a number") from None
        if not 0 < p <= 100:
            raise ValueError(f"--metric-percentiles: {p} must be in (0, 100]")
        values.append(p)
    return values


def output_len_of(result: RequestResult, tokenizer: Any | None) -> int:
    if result.output_tokens:
        return result.output_tokens
    if tokenizer is not None:
        return len(tokenizer.encode(result.generated_text, add_special_tokens=False))
    return result.num_chunks


def _stats(values: list[float], percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(np.mean(arr)), "median": float(np.median(arr)), "std": float(np.std(arr))}
    for p in percentiles:
        out[f"p{p_word(p)}"] = float(np.percentile(arr, p))
    return out


def p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def token_timeline(results: list[RequestResult], bucket_s: float = 1.0) -> tuple[list[float], list[float]]:
    """Output tokens per second over the run, from each request's token arrival times."""
    ok = [r for r in results if r.success]
    if not ok:
        return [], []
    t0 = min(r.start_time for r in ok)
    end = max(r.start_time + r.latency for r in ok)
    n = int(np.ceil((end - t0) / bucket_s)) + 1
    counts = np.zeros(n)
    for r in ok:
        t = r.start_time + r.ttft
        times = [t]
        for gap in r.itl:
            t += gap
            times.append(t)
        for tt in times:
            counts[min(n - 1, int((tt - t0) / bucket_s))] += 1
    return [i * bucket_s for i in range(n)], [float(c) / bucket_s for c in counts]


def peak_concurrency(results: list[RequestResult]) -> int:
    events = []
    for r in results:
        if r.success:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.latency, -1))
    events.sort()  # at equal times -1 sorts first: intervals are half-open
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def calculate_result(results: list[RequestResult], duration_s: float, tokenizer: Any | None,
                     percentile_metrics: list[str], percentiles: list[float],
                     goodput: dict[str, float]) -> dict[str, Any]:
    """The result dict, with the same keys `vllm bench serve --save-result` writes."""
    output_lens, ttfts, tpots, all_tpots, itls, e2els, queues = [], [], [], [], [], [], []
    completed = total_input = 0
    for r in results:
        if not r.success:
            output_lens.append(0)
            continue
        n_out = output_len_of(r, tokenizer)
        output_lens.append(n_out)
        total_input += r.prompt_len
        tpot = 0.0
        if n_out > 1:
            tpot = (r.latency - r.ttft) / (n_out - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls.extend(r.itl)
        ttfts.append(r.ttft)
        e2els.append(r.latency)
        queues.append(r.queue_time)
        completed += 1
    good = 0
    if goodput:
        per_metric = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        for i in range(completed):
            if all(per_metric[name][i] <= slo_ms / 1000.0 for name, slo_ms in goodput.items()):
                good += 1
    total_output = int(sum(output_lens))
    duration_s = max(duration_s, 1e-9)
    _, tps = token_timeline(results)
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": completed,
        "failed": len(results) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / duration_s,
        "request_goodput": good / duration_s if goodput else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_output_tokens_per_s": max(tps) if tps else 0.0,
        "max_concurrent_requests": peak_concurrency(results),
        "input_lens": [r.prompt_len for r in results],
        "output_lens": output_lens,
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        # vLLM's keys beyond the figures above: per-request client queue time, and rtfx (audio only, 0 here).
        "queue_times": [r.queue_time for r in results],
        "rtfx": 0.0,
    }
    samples = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els, "client_queue_time": queues,
               "e2el_including_client_queue": [e + q for e, q in zip(e2els, queues)]}
    for name in percentile_metrics:
        for stat, value in _stats(samples[name], percentiles).items():
            result[f"{stat}_{name}_ms"] = value
    return result


def summary_keys(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar figures of a result (drops the per-request lists)."""
    return {k: v for k, v in result.items() if not isinstance(v, list)}
