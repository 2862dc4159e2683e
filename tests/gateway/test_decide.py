"""Autoscaler decide(): synthetic stats in, desired replicas out."""

from __future__ import annotations

import dataclasses

from tokenmill.gateway.autoscaler import PoolStats, decide
from tokenmill.gateway.config import AutoscaleConfig

CFG = AutoscaleConfig(min_replicas=1, max_replicas=4, target_queue_per_replica=2, target_outstanding_per_replica=4,
                      kv_usage_high=0.85, ttft_target_s=1.0, scale_up_cooldown_s=10, scale_down_cooldown_s=30,
                      idle_to_zero_s=60)
IDLE = PoolStats(desired=2, num_ready=2, num_queued=0, num_outstanding=0)


def s(**kw) -> PoolStats:
    return dataclasses.replace(IDLE, **kw)


def test_queue_depth_per_replica_scales_up_by_backlog():
    assert decide(s(num_queued=5, num_outstanding=6), CFG, 100.0) == 3  # 11 in demand / 4 per replica
    assert decide(s(num_queued=5, num_outstanding=10), CFG, 100.0) == 4
    assert decide(s(num_queued=5, num_outstanding=0), CFG, 100.0) == 3  # at least +1
    assert decide(s(num_queued=4, num_outstanding=8), CFG, 100.0) == 2  # 2 per replica: not above target


def test_replica_reported_waiting_counts_as_backlog():
    assert decide(s(num_replica_waiting=6, num_outstanding=8), CFG, 100.0) == 4


def test_kv_usage_and_ttft_trigger_scale_up():
    assert decide(s(max_kv_usage=0.9, num_outstanding=4), CFG, 100.0) == 3
    assert decide(s(ttft_p50_s=2.0, num_outstanding=4), CFG, 100.0) == 3
    assert decide(s(ttft_p50_s=0.5, num_outstanding=4), CFG, 100.0) == 2


def test_max_replicas_caps_and_cooldown_blocks_scale_up():
    assert decide(s(desired=4, num_ready=4, num_queued=100), CFG, 100.0) == 4
    assert decide(s(num_queued=10, last_scale_up_at=95.0), CFG, 100.0) == 2
    assert decide(s(num_queued=10, last_scale_up_at=89.0), CFG, 100.0) > 2


def test_scale_down_one_at_a_time_after_cooldown_and_never_below_min():
    assert decide(s(desired=3, num_ready=3, last_scale_up_at=50.0), CFG, 100.0) == 2
    assert decide(s(desired=3, num_ready=3, last_scale_up_at=80.0), CFG, 100.0) == 3  # up cooldown window
    assert decide(s(desired=3, num_ready=3, last_scale_down_at=90.0), CFG, 100.0) == 3
    assert decide(s(desired=1, num_ready=1), CFG, 100.0) == 1


def test_no_scale_down_while_busy_or_queued():
    assert decide(s(desired=3, num_ready=3, num_outstanding=8), CFG, 1000.0) == 3  # would need 2 at 100%
    assert decide(s(desired=3, num_ready=3, num_outstanding=4), CFG, 1000.0) == 2  # fits 2 replicas at <=50%
    assert decide(s(desired=3, num_ready=3, num_queued=1), CFG, 1000.0) == 3


def test_scale_to_zero_and_cold_start():
    cfg = dataclasses.replace(CFG, min_replicas=0)
    assert decide(s(desired=1, num_ready=1, last_request_at=10.0), cfg, 100.0) == 0
    assert decide(s(desired=1, num_ready=1, last_request_at=50.0), cfg, 100.0) == 1  # idle only 50 s
    assert decide(s(desired=1, num_ready=1, num_outstanding=1, last_request_at=0.0), cfg, 100.0) == 1
    assert decide(s(desired=0, num_ready=0), cfg, 100.0) == 0
    # The first request of a cold pool starts one replica at once, cooldowns notwithstanding.
    assert decide(s(desired=0, num_ready=0, num_queued=1, last_scale_down_at=99.0), cfg, 100.0) == 1


def test_bounds_are_enforced():
    assert decide(s(desired=0, num_ready=0), CFG, 100.0) == 1  # min 1
    assert decide(s(desired=6, num_ready=6), CFG, 100.0) == 4
