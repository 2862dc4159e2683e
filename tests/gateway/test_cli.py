"""`tokenmill gateway` as a real process: quick form, config file, clear errors, dashboard mounted, graceful
SIGTERM (503 for new requests, in-flight ones finish, exit 0, managed replicas stopped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.gateway.conftest import REPLICA_SCRIPT, wait_healthy, wait_until
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
    with pytest.raises(ValueError, match="drain_timeout_s"):
        build_config(None, ["http://127.0.0.1:1"], None, None, None, None, -1.0)


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
        assert gw.wait(timeout=30) == 0  # a graceful stop, not uvicorn's re-raised SIGTERM (-15)
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()


def stream_in_thread(url: str, n_tokens: int) -> tuple[threading.Thread, dict]:
    """A streaming completion read on a thread; `out` gets first (an Event), events, done, error."""
    out: dict = {"first": threading.Event(), "events": 0, "done": False, "error": None}

    def read() -> None:
        try:
            body = {"prompt": "x", "max_tokens": n_tokens, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        out["done"] = True
                    elif line.startswith("data: "):
                        if "error" in json.loads(line[6:]):
                            out["error"] = line
                        out["events"] += 1
                        out["first"].set()
        except httpx.HTTPError as e:
            out["error"] = repr(e)
        finally:
            out["first"].set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, out


def test_sigterm_drains_in_flight_rejects_new_and_stops_managed_replicas(tmp_path: Path):
    """A real gateway process with one locally started (autoscaled) replica: SIGTERM while a stream runs."""
    cfg = tmp_path / "g.yaml"
    command = [sys.executable, REPLICA_SCRIPT, "--host", "{host}", "--port", "{port}", "--token-delay", "0.05"]
    cfg.write_text(json.dumps({"pools": [{"name": "p", "spec": {"command": command, "startup_timeout_s": 30},
                                          "autoscale": {"min_replicas": 1, "max_replicas": 1}}]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = subprocess.Popen([*GATEWAY, "--config", str(cfg), "--port", str(port), "--drain-timeout", "20",
                           "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    children: list[psutil.Process] = []
    try:
        wait_healthy(url, gw, 60)
        wait_until(lambda: httpx.get(f"{url}/health").json()["pools"]["p"]["ready"] == 1, 30, "managed replica up")
        children = psutil.Process(gw.pid).children(recursive=True)
        assert children  # the replica the gateway started
        t, out = stream_in_thread(url, 40)  # ~2 s of tokens
        assert out["first"].wait(30) and out["events"] >= 1
        gw.send_signal(signal.SIGTERM)

        def rejected() -> bool:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            return r.status_code == 503
        wait_until(rejected, 10, "new requests rejected while draining", interval_s=0.1)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health").json()["status"] == "draining"
        assert gw.poll() is None  # still serving the stream
        t.join(60)
        assert out["status"] == 200 and out["done"] and out["error"] is None and out["events"] == 40
        assert gw.wait(timeout=60) == 0
        for c in children:  # stopped by PID during shutdown, not left behind
            assert not c.is_running() or c.status() == psutil.STATUS_ZOMBIE
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()
        for c in children:
            if c.is_running():
                c.kill()


def test_drain_timeout_bounds_the_wait(procs):
    rep = procs.test_replica(token_delay=0.05)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = subprocess.Popen([*GATEWAY, "--replica", rep.url, "--port", str(port), "--drain-timeout", "0.5",
                           "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        wait_healthy(url, gw, 60)
        t, out = stream_in_thread(url, 1000)  # ~50 s: far longer than the drain timeout
        assert out["first"].wait(30) and out["events"] >= 1
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
        t.join(30)
        assert not out["done"]  # cut at the drain timeout, not waited for
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()
