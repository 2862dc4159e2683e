"""Soak: a bounded run of mixed traffic against `tokenmill serve`; prints JSON on leaks and lost requests.

    .venv/bin/python benchmarks/soak.py                        # the default model (Gemma 3 270M), 10 minutes
    .venv/bin/python benchmarks/soak.py --tiny --duration-s 120  # a tiny random Llama built on the spot
    .venv/bin/python benchmarks/soak.py --model PATH           # any model folder or GGUF file

First every KV block is written once (the cache's pages become resident on first write: see fill_kv_cache).
Traffic (--concurrency workers, round robin over the kinds): streaming and non-streaming completions,
streaming chat, streams the client drops after a few chunks (aborted), n=3, and prompts sharing a long
prefix (prefix-cache hits). Every --sample-interval-s the server process and its engine core are sampled:
RSS (psutil), open file descriptors (/proc/PID/fd), KV usage and in-flight sequences (/debug/stats).
Reported: requests sent / completed / aborted (by the client, on purpose) / lost (anything else: an error
status, an error event, a stream without [DONE], a timeout; must be 0), the server's own abort count, RSS
after warm-up vs at the end (growth %, target < 5%), fds at warm-up and at the end, and KV usage once idle
at the end (must be 0). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

try:  # run as a script (benchmarks/ on sys.path) or imported by a test as benchmarks.<name>
    from server_procs import free_port, start, stop
except ImportError:
    from benchmarks.server_procs import free_port, start, stop

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("stream", "non_stream", "chat_stream", "abort", "n3", "shared_prefix")
PREFIX = "You are a careful assistant. Answer briefly and stay on topic. " * 4


@dataclass
class Tally:
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    completed: int = 0
    aborted: int = 0
    lost: list[str] = field(default_factory=list)  # kind: what went wrong


def body_for(kind: str, i: int, max_tokens: int, model: str | None) -> tuple[str, dict]:
    common = {"max_tokens": max_tokens, "temperature": 0.8, "seed": i, **({"model": model} if model else {})}
    if kind == "chat_stream":
        return "/v1/chat/completions", {**common, "stream": True,
                                        "messages": [{"role": "user", "content": f"Tell me about item {i}."}]}
    prompt = f"{PREFIX}Question {i}: what comes next?" if kind == "shared_prefix" else f"Request {i}: once upon a"
    extra = {"stream": kind in ("stream", "abort")}
    if kind == "n3":
        extra["n"] = 3
    if kind == "abort":
        extra["ignore_eos"] = True  # long enough to be cut mid-stream
        common["max_tokens"] = max(4 * max_tokens, 64)
    return "/v1/completions", {**common, "prompt": prompt, **extra}


async def one(client: httpx.AsyncClient, kind: str, i: int, args: argparse.Namespace, tally: Tally) -> None:
    path, body = body_for(kind, i, args.max_tokens, args.served_model)
    tally.sent[kind] += 1
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body)
            choices = r.json().get("choices", []) if r.status_code == 200 else []
            want = body.get("n", 1)
            if r.status_code == 200 and len(choices) == want and all(c.get("finish_reason") for c in choices):
                tally.completed += 1
            else:
                tally.lost.append(f"{kind}: status {r.status_code}, {len(choices)} of {want} choices")
            return
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.lost.append(f"{kind}: status {r.status_code}")
                return
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    tally.completed += 1
                    return
                if "error" in json.loads(line[6:]):
                    tally.lost.append(f"{kind}: error event {line[:200]}")
                    return
                events += 1
                if kind == "abort" and events == 3:  # leaving the block drops the connection mid-stream
                    tally.aborted += 1
                    return
            tally.lost.append(f"{kind}: stream ended without [DONE] after {events} events")
    except (httpx.HTTPError, ValueError) as e:
        tally.lost.append(f"{kind}: {type(e).__name__}: {e}")


async def traffic(url: str, args: argparse.Namespace, tally: Tally, stop_at: float) -> None:
    counter = itertools.count()
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s, limits=limits) as client:
        async def worker() -> None:
            while time.monotonic() < stop_at:
                i = next(counter)
                await one(client, KINDS[i % len(KINDS)], i, args, tally)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def sample(url: str, server: psutil.Process) -> dict:
    core = server.children(recursive=True)
    stats = httpx.get(f"{url}/debug/stats", timeout=10).json()
    eng = stats.get("engine", {})
    return {"t": round(time.monotonic(), 1), "server_rss_mb": round(server.memory_info().rss / 2**20, 1),
            "core_rss_mb": round(sum(p.memory_info().rss for p in core) / 2**20, 1),
            "server_fds": len(os.listdir(f"/proc/{server.pid}/fd")),
            "core_fds": sum(len(os.listdir(f"/proc/{p.pid}/fd")) for p in core),
            "kv_cache_usage": eng.get("kv_cache_usage"), "in_flight_seqs": stats.get("in_flight_seqs")}


async def sampler(url: str, server: psutil.Process, samples: list[dict], interval_s: float, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        samples.append(await asyncio.to_thread(sample, url, server))
        await asyncio.sleep(min(interval_s, max(0.0, stop_at - time.monotonic())))  # the sampling period


def kv_geometry(log: Path) -> tuple[int, int]:
    """(max_model_len, KV capacity in tokens) from the server's start-up line."""
    m = re.search(r"max_model_len (\d+), KV cache capacity (\d+) tokens", log.read_text(errors="replace"))
    if m is None:
        raise RuntimeError(f"no KV capacity line in {log}")
    return int(m.group(1)), int(m.group(2))


