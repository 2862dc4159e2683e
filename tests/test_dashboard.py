"""The live dashboard in headless Chromium, on a live `tokenmill serve` (and the gateway) under load."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.bench.live import live_gateway, live_server  # noqa: F401  (session fixtures)
from tokenmill.bench.datasets import build_workload, load_tokenizer
from tokenmill.bench.runner import RunConfig, run_benchmark

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "results"  # git-ignored; the screenshot is kept to look at


def chromium(args: list[str], user_dir: Path, timeout_s: float = 60.0) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_dir}", "--window-size=1400,1000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True).stdout


class Load:
    """Bounded background load: `n` streaming requests through the bench runner, in a thread."""

    def __init__(self, url: str, tokenizer_dir: Path, n: int, max_duration_s: float) -> None:
        tok = load_tokenizer(str(tokenizer_dir))
        # Shared 48-token prefix, so the prefix cache gets hits. 96 tokens each: with 24 the tiny model finished
        # the whole load between two of the server's stats samples about half the time on a 2-core machine.
        reqs = build_workload("random", tokenizer=tok, num_prompts=n, dataset_path=None, input_len=48,
                              output_len=96, range_ratio=0.0, seed=1)
        for r in reqs:
            r.prompt = reqs[0].prompt + r.prompt
        cfg = RunConfig(base_url=url, model="tiny", max_concurrency=8, num_warmups=0, ignore_eos=True,
                        show_progress=False, max_duration_s=max_duration_s)
        self.result: dict | None = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", asyncio.run(
            run_benchmark(cfg, reqs, tok))), daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(timeout=120)


def _values(dom: str, attr: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'id="([\w-]+)"[^>]*data-{attr}="([^"]*)"', dom):
        if m.group(2):
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def dashboard_under_load(live_server: str, tiny_llama_dir: Path, tmp_path_factory) -> dict:  # noqa: F811
    """Load the live server, let a viewer poll the stats meanwhile, then render /dashboard in Chromium."""
    tmp = tmp_path_factory.mktemp("chromium")
    with Load(live_server, tiny_llama_dir, n=32, max_duration_s=60) as load:
        # Someone watching while the load runs: the server keeps the stats history the page charts.
        for _ in range(6):
            assert httpx.get(f"{live_server}/dashboard/stats", timeout=10).status_code == 200
            time.sleep(0.5)
        dom = chromium(["--virtual-time-budget=4000", "--dump-dom", f"{live_server}/dashboard"], tmp / "u1")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        chromium(["--virtual-time-budget=4000", f"--screenshot={shot}", f"{live_server}/dashboard"], tmp / "u2")
    return {"dom": dom, "shot": shot, "load": load.result,
            "charts": {k.removeprefix("chart-"): v for k, v in _values(dom, "max").items()},
            "tiles": {k.removeprefix("tile-"): v for k, v in _values(dom, "value").items()}}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make chromium)")
def test_dashboard_charts_traffic(dashboard_under_load: dict) -> None:
    d = dashboard_under_load
    assert d["load"] is not None and d["load"]["completed"] > 0
    # the page polled and drew the traffic charts with data in them
    assert int(re.search(r'data-updates="(\d+)"', d["dom"]).group(1)) >= 1
    for name in ("throughput", "ttft", "itl"):
        assert d["charts"].get(name, 0) > 0, (name, d["charts"])
    assert d["tiles"]["requests-total"] > 0 and d["tiles"]["gen-tps"] >= 0
    # the header names the model, its dtype, the CPU and the uptime
    for field in ("model", "dtype", "weights", "CPU", "up"):
        assert f'data-field="{field}"' in d["dom"], field
    assert d["shot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make chromium)")
def test_dashboard_charts_engine_state(dashboard_under_load: dict) -> None:
    """Running/waiting requests and KV usage come from the engine's gauges: under load they are non-zero
    at some sample. (The server must refresh those gauges for /dashboard/stats, e.g. through the router's
    `extra` hook, not only when /metrics is scraped.)"""
    charts = dashboard_under_load["charts"]
    assert charts.get("requests", 0) > 0, charts
    assert charts.get("cache", 0) > 0, charts


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (make chromium)")
def test_gateway_dashboard_shows_pools(live_gateway: str, tmp_path: Path) -> None:  # noqa: F811
    bad = httpx.post(f"{live_gateway}/v1/completions", timeout=60, json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404  # a client error: no phantom pool, not a gateway error
    for i in range(3):
        r = httpx.post(f"{live_gateway}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": f"hello {i}", "max_tokens": 4})
        assert r.status_code == 200, r.text
    for _ in range(3):
        httpx.get(f"{live_gateway}/dashboard/stats", timeout=10)
        time.sleep(0.3)
    dom = chromium(["--virtual-time-budget=3000", "--dump-dom", f"{live_gateway}/dashboard"], tmp_path / "u")
    row = re.search(r'data-pool="default".*?data-ready="([\d.]+)" data-desired="([\d.]+)"', dom, re.S)
    assert row and float(row.group(1)) >= 1 and float(row.group(2)) >= 1, dom[-2000:]
    assert _values(dom, "value").get("tile-gw-rps") is not None
    assert 'data-pool="none"' not in dom
    assert _values(dom, "value").get("tile-gw-client-errors", 0) >= 1
    assert re.search(r'<tr data-replica="http://127\.0\.0\.1:\d+">', dom), dom[-2000:]
    assert 'data-field="model"' in dom and 'data-field="up"' in dom
