"""Resident memory of `tokenmill serve` (server process + engine core + helpers), default flags unless given.

Starts `tokenmill serve --port P [ARGS]` on a free 127.0.0.1 port, waits for /health, reads VmRSS of the server
process and every descendant after start and after one completion, takes the KV cache size from the start log,
then stops the server (SIGTERM, then SIGKILL, by the PID this script started).

The KV cache's pages are committed as its blocks are first written, and the block pool hands out never-used
blocks before reusing cached ones, so a long-running busy server ends up holding all of it:
`bound_gb` = RSS after one request + the whole KV cache (a slight over-count: the request wrote a few blocks).

    .venv/bin/python benchmarks/serve_memory.py                          # the default model, default flags
    .venv/bin/python benchmarks/serve_memory.py -- --kv-cache-memory 0.5  # any serve flags after --
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

_KV = re.compile(r"KV cache capacity (\d+) tokens in ([\d.]+) GiB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_rss(pid: int) -> dict[str, int]:
    root = psutil.Process(pid)
    return {f"{p.pid} {' '.join(p.cmdline()[:3])[:60]}": p.memory_info().rss for p in [root, *root.children(True)]}


def _get(url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("serve_args", nargs="*", help="flags for `tokenmill serve` (after --)")
    args = ap.parse_args()
    port = _free_port()
    log_path = Path(tempfile.mkstemp(prefix="serve_memory_", suffix=".log")[1])
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), *args.serve_args]
    print(f"server log: {log_path}", file=sys.stderr)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with status {proc.returncode}; see {log_path}")
            try:
                _get(f"{base}/health")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"server not ready after {args.start_timeout}s; see {log_path}")
        at_start = _tree_rss(proc.pid)
        model = _get(f"{base}/v1/models")["data"][0]["id"]
        _get(f"{base}/v1/completions", {"model": model, "prompt": "The mill on the river", "max_tokens": 32},
             timeout=300)
        after = _tree_rss(proc.pid)
        match = _KV.search(log_path.read_text())
        kv_tokens, kv_gib = (int(match.group(1)), float(match.group(2))) if match else (None, None)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total = sum(after.values())
    print(json.dumps({
        "command": " ".join(cmd[2:]),
        "rss_at_start_gb": round(sum(at_start.values()) / 1e9, 3),
        "rss_after_request_gb": round(total / 1e9, 3),
        "rss_after_request_by_process_mb": {k: round(v / 1e6) for k, v in after.items()},
        "kv_cache_tokens": kv_tokens,
        "kv_cache_gib": kv_gib,
        "bound_gb": None if kv_gib is None else round((total + kv_gib * (1 << 30)) / 1e9, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