async def fill_kv_cache(url: str, capacity: int, max_model_len: int, args: argparse.Namespace) -> dict:
    """Write every KV block once before measuring. The cache's pages come from calloc and become resident on
    first write, and allocation takes never-used blocks first, so without this RSS climbs for as long as
    traffic reaches new blocks (a 2-minute tiny-model run grew 9% that way) and hides or fakes a leak.
    Unique random-id prompts (no prefix hits), one token out, until the prompts add up to the capacity."""
    rng = random.Random(0)
    length = max(16, min(max_model_len - 2, 1024))
    state = {"tokens": 0, "requests": 0, "failed": 0}
    deadline = time.monotonic() + args.fill_timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout_s) as client:
        async def worker() -> None:
            while state["tokens"] < capacity and time.monotonic() < deadline:
                ids = [rng.randrange(100, 400) for _ in range(length)]
                body = {"prompt": ids, "max_tokens": 1, **({"model": args.served_model} if args.served_model else {})}
                r = await client.post("/v1/completions", json=body)
                state["requests"] += 1
                if r.status_code == 200:
                    state["tokens"] += r.json()["usage"]["prompt_tokens"]
                else:
                    state["failed"] += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {**state, "capacity_tokens": capacity, "filled": state["tokens"] >= capacity}


