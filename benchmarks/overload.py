"""Overload: a burst of 10x what a replica can hold, (a) straight at `tokenmill serve` and (b) through the
gateway and its admission queue. Prints JSON: how many were admitted and refused, whether every admitted
request completed and every refused one carried Retry-After, and the admitted requests' TTFT.

    .venv/bin/python benchmarks/overload.py                         # the default model (Gemma 3 270M)
    .venv/bin/python benchmarks/overload.py --model tests/...tiny   # any model folder or GGUF file

The replica holds --max-num-seqs running + --max-queued-requests waiting sequences; the burst is
--burst-factor times that, all sent at once as streams with --max-tokens tokens each. Through the
gateway the pool's max_concurrency is --max-num-seqs (the replica then never queues) and the gateway's
queue holds --gateway-queue requests for at most --max-wait-s seconds (then 503 queue_timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

try:  # run as a script (benchmarks/ on sys.path) or imported by a test as benchmarks.<name>
    from server_procs import free_port, start, stop
except ImportError:
    from benchmarks.server_procs import free_port, start, stop

ROOT = Path(__file__).resolve().parents[1]


@dataclass(slots=True)
class Outcome:
    status: int
    retry_after: str | None
    code: str | None  # the error code of a refusal
    ttft_s: float | None  # to the first token event; admitted streams only
    num_tokens: int  # completion_tokens of the final usage chunk
    completed: bool  # an admitted stream that ended with data: [DONE] and no error event


async def one(client: httpx.AsyncClient, path: str, body: dict) -> Outcome:
    start = time.monotonic()
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raw = await r.aread()
            try:
                code = json.loads(raw)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
            return Outcome(r.status_code, r.headers.get("retry-after"), code, None, 0, False)
        ttft, n, done, failed = None, 0, False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                failed = True
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            if ttft is None and ev.get("choices"):
                ttft = time.monotonic() - start
        return Outcome(200, None, None, ttft, n, done and not failed)


async def burst(url: str, num_requests: int, max_tokens: int, timeout_s: float, model: str | None = None) -> list:
    """All requests at once; each bounded by timeout_s (a hang is an exception, never a stuck run)."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, **({"model": model} if model else {})}
    limits = httpx.Limits(max_connections=num_requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one(client, "/v1/completions", body)
                                                       for _ in range(num_requests))), timeout_s)


def summarize(outcomes: list[Outcome], max_tokens: int) -> dict:
    admitted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    ttfts = sorted(o.ttft_s for o in admitted if o.ttft_s is not None)

    def pct(q: float) -> float | None:
        return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 3) if ttfts else None

    return {"requests": len(outcomes), "admitted": len(admitted),
            "refused_429": sum(o.status == 429 for o in refused),
            "refused_503": sum(o.status == 503 for o in refused),
            "other_status": sorted({o.status for o in refused} - {429, 503}),
            "admitted_all_completed": all(o.completed and o.num_tokens == max_tokens for o in admitted),
            "refused_all_with_retry_after": all(o.retry_after is not None for o in refused),
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99), "ttft_max_s": ttfts[-1] if ttfts else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or GGUF file (default: the server's default)")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--max-queued-requests", type=int, default=4)
    ap.add_argument("--burst-factor", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--gateway-queue", type=int, default=4)
    ap.add_argument("--max-wait-s", type=float, default=30.0)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound on the whole burst")
    ap.add_argument("--kv-cache-memory", default="0.5")
    args = ap.parse_args()
    holds = args.max_num_seqs + args.max_queued_requests
    n = args.burst_factor * holds
    port, gw_port = free_port(), free_port()
    url, gw_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}"
    serve = [sys.executable, "-m", "tokenmill.cli", "serve", *([args.model] if args.model else []),
             "--port", str(port), "--max-num-seqs", str(args.max_num_seqs), "--max-queued-requests",
             str(args.max_queued_requests), "--kv-cache-memory", args.kv_cache_memory]
    tmp = Path(tempfile.mkdtemp(prefix="overload-"))
    cfg = tmp / "gateway.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "port": gw_port, "pools": [{"name": "p", "replicas": [url], "max_concurrency": args.max_num_seqs}],
        "queue": {"max_size": args.gateway_queue, "max_wait_s": args.max_wait_s}}))
    gateway = [sys.executable, "-m", "tokenmill.cli", "gateway", "--config", str(cfg)]
    out: dict = {"command": " ".join(sys.argv), "replica_holds": holds, "burst": n, "max_tokens": args.max_tokens,
                 "flags": vars(args)}
    server = start(serve, url, tmp / "serve.log")
    try:
        asyncio.run(burst(url, 2, 2, args.timeout_s))  # warm-up
        t = time.monotonic()
        out["server_alone"] = summarize(asyncio.run(burst(url, n, args.max_tokens, args.timeout_s)), args.max_tokens)
        out["server_alone"]["wall_s"] = round(time.monotonic() - t, 2)
        gw = start(gateway, gw_url, tmp / "gateway.log", 60)
        try:
            t = time.monotonic()
            res = summarize(asyncio.run(burst(gw_url, n, args.max_tokens, args.timeout_s)), args.max_tokens)
            out["through_gateway"] = {**res, "wall_s": round(time.monotonic() - t, 2)}
        finally:
            stop(gw)
    finally:
        stop(server)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
