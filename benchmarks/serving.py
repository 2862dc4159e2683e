"""Serving vs offline throughput, in one run, on the same model, workload and engine settings.

  offline: tokenmill.LLM(...).generate(all prompts)       (no HTTP, no process hop)
  serving: `tokenmill serve` in a subprocess, N streaming /v1/completions requests from the bench client
           (tokenmill.bench.client.send_request, timed like `vllm bench serve`) at each concurrency.

Workload: --num-prompts prompts of --input-len random token ids (seeded; sent as token ids so both sides
see identical prompts), --output-len tokens each, greedy, ignore_eos. Prints one JSON object: output
tokens/s of each run and serving / offline ratios (target: >= 0.9 at concurrency 64).

    .venv/bin/python benchmarks/serving.py                 # the default model (Gemma 3 270M GGUF)
    .venv/bin/python benchmarks/serving.py --model DIR     # any model folder / .gguf
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = min(300, vocab_size // 4), vocab_size - 1  # skip the special / control tokens at the start
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


def run_offline(model: str | None, engine_args: dict, args: argparse.Namespace) -> tuple[dict, list[list[int]]]:
    import tokenmill

    llm = tokenmill.LLM(model, **engine_args)
    prompts = make_prompts(llm.loaded.vocab_size, args.num_prompts, args.input_len, args.seed)
    output_len = args.output_len
    params = tokenmill.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], tokenmill.SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"duration_s": round(dt, 3), "output_tokens": tokens, "output_tok_s": round(tokens / dt, 2)}, prompts


def start_server(model: str | None, flags: list[str], port: int, log_path: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "tokenmill.cli", "serve"] + ([model] if model else []) + [
        "--port", str(port), "--served-model-name", "bench", *flags]
    proc = subprocess.Popen(args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not become healthy")


async def run_serving(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    from tokenmill.bench.client import send_request

    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, ids: list[int]):
        payload = {"model": "bench", "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
        async with sem:
            return await send_request(client, url + "/v1/completions", payload, len(ids))

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        await one(client, prompts[0][:8])  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, p) for p in prompts))
        dt = time.perf_counter() - t0
    failed = [r.error for r in results if not r.success]
    tokens = sum(r.output_tokens for r in results)
    ttfts = sorted(r.ttft for r in results if r.success)
    itls = sorted(x for r in results for x in r.itl)
    return {
        "concurrency": concurrency, "duration_s": round(dt, 3), "output_tokens": tokens,
        "output_tok_s": round(tokens / dt, 2), "failed": len(failed), "first_error": failed[0] if failed else None,
        "median_ttft_s": round(ttfts[len(ttfts) // 2], 4) if ttfts else None,
        "median_itl_s": round(itls[len(itls) // 2], 4) if itls else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder / .gguf (default: the packaged default model)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-memory", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine_args = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       kv_cache_memory=args.kv_cache_memory)
    offline, prompts = run_offline(args.model, engine_args, args)
    print(json.dumps({"offline": offline}), file=sys.stderr, flush=True)  # progress, in case of a long run

    port = free_port()
    log_path = Path(f"/tmp/tokenmill-bench-serving-{port}.log")
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
             "--kv-cache-memory", str(args.kv_cache_memory)]
    proc = start_server(args.model, flags, port, log_path)
    serving = []
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            run = asyncio.run(run_serving(f"http://127.0.0.1:{port}", prompts, args.output_len, c))
            run["ratio_vs_offline"] = round(run["output_tok_s"] / offline["output_tok_s"], 3)
            serving.append(run)
            print(json.dumps({"serving": run}), file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(json.dumps({
        "benchmark": "serving_vs_offline",
        "model": args.model or "default (gemma3-270m Q4_K_M GGUF)",
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "greedy": True, "ignore_eos": True},
        "engine": engine_args,
        "cpu_count": os.cpu_count(),
        "offline": offline,
        "serving": serving,
        "target": "serving output_tok_s >= 0.9 x offline at concurrency 64",
    }, indent=2))


if __name__ == "__main__":
    main()
