"""The dashboard page shows speculative decoding's acceptance rate, mean accepted length and per-position
rates (headless Chromium on the real router and ServerMetrics, served by uvicorn in a thread)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from tests.fixtures.polling import wait_until
from tests.fixtures.servers import free_port
from tests.test_dashboard import CHROMIUM, chromium
from tokenmill.dashboard.router import dashboard_router
from tokenmill.engine.stats import SchedulerStats
from tokenmill.server.metrics import ServerMetrics


def _spec(drafts: int, tokens: int, accepted: int, per_pos: list[int]) -> SchedulerStats:
    return SchedulerStats(num_running=1, spec_num_drafts=drafts, spec_num_draft_tokens=tokens,
                          spec_num_accepted_tokens=accepted, spec_accepted_per_pos=per_pos)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make chromium)")
def test_dashboard_page_shows_spec_decode_acceptance(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    metrics = ServerMetrics(reg, "m", num_speculative_tokens=2)
    metrics.update_engine(1, 0, 0.1, 0, 0, 0)
    app = FastAPI()
    app.include_router(dashboard_router(reg))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started, 30, "uvicorn started")
        assert httpx.get(url + "/dashboard/stats", timeout=10).status_code == 200  # first snapshot: no drafts
        metrics.update_spec(_spec(10, 20, 15, [9, 6]))  # then 10 drafts of 2 tokens, 15 accepted
        wait_until(lambda: "spec_accept" in httpx.get(url + "/dashboard/stats", timeout=10).json()["history"][-1],
                   30, "a chart point with the window's acceptance rate")
        dom = chromium(["--virtual-time-budget=3000", "--dump-dom", url + "/dashboard"], tmp_path / "u")
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    def tile(name: str) -> float:
        return float(re.search(rf'id="tile-{name}"[^>]*data-value="([^"]*)"', dom).group(1))

    assert tile("spec-accept") == pytest.approx(75.0)
    assert tile("spec-len") == pytest.approx(2.5)
    rows = {int(p): float(r) for p, r in re.findall(r'<tr data-position="(\d+)" data-rate="([^"]*)"', dom)}
    assert rows == pytest.approx({0: 0.9, 1: 0.6})
    spec_card = re.search(r'<div class="card( hidden)?" data-section="spec">', dom)
    assert spec_card is not None and spec_card.group(1) is None  # shown
    points = re.search(r'id="chart-spec"[^>]*data-points="(\d+)"', dom)
    assert points is not None and int(points.group(1)) >= 1
