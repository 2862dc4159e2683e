"""The periodic stats line (vLLM's "Avg prompt throughput ..."): numbers from SchedulerStats deltas, one idle
line after activity, then silence; and how disable_log_stats reaches EngineConfig."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tokenmill.engine.args import engine_config
from tokenmill.engine.stats import (
    DEFAULT_LOG_STATS_INTERVAL_S,
    SchedulerStats,
    StatsLogger,
    log_stats_forever,
)


def test_line_reports_throughput_queue_kv_and_hit_rate() -> None:
    sl = StatsLogger(now=100.0, first=SchedulerStats(num_prompt_tokens=10, num_generation_tokens=5))
    s = SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.125, prefix_cache_queries=200,
                       prefix_cache_hits=50, num_prompt_tokens=210, num_generation_tokens=105)
    line = sl.line(s, now=110.0)
    assert line == ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 10.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 2 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%")


def test_one_idle_line_after_activity_then_silence() -> None:
    sl = StatsLogger(now=0.0)
    assert sl.line(SchedulerStats(), now=5.0) is None  # idle from the start: nothing to say
    busy = SchedulerStats(num_running=1, num_prompt_tokens=40, num_generation_tokens=8)
    assert "Avg generation throughput: 1.6 tokens/s" in sl.line(busy, now=10.0)
    # Running but no new tokens (e.g. a long step): still active, so still logged.
    assert "Running: 1 reqs" in sl.line(busy, now=15.0)
    done = SchedulerStats(num_prompt_tokens=40, num_generation_tokens=8)
    idle = sl.line(done, now=20.0)
    assert idle is not None and "Avg generation throughput: 0.0 tokens/s, Running: 0 reqs, Waiting: 0 reqs" in idle
    assert sl.line(done, now=25.0) is None
    assert sl.line(done, now=30.0) is None
    again = SchedulerStats(num_prompt_tokens=50, num_generation_tokens=8, prefix_cache_queries=10, prefix_cache_hits=10)
    assert "Avg prompt throughput: 2.0 tokens/s" in sl.line(again, now=35.0)


def test_hit_rate_falls_back_to_cumulative_when_no_lookups_in_the_interval() -> None:
    sl = StatsLogger(now=0.0, first=SchedulerStats(prefix_cache_queries=100, prefix_cache_hits=40))
    line = sl.line(SchedulerStats(num_running=1, prefix_cache_queries=100, prefix_cache_hits=40), now=1.0)
    assert line.endswith("Prefix cache hit rate: 40.0%")


def test_log_stats_forever_logs_the_line(caplog: pytest.LogCaptureFixture) -> None:
    busy = SchedulerStats(num_running=2, num_generation_tokens=30)
    snaps = iter([SchedulerStats()])  # the first call (the baseline) sees an idle engine, later ones `busy`

    async def main() -> None:
        task = asyncio.create_task(log_stats_forever(lambda: next(snaps, busy), 0.01, logging.getLogger("t.stats")))
        for _ in range(500):  # bounded: until the first line was logged
            if caplog.records:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="t.stats"):
        asyncio.run(main())
    assert caplog.records and "Running: 2 reqs" in caplog.records[0].getMessage()


def test_disable_log_stats_reaches_engine_config() -> None:
    assert engine_config().log_stats_interval_s is None  # vLLM's LLM() does not log stats by default
    assert engine_config(disable_log_stats=True).log_stats_interval_s is None
    assert engine_config(disable_log_stats=False).log_stats_interval_s == DEFAULT_LOG_STATS_INTERVAL_S


def test_spec_decode_figures_over_the_interval():
    logger = StatsLogger(0.0)
    first = logger.line(SchedulerStats(num_running=1, num_generation_tokens=50, spec_num_drafts=10,
                                       spec_num_draft_tokens=40, spec_num_accepted_tokens=30), 1.0)
    assert first.endswith("Spec decode: acceptance rate 75.0%, mean accepted length 4.00")
    second = logger.line(SchedulerStats(num_running=1, num_generation_tokens=70, spec_num_drafts=14,
                                        spec_num_draft_tokens=56, spec_num_accepted_tokens=34), 2.0)
    assert second.endswith("acceptance rate 25.0%, mean accepted length 2.00")  # the interval's 4 drafts only
    idle = logger.line(SchedulerStats(num_running=1, num_generation_tokens=80, spec_num_drafts=14,
                                      spec_num_draft_tokens=56, spec_num_accepted_tokens=34), 3.0)
    assert "Spec decode" not in idle
