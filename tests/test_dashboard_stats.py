"""Dashboard stats from a registry holding the server's and gateway's metric names (hand-computed)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.dashboard.router import dashboard_router
from tokenmill.dashboard.stats import DashboardStats, histogram_quantile


def test_histogram_quantile_matches_prometheus_interpolation() -> None:
    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, float("inf"): 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10: top of the first bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.875, buckets) == pytest.approx(0.35)  # rank 35: halfway through (0.2, 0.5]
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.99, {1.0: 1.0, float("inf"): 5.0}) == 1.0  # in +Inf: last finite bound


def _server_metrics(r: CollectorRegistry):
    lbl = ["model_name"]
    return dict(
        gen=Counter("tokenmill_generation_tokens", "", lbl, registry=r),
        prompt=Counter("tokenmill_prompt_tokens", "", lbl, registry=r),
        ok=Counter("tokenmill_request_success", "", lbl + ["finished_reason"], registry=r),
        running=Gauge("tokenmill_num_requests_running", "", lbl, registry=r),
        waiting=Gauge("tokenmill_num_requests_waiting", "", lbl, registry=r),
        kv=Gauge("tokenmill_kv_cache_usage_perc", "", lbl, registry=r),
        q=Counter("tokenmill_prefix_cache_queries", "", lbl, registry=r),
        h=Counter("tokenmill_prefix_cache_hits", "", lbl, registry=r),
        ttft=Histogram("tokenmill_time_to_first_token_seconds", "", lbl, buckets=(0.1, 0.2, 0.5), registry=r),
        itl=Histogram("tokenmill_inter_token_latency_seconds", "", lbl, buckets=(0.01, 0.02), registry=r),
    )


def test_server_rates_and_window_percentiles() -> None:
    r = CollectorRegistry()
    m = _server_metrics(r)
    m["gen"].labels("m").inc(100)
    for _ in range(10):
        m["ttft"].labels("m").observe(5.0)  # old slow requests: must fall out of the window
    stats = DashboardStats(r, window_s=30.0, min_interval_s=0.0)
    first = stats.compute(now=100.0)
    assert first["server"]["generation_tokens_per_s"] == 0.0  # one snapshot: no rate yet
    m["gen"].labels("m").inc(50)
    m["prompt"].labels("m").inc(20)
    m["ok"].labels("m", "length").inc(4)
    m["running"].labels("m").set(3)
    m["waiting"].labels("m").set(2)
    m["kv"].labels("m").set(0.25)
    m["q"].labels("m").inc(200)
    m["h"].labels("m").inc(50)
    for v in (0.05, 0.15, 0.15, 0.15):
        m["ttft"].labels("m").observe(v)
    s = stats.compute(now=110.0)["server"]
    assert s["generation_tokens_per_s"] == pytest.approx(5.0)
    assert s["prompt_tokens_per_s"] == pytest.approx(2.0)
    assert s["requests_per_s"] == pytest.approx(0.4)
    assert (s["running"], s["waiting"], s["kv_cache_usage"]) == (3, 2, 0.25)
    assert s["prefix_cache_hit_rate"] == pytest.approx(0.25)
    # window buckets: 1 in (0, 0.1], 3 in (0.1, 0.2]; p50 = rank 2 -> 0.1 + 0.1 * (2 - 1) / 3
    assert s["ttft_ms"]["p50"] == pytest.approx(1000 * (0.1 + 0.1 / 3))
    assert s["itl_ms"]["p50"] is None  # no ITL samples in the window
    assert "gateway" not in stats.compute(now=111.0)


def test_window_slides() -> None:
    r = CollectorRegistry()
    m = _server_metrics(r)
    stats = DashboardStats(r, window_s=10.0, min_interval_s=0.0)
    for t in range(0, 40, 5):
        m["gen"].labels("m").inc(10 if t < 20 else 100)
        s = stats.compute(now=float(t))
    # by t=35 only snapshots from t>=25 remain (plus one before, to span the window): 100 tokens per 5 s
    assert s["server"]["generation_tokens_per_s"] == pytest.approx(20.0)
    assert s["window_s"] <= 15.0
    assert len(s["history"]) == 8


def test_gateway_pools_and_routing_and_router() -> None:
    r = CollectorRegistry()
    req = Counter("tokenmill_gateway_requests", "", ["pool", "status"], registry=r)
    desired = Gauge("tokenmill_gateway_replicas_desired", "", ["pool"], registry=r)
    ready = Gauge("tokenmill_gateway_replicas_ready", "", ["pool"], registry=r)
    routing = Counter("tokenmill_gateway_routing_decisions", "", ["alias", "pool"], registry=r)
    desired.labels("small").set(2)
    ready.labels("small").set(1)
    desired.labels("large").set(1)
    ready.labels("large").set(1)
    req.labels("small", "200").inc(7)
    req.labels("large", "429").inc(1)
    routing.labels("auto", "small").inc(3)
    routing.labels("auto", "large").inc(1)
    app = FastAPI()
    app.include_router(dashboard_router(r, extra=lambda: {"note": "hi"}))
    client = TestClient(app)
    page = client.get("/dashboard")
    assert page.status_code == 200 and "<svg" in page.text
    # self-contained: no external scripts, stylesheets or images
    assert "<script src" not in page.text and "<link" not in page.text and "<img" not in page.text
    body = client.get("/dashboard/stats").json()
    g = body["gateway"]
    assert g["pools"]["small"]["replicas_desired"] == 2 and g["pools"]["small"]["replicas_ready"] == 1
    assert g["pools"]["large"]["requests_total"] == 1
    assert g["routing"] == {"auto": {"small": 3.0, "large": 1.0}}
    assert g["errors_total"] == 0 and g["client_errors_total"] == 1  # a 429 is the client's, not an error
    assert body["extra"] == {"note": "hi"} and "server" not in body