def wait_idle(url: str, timeout_s: float = 120) -> dict:
    """Poll until nothing is in flight and every KV block is free (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(f"{url}/debug/stats", timeout=10).json()
        eng = stats.get("engine", {})
        if stats.get("in_flight_seqs") == 0 and eng.get("num_running") == 0 and eng.get("num_waiting") == 0 \
                and eng.get("num_blocks_free") == eng.get("num_blocks_total"):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def server_aborts(url: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tokenmill_request_success_total{") and 'finished_reason="abort"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def slope_mb_per_min(samples: list[dict]) -> float | None:
    """Least-squares slope of server + core RSS over `samples`: a leak keeps a slope, a warm-up flattens."""
    if len(samples) < 3:
        return None
    ts = [s["t"] / 60 for s in samples]
    ys = [s["server_rss_mb"] + s["core_rss_mb"] for s in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return round(sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den, 2) if den else None


def growth(a: float, b: float) -> float:
    return round(100.0 * (b - a) / a, 2) if a else 0.0


async def run(url: str, server: psutil.Process, args: argparse.Namespace) -> tuple[Tally, list[dict]]:
    tally, samples = Tally(), []
    stop_at = time.monotonic() + args.duration_s
    await asyncio.gather(traffic(url, args, tally, stop_at),
                         sampler(url, server, samples, args.sample_interval_s, stop_at))
    return tally, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or GGUF file (default: the server's default)")
    ap.add_argument("--tiny", action="store_true", help="build and serve a tiny random Llama instead")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--warmup-s", type=float, default=None, help="default: 40%% of the duration, at most 240 s")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sample-interval-s", type=float, default=5.0)
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--fill-timeout-s", type=float, default=600.0, help="bound on writing every KV block once")
    ap.add_argument("--kv-cache-memory", default=None, help="GiB (default 0.5; 0.05 with --tiny)")
    args = ap.parse_args()
    args.kv_cache_memory_set = args.kv_cache_memory is not None
    args.kv_cache_memory = args.kv_cache_memory or "0.5"
    warmup_s = args.warmup_s if args.warmup_s is not None else min(240.0, 0.4 * args.duration_s)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.fixtures.tiny_models import build_tiny_model

        model = str(build_tiny_model(tmp / "tiny-llama", "llama"))
    args.served_model = None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "tokenmill.cli", "serve", *([model] if model else []), "--port", str(port),
             "--kv-cache-memory", args.kv_cache_memory]
    if args.tiny:  # the tests' tiny-server settings (a 0.5 GiB cache would be 65k blocks for it)
        serve += ["--max-model-len", "512", "--dtype", "float32"]
        serve[serve.index("--kv-cache-memory") + 1] = args.kv_cache_memory if args.kv_cache_memory_set else "0.05"
    proc = start(serve, url, tmp / "serve.log")
    try:
        server = psutil.Process(proc.pid)
        max_model_len, capacity = kv_geometry(tmp / "serve.log")
        fill = asyncio.run(fill_kv_cache(url, capacity, max_model_len, args))
        aborts_before = server_aborts(url)
        tally, samples = asyncio.run(run(url, server, args))
        idle = wait_idle(url)
        end = sample(url, server)
        aborts = server_aborts(url) - aborts_before
    finally:
        stop(proc)
    t0 = samples[0]["t"] if samples else 0.0
    after_warmup = next((s for s in samples if s["t"] - t0 >= warmup_s), samples[-1] if samples else end)
    rss_warm = after_warmup["server_rss_mb"] + after_warmup["core_rss_mb"]
    rss_end = end["server_rss_mb"] + end["core_rss_mb"]
    out = {
        "command": " ".join(sys.argv), "model": model or "default", "duration_s": args.duration_s,
        "warmup_s": warmup_s, "concurrency": args.concurrency, "kv_fill": fill,
        "requests": {"sent": sum(tally.sent.values()), "by_kind": tally.sent, "completed": tally.completed,
                     "aborted": tally.aborted, "lost": len(tally.lost), "lost_examples": tally.lost[:5],
                     "server_counted_aborts": aborts},
        "rss_mb": {"after_warmup": round(rss_warm, 1), "end": round(rss_end, 1), "growth_pct": growth(rss_warm, rss_end),
                   "server_after_warmup": after_warmup["server_rss_mb"], "server_end": end["server_rss_mb"],
                   "core_after_warmup": after_warmup["core_rss_mb"], "core_end": end["core_rss_mb"],
                   "slope_after_warmup_mb_per_min": slope_mb_per_min([s for s in samples if s["t"] >= after_warmup["t"]]),
                   "slope_last_third_mb_per_min": slope_mb_per_min(samples[len(samples) * 2 // 3:])},
        "fds": {"server_after_warmup": after_warmup["server_fds"], "server_end": end["server_fds"],
                "core_after_warmup": after_warmup["core_fds"], "core_end": end["core_fds"]},
        "idle_end": {"kv_cache_usage": idle.get("engine", {}).get("kv_cache_usage"),
                     "blocks_free": idle.get("engine", {}).get("num_blocks_free"),
                     "blocks_total": idle.get("engine", {}).get("num_blocks_total"),
                     "in_flight_seqs": idle.get("in_flight_seqs")},
        "samples": samples,
    }
    out["targets_met"] = {"lost_is_0": out["requests"]["lost"] == 0,
                          "rss_growth_below_5pct": out["rss_mb"]["growth_pct"] < 5.0,
                          "kv_usage_idle_is_0": out["idle_end"]["kv_cache_usage"] == 0,
                          "fds_flat": end["server_fds"] <= after_warmup["server_fds"]
                          and end["core_fds"] <= after_warmup["core_fds"]}
    print(json.dumps(out, indent=2))
    return 0 if all(out["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
