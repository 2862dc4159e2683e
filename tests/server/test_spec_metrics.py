"""Speculative-decoding metrics (tokenmill_spec_decode_*, vLLM's vllm:spec_decode_*) from the core's cumulative
SchedulerStats.spec_* figures, and the dashboard's acceptance rate and mean accepted length built on them."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.polling import wait_until
from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server
from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.dashboard.stats import DashboardStats
from tokenmill.engine.stats import SchedulerStats
from tokenmill.server.app import _spec_tokens
from tokenmill.server.metrics import ServerMetrics


def samples(reg: CollectorRegistry, name: str) -> dict[str, float]:
    """Values of one sample name, keyed by the position label ("" when there is none)."""
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("position", "")] = s.value
    return out


def spec(drafts: int, tokens: int, accepted: int, per_pos: list[int]) -> SchedulerStats:
    return SchedulerStats(spec_num_drafts=drafts, spec_num_draft_tokens=tokens, spec_num_accepted_tokens=accepted,
                          spec_accepted_per_pos=per_pos)


def test_no_spec_series_without_speculative_decoding():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m")
    m.update_spec(spec(3, 9, 4, [2, 1, 1]))  # a core reporting them anyway changes nothing
    assert "spec_decode" not in generate_latest(reg).decode()
    assert _spec_tokens(EngineConfig()) == 0
    assert _spec_tokens(EngineConfig(speculative=SpeculativeConfig(num_speculative_tokens=3))) == 3


def test_counters_follow_the_cores_cumulative_figures():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m", num_speculative_tokens=3)
    # zeros from the start, one per draft position
    assert samples(reg, "tokenmill_spec_decode_num_drafts_total") == {"": 0.0}
    assert samples(reg, "tokenmill_spec_decode_num_accepted_tokens_per_pos_total") == {"0": 0.0, "1": 0.0, "2": 0.0}
    m.update_spec(spec(4, 12, 7, [4, 2, 1]))
    m.update_spec(spec(6, 18, 9, [5, 3, 1]))
    assert samples(reg, "tokenmill_spec_decode_num_drafts_total") == {"": 6.0}
    assert samples(reg, "tokenmill_spec_decode_num_draft_tokens_total") == {"": 18.0}
    assert samples(reg, "tokenmill_spec_decode_num_accepted_tokens_total") == {"": 9.0}
    assert samples(reg, "tokenmill_spec_decode_num_accepted_tokens_per_pos_total") == {"0": 5.0, "1": 3.0, "2": 1.0}
    m.update_spec(spec(5, 15, 8, [5, 2, 1]))  # a stale snapshot never steps a counter back
    assert samples(reg, "tokenmill_spec_decode_num_drafts_total") == {"": 6.0}
    # a restarted core counts from zero: its figures add on top of the old ones
    m.engine_restarted()
    m.update_spec(spec(1, 3, 2, [1, 1]))
    assert samples(reg, "tokenmill_spec_decode_num_drafts_total") == {"": 7.0}
    assert samples(reg, "tokenmill_spec_decode_num_accepted_tokens_total") == {"": 11.0}
    assert samples(reg, "tokenmill_spec_decode_num_accepted_tokens_per_pos_total") == {"0": 6.0, "1": 4.0, "2": 1.0}


def test_dashboard_acceptance_rate_and_mean_accepted_length_over_the_window():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m", num_speculative_tokens=2)
    m.update_engine(1, 0, 0.1, 0, 0, 0)  # as the server does on every refresh
    stats = DashboardStats(reg, window_s=30.0, min_interval_s=0.0)
    first = stats.compute(now=0.0)["server"]["spec_decode"]
    assert first["acceptance_rate"] is None and first["mean_accepted_length"] is None
    assert first["per_position_acceptance_rate"] == [None, None]
    m.update_spec(spec(10, 20, 5, [4, 1]))  # before the window's second snapshot: a slow start
    stats.compute(now=10.0)
    m.update_spec(spec(20, 40, 25, [13, 12]))  # in the last 10 s: 10 drafts, 20 tokens, 20 accepted
    sd = stats.compute(now=20.0)["server"]["spec_decode"]
    # the window spans t=0..20 (both snapshots are within 30 s): 20 drafts, 40 tokens, 25 accepted
    assert sd["acceptance_rate"] == pytest.approx(25 / 40)
    assert sd["mean_accepted_length"] == pytest.approx(1 + 25 / 20)
    assert sd["per_position_acceptance_rate"] == pytest.approx([13 / 20, 12 / 20])
    assert sd["over_window"] and sd["drafts_total"] == 20.0
    # at t=45 the t=0 snapshot has left the 30 s window: the window starts at the t=10 snapshot
    m.update_spec(spec(24, 48, 31, [16, 15]))
    out = stats.compute(now=45.0)
    sd = out["server"]["spec_decode"]
    assert sd["acceptance_rate"] == pytest.approx((31 - 5) / (48 - 20))
    assert sd["mean_accepted_length"] == pytest.approx(1 + (31 - 5) / (24 - 10))
    assert sd["per_position_acceptance_rate"] == pytest.approx([(16 - 4) / 14, (15 - 1) / 14])
    assert out["history"][-1]["spec_accept"] == pytest.approx(26 / 28)
    assert out["history"][-1]["spec_len"] == pytest.approx(1 + 26 / 14)
    # idle: nothing drafted in the window -> the figures since start, and no chart point
    for t in (80.0, 120.0):
        out = stats.compute(now=t)
    sd = out["server"]["spec_decode"]
    assert not sd["over_window"] and sd["acceptance_rate"] == pytest.approx(31 / 48)
    assert "spec_accept" not in out["history"][-1]


def test_dashboard_has_no_spec_section_without_speculative_decoding():
    reg = CollectorRegistry()
    ServerMetrics(reg, "m").update_engine(1, 0, 0.1, 0, 0, 0)
    assert DashboardStats(reg, min_interval_s=0.0).compute(now=1.0)["server"]["spec_decode"] is None


def test_live_server_exposes_the_cores_spec_counts(tiny_llama_dir, tmp_path):
    """--speculative-config through the CLI, the engine core process and the stats wire to /metrics and the
    dashboard: counts that add up (per-position sums = accepted <= draft tokens = drafts x at most k)."""
    cfg = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    server = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--speculative-config", json.dumps(cfg),
                          tmp_dir=tmp_path)
    try:
        body = {"model": "tiny", "prompt": "the cat sat on the mat. " * 6, "max_tokens": 24, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text

        def counts() -> dict[str, float] | None:
            text = httpx.get(server.url + "/metrics", timeout=10).text
            got = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name.startswith("tokenmill_spec_decode_") and s.name.endswith("_total"):
                        key = s.name.removeprefix("tokenmill_spec_decode_num_").removesuffix("_total")
                        got[key + s.labels.get("position", "")] = s.value
            return got if got.get("drafts", 0) > 0 else None

        got = wait_until(counts, 30, "spec_decode counters on /metrics")
        assert got["accepted_tokens"] <= got["draft_tokens"] <= 3 * got["drafts"]
        assert sum(got[f"accepted_tokens_per_pos{p}"] for p in range(3)) == got["accepted_tokens"]
        sd = httpx.get(server.url + "/dashboard/stats", timeout=10).json()["server"]["spec_decode"]
        assert sd["drafts_total"] == got["drafts"] and sd["accepted_tokens_total"] == got["accepted_tokens"]
    finally:
        assert server.stop() == 0
