"""`tokenmill gateway` as a real process: quick form, config file, clear errors, dashboard mounted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import wait_healthy
from tokenmill.gateway.actuators import free_port
from tokenmill.gateway.cli import build_config

GATEWAY = [sys.executable, "-m", "tokenmill.cli", "gateway"]


def run_fail(*args: str) -> str:
    out = subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    return out.stderr


def test_cli_errors_name_the_option(tmp_path: Path):
    assert "policy" in run_fail("--replica", "http://127.0.0.1:1", "--policy", "fastest")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("pools:\n  - name: a\n    replicas: [http://127.0.0.1:1]\n    policy: nope\n")
    assert "pools[0].policy" in run_fail("--config", str(cfg))
    for args, message in [((None, None), "--replica"), ((tmp_path / "missing.yaml", None), "does not exist"),
                          ((cfg, ["http://x"]), "--replica: not allowed together with --config")]:
        with pytest.raises(ValueError, match=message):
            build_config(*args, None, None, None, None)


def test_build_config_quick_form_and_overrides(tmp_path: Path):
    cfg = build_config(None, ["http://127.0.0.1:8001", "http://127.0.0.1:8002"], "round-robin", None, 9100, None)
    assert cfg.port == 9100 and cfg.host == "127.0.0.1"
    assert [r.url for r in cfg.pools[0].replicas] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert cfg.pools[0].policy == "round-robin"
    f = tmp_path / "g.yaml"
    f.write_text("port: 9300\npools:\n  - {name: a, replicas: [http://127.0.0.1:1], policy: affinity}\n")
    cfg = build_config(f, None, None, None, None, 4)
    assert cfg.port == 9300 and cfg.pools[0].policy == "affinity" and cfg.pools[0].max_concurrency == 4


def test_quick_form_serves_and_mounts_the_dashboard(procs):
    rep = procs.test_replica(model="m")
    port = free_port()
    gw = subprocess.Popen([*GATEWAY, "--replica", rep.url, "--policy", "round-robin", "--port", str(port),
                           "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, gw, 60)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " w0 w1"
        assert "<html" in httpx.get(f"{url}/dashboard").text.lower()
        stats = httpx.get(f"{url}/dashboard/stats").json()
        assert stats["extra"]["pools"]["default"]["replicas_ready"] == 1
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutdown
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()
