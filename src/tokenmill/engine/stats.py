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
    # Speculative decoding (cumulative, vLLM's meanings): drafts (sequence-steps that verified proposals), draft
    # tokens verified, accepted tokens, and per draft position how often it was accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # Multi-LoRA: adapters in the running batch (gauge), requests per adapter name (cumulative), swaps (cumulative:
    # adapters loaded into a slot of the stacked weights), adapters held in memory (gauge).
    lora_running: list[str] = field(default_factory=list)
    lora_waiting: list[str] = field(default_factory=list)
    lora_requests: dict[str, int] = field(default_factory=dict)
    lora_num_swaps: int = 0  # cumulative: adapters written into a slot of the stacked weights
    lora_num_loaded: int = 0  # gauge: adapters held in memory (parsed, at most max_cpu_loras)


@dataclass(slots=True)
class SpecDecodeCounts:
    """The scheduler's running totals of speculative decoding (copied into SchedulerStats.spec_*)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1

    def as_stats(self) -> dict[str, object]:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_pos": list(self.accepted_per_pos)}


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
        last = self._last
        self._t, self._last, self._was_active = now, stats, active
        if not due:
            return None
        hit_rate = 100.0 * hits / queries if queries > 0 else 0.0
        text = (f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {gen / dt:.1f} "
                f"tokens/s, Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100.0 * stats.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%")
        return text + _spec_decode_text(stats, last)


def _spec_decode_text(stats: SchedulerStats, last: SchedulerStats) -> str:
    """vLLM's speculative-decoding figures over the interval: acceptance rate and mean accepted length (the
    tokens one verifying step emits: accepted drafts + 1); "" when no draft was verified in it."""
    drafts = stats.spec_num_drafts - last.spec_num_drafts
    draft_tokens = stats.spec_num_draft_tokens - last.spec_num_draft_tokens
    if drafts <= 0 or draft_tokens <= 0:
        return ""
    accepted = stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens
    return (f", Spec decode: acceptance rate {100.0 * accepted / draft_tokens:.1f}%, mean accepted length "
            f"{1 + accepted / drafts:.2f}")


async def log_stats_forever(get_stats: Callable[[], SchedulerStats], interval_s: float,
                            logger: logging.Logger) -> None:
    """Log StatsLogger's line every `interval_s` seconds (until cancelled)."""
    stats_logger = StatsLogger(time.monotonic(), get_stats())
    while True:
        await asyncio.sleep(interval_s)
        text = stats_logger.line(get_stats(), time.monotonic())
        if text is not None:
            logger.info(text)
