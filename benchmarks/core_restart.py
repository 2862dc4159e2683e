"""Engine-core death and recovery, timed: SIGKILL the core of a `tokenmill serve` while a stream runs, then
measure from the kill to (a) the stream's error event, (b) the first /health 503, (c) /health 200 again
(backoff + a new core's model load), and check the greedy output is the same after the restart.
Prints one JSON object (the medians and every round).

    .venv/bin/python benchmarks/core_restart.py --tiny --rounds 3     # the tests' tiny random Llama
    .venv/bin/python benchmarks/core_restart.py --rounds 1            # the default model (Gemma 3 270M)

Kills only the core PID that /debug/stats reports, after checking it is a child of the server it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fixtures, for --tiny and the launcher

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server


def _until(predicate, timeout_s: float) -> float:
    """Monotonic time at which predicate() first held (polled every 10 ms), or raise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"not within {timeout_s}s")


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.TransportError:
        return 0


def one_round(server, greedy: dict) -> dict:
    url = server.url
    pid = httpx.get(url + "/debug/stats").json()["core_pid"]
    assert pid in [p.pid for p in server.children()], "the core must be a child of the server we started"
    body = {**greedy, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        errored = None
        for line in lines:
            if line.startswith('data: {"error"'):
                errored = time.monotonic()
    down = _until(lambda: _health(url) == 503, 30)
    up = _until(lambda: _health(url) == 200, 300)
    text = httpx.post(url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
    return {"kill_to_stream_error_s": round(errored - killed, 4) if errored else None,
            "kill_to_health_503_s": round(down - killed, 4), "kill_to_health_200_s": round(up - killed, 3),
            "text": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the packaged default model)")
    ap.add_argument("--tiny", action="store_true", help="build and serve the tests' tiny random Llama")
    ap.add_argument("--rounds", type=int, default=1, help="kills (at most 3: the default --max-core-restarts)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="core-restart-"))
    if args.tiny:
        from tests.fixtures.tiny_models import build_tiny_model

        model, flags = str(build_tiny_model(tmp / "tiny", "llama")), list(TINY_SERVER_FLAGS)
    else:
        model, flags = args.model, ["--kv-cache-memory", "0.5"]
    server = start_server(model, *flags, tmp_dir=tmp)
    try:
        greedy = {"prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        before = httpx.post(server.url + "/v1/completions", json=greedy, timeout=60).json()["choices"][0]["text"]
        rounds = [one_round(server, greedy) for _ in range(args.rounds)]
    finally:
        code = server.stop(30)
    keys = ("kill_to_stream_error_s", "kill_to_health_503_s", "kill_to_health_200_s")
    print(json.dumps({
        "model": "tiny-llama" if args.tiny else (model or "default"), "rounds": len(rounds),
        "median": {k: statistics.median(r[k] for r in rounds if r[k] is not None) for k in keys},
        "same_greedy_output_after_restart": all(r["text"] == before for r in rounds),
        "server_exit_code_on_sigterm": code, "cpu_count": psutil.cpu_count(),
        "rounds_detail": [{k: r[k] for k in keys} for r in rounds],
    }, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
