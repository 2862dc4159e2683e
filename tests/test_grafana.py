"""Every metric the Grafana dashboard queries exists in a live /metrics (server and gateway)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.bench.live import live_gateway, live_server  # noqa: F401  (session fixtures)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "tokenmill.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def queried_metrics() -> set[str]:
    """Metric names in every PromQL expression of the dashboard (panels and template variables)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {m for e in exprs for m in re.findall(r"\btokenmill_[a-zA-Z0-9_]+", e)}


def exposed(url: str) -> tuple[set[str], set[str]]:
    """(sample names, family names) of a live /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples, families = set(), set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        samples |= {s.name for s in fam.samples}
    return samples, families


def family_of(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_queries_cover_server_and_gateway() -> None:
    names = queried_metrics()
    assert len([n for n in names if n.startswith("tokenmill_gateway_")]) >= 10
    assert len([n for n in names if not n.startswith("tokenmill_gateway_")]) >= 14


def test_every_queried_metric_is_exposed(live_server: str, live_gateway: str) -> None:  # noqa: F811
    # Traffic through the gateway to the server, so labelled series (histograms, counters) have samples.
    for i in range(2):
        r = httpx.post(f"{live_gateway}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": f"grafana {i}", "max_tokens": 3})
        assert r.status_code == 200, r.text
    server_samples, server_families = exposed(live_server)
    gw_samples, gw_families = exposed(live_gateway)
    # The traffic above must have produced these series (not just declared them).
    for name in ("tokenmill_generation_tokens_total", "tokenmill_time_to_first_token_seconds_bucket",
                 "tokenmill_e2e_request_latency_seconds_bucket"):
        assert name in server_samples, name
    assert "tokenmill_gateway_requests_total" in gw_samples
    missing = []
    for name in sorted(queried_metrics()):
        samples, families = (gw_samples, gw_families) if name.startswith("tokenmill_gateway_") else \
            (server_samples, server_families)
        # Labelled series that only appear when their event happens (preemptions, retries, ejections,
        # alias routing) exist once their family is declared in the exposition.
        if name not in samples and family_of(name) not in families:
            missing.append(name)
    assert not missing, f"queried by deploy/grafana/tokenmill.json but not exposed: {missing}"


def test_per_replica_panels_group_by_the_replica_label(live_gateway: str) -> None:  # noqa: F811
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    by_replica = [e for e in exprs if "by (replica" in e]
    assert len(by_replica) >= 4
    # Every series those panels read carries the label in a live gateway's exposition.
    text = httpx.get(f"{live_gateway}/metrics", timeout=10).text
    labelled = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples if "replica" in s.labels}
    for e in by_replica:
        names = set(re.findall(r"\btokenmill_gateway_[a-zA-Z0-9_]+", e))
        assert names and names <= labelled | {"tokenmill_gateway_requests_total"}, e
