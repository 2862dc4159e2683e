"""Scheduler statistics: a snapshot the server turns into Prometheus metrics and periodic log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Upper bounds (seconds) of the grammar compile-time histogram buckets (cumulative, Prometheus `le`).
GRAMMAR_COMPILE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of allocatable blocks in use (0..1), over all KV cache groups
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
    num_preemptions: int = 0  # cumulative
    num_blocks_total: int = 0  # allocatable blocks over all groups (the null block excluded)
    num_blocks_free: int = 0  # free + evictable cached blocks over all groups
    num_prompt_tokens: int = 0  # cumulative prompt tokens of admitted requests
    num_generation_tokens: int = 0  # cumulative sampled tokens
    # Structured output (cumulative): requests with a constraint, grammar compiles (a cache hit counts, with
    # its short time), failed compiles (invalid or timed out), compile seconds; buckets[i]: compiles that
    # took <= GRAMMAR_COMPILE_BUCKETS_S[i] (the +Inf bucket is num_grammar_compiles).
    num_constrained_requests: int = 0
    num_waiting_for_grammar: int = 0  # gauge: sequences whose grammar is still compiling
    num_grammar_compiles: int = 0
    num_grammar_compile_failures: int = 0
    grammar_compile_seconds_sum: float = 0.0
    grammar_compile_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(GRAMMAR_COMPILE_BUCKETS_S))


# Seconds between the periodic stats lines of a serving engine (vLLM's VLLM_LOG_STATS_INTERVAL default).
DEFAULT_LOG_STATS_INTERVAL_S = 10.0


class StatsLogger:
    """Turns successive SchedulerStats snapshots into vLLM-style periodic log lines.

    Throughputs are the cumulative token counters' growth over the time since the previous snapshot.
    A line is due while there is activity (tokens processed, or sequences running / waiting); when the
    engine goes idle one more line (all zeros) is due, then none until activity resumes.
    """

    def __init__(self, now: float, first: SchedulerStats | None = None) -> None:
        self._t = now
        self._last = first or SchedulerStats()
        self._was_active = False

    def line(self, stats: SchedulerStats, now: float) -> str | None:
        """The line for this snapshot, or None when nothing happened since the last (idle) line."""
        dt = max(now - self._t, 1e-9)
        prompt = max(0, stats.num_prompt_tokens - self._last.num_prompt_tokens)
        gen = max(0, stats.num_generation_tokens - self._last.num_generation_tokens)
        queries = stats.prefix_cache_queries - self._last.prefix_cache_queries
        hits = stats.prefix_cache_hits - self._last.prefix_cache_hits
        if queries <= 0:  # no prompt looked up in this interval: the rate since start
            queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        active = prompt > 0 or gen > 0 or stats.num_running > 0 or stats.num_waiting > 0
        due = active or self._was_active
        self._t, self._last, self._was_active = now, stats, active
        if not due:
            return None
        hit_rate = 100.0 * hits / queries if queries > 0 else 0.0
        return (f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {gen / dt:.1f} "
                f"tokens/s, Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100.0 * stats.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")


async def log_stats_forever(get_stats: Callable[[], SchedulerStats], interval_s: float,
                            logger: logging.Logger) -> None:
    """Log StatsLogger's line every `interval_s` seconds (until cancelled)."""
    stats_logger = StatsLogger(time.monotonic(), get_stats())
    while True:
        await asyncio.sleep(interval_s)
        text = stats_logger.line(get_stats(), time.monotonic())
        if text is not None:
            logger.info(text)
