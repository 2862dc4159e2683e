"""Scheduler statistics: a snapshot the server turns into Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass


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
