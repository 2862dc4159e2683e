"""Serving vs offline throughput, in one run, on the same model, workload and engine settings.

  offline: tokenmill.LLM(...).generate(all prompts)       (no HTTP, no process hop; the batch is as wide as
           max_num_seqs allows), and per concurrency C the same engine driven closed-loop with at most C
           requests in flight (a new one is added the step after one finishes): what a client at
           concurrency C could get without HTTP, the like-for-like baseline.
  serving: `tokenmill serve` in a subprocess, N streaming /v1/completions requests from the bench client
           (tokenmill.bench.client.send_request, timed like `vllm bench serve`) at each concurrency.

Workload: --num-prompts prompts of --input-len random token ids (seeded; sent as token ids), --output-len
tokens each, greedy, ignore_eos. Every run gets its own prompt set, and offline and serving at the same
concurrency get the same one; each engine sees a set once, so no run is served from the prefix cache
that an earlier run filled. Offline and serving at one concurrency run back to back (and --rounds
repeats the lot), so the ratio of a pair holds when the machine is shared. Prints one JSON object: output
tokens/s of each run, the ratios serving / offline-all-at-once and serving / offline-at-the-same-
concurrency, and their medians over the rounds (target: >= 0.9).

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
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from tokenmill import LLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(vocab_size: int, num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = min(300, vocab_size // 4), vocab_size - 1  # skip the special / control tokens at the start
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


def load_offline(model: str | None, engine_args: dict) -> LLM:
    import tokenmill

    llm = tokenmill.LLM(model, **engine_args)
    warm = make_prompts(llm.loaded.vocab_size, 1, 8, seed=-1)[0]
    llm.generate([{"prompt_token_ids": warm}], tokenmill.SamplingParams(max_tokens=4, ignore_eos=True))
    return llm


def run_offline(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    """All prompts in one generate() call: the batch is as wide as max_num_seqs allows."""
    import tokenmill

    params = tokenmill.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"duration_s": round(dt, 3), "output_tokens": tokens, "output_tok_s": round(tokens / dt, 2)}


def run_offline_closed_loop(llm: LLM, prompts: list[list[int]], output_len: int,
                            concurrency: int) -> dict:
    """The offline engine with at most `concurrency` requests in flight, as a closed-loop client keeps
    them: a finished request is replaced before the next step. Output is detokenized as in generate()."""
    import tokenmill
    from tokenmill.engine.output_processor import RequestState
    from tokenmill.engine.request import EngineCoreRequest

    engine, tok = llm.engine, llm.get_tokenizer()
    params = tokenmill.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    eos = list(llm.loaded.eos_token_ids)
    pending = list(enumerate(prompts))[::-1]
    states: dict[str, RequestState] = {}
    tokens = 0
    t0 = time.perf_counter()
    # Bounded: every step computes at least one token of some in-flight request.
    max_steps = len(prompts) * (output_len + max(len(p) for p in prompts)) + 16
    for _ in range(max_steps):
        while pending and len(states) < concurrency:
            i, ids = pending.pop()
            rid = f"bench-{concurrency}-{i}"
            states[rid] = RequestState(rid, None, ids, params, tok)
            engine.add_request(EngineCoreRequest(rid, ids, params, eos_token_ids=eos))
        if not states:
            break
        for d in engine.step():
            st = states.get(d.request_id)
            if st is None:
                continue
            st.process(d)
            tokens += len(d.new_token_ids)
            if st.finished:
                del states[d.request_id]
    else:
        raise RuntimeError("offline closed loop did not finish")
    dt = time.perf_counter() - t0
    return {"concurrency": concurrency, "duration_s": round(dt, 3), "output_tokens": tokens,
            "output_tok_s": round(tokens / dt, 2)}


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


async def run_serving(url: str, prompts: list[list[int]], output_len: int, concurrency: int,
                      warm_prompt: list[int]) -> dict:
    from tokenmill.bench.client import send_request

    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, ids: list[int]):
        payload = {"model": "bench", "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
        async with sem:
            return await send_request(client, url + "/v1/completions", payload, len(ids))

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        await one(client, warm_prompt)  # warm-up (not from `prompts`: it must not fill their prefix cache)
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
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat offline and serving, interleaved; the summary gives median ratios")
    args = ap.parse_args()

    engine_args = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       kv_cache_memory=args.kv_cache_memory)
    levels = [int(x) for x in args.concurrency.split(",")]
    llm = load_offline(args.model, engine_args)
    vocab_size = llm.loaded.vocab_size
    warm = make_prompts(vocab_size, 1, 8, seed=-1)[0]
    seeds = iter(range(args.seed, args.seed + args.rounds * (len(levels) + 1)))

    def fresh_prompts() -> list[list[int]]:
        # One prompt set per run: no run reads K/V an earlier run left in a prefix cache.
        return make_prompts(vocab_size, args.num_prompts, args.input_len, next(seeds))

    def progress(key: str, value: dict) -> None:  # in case of a long run
        print(json.dumps({key: value}), file=sys.stderr, flush=True)

    port = free_port()
    log_path = Path(f"/tmp/tokenmill-bench-serving-{port}.log")
    flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
             "--kv-cache-memory", str(args.kv_cache_memory)]
    proc = start_server(args.model, flags, port, log_path)
    offline, offline_at, serving = [], [], []
    try:
        for r in range(args.rounds):
            all_at_once = run_offline(llm, fresh_prompts(), args.output_len) | {"round": r}
            offline.append(all_at_once)
            progress("offline", all_at_once)
            for c in levels:
                prompts = fresh_prompts()
                base = run_offline_closed_loop(llm, prompts, args.output_len, c) | {"round": r}
                offline_at.append(base)
                progress("offline_closed_loop", base)
                run = asyncio.run(run_serving(f"http://127.0.0.1:{port}", prompts, args.output_len, c, warm))
                run["round"] = r
                run["ratio_vs_offline"] = round(run["output_tok_s"] / all_at_once["output_tok_s"], 3)
                run["ratio_vs_offline_same_concurrency"] = round(run["output_tok_s"] / base["output_tok_s"], 3)
                serving.append(run)
                progress("serving", run)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    del llm
    gc.collect()
    summary = {}
    for c in levels:
        runs = [x for x in serving if x["concurrency"] == c]
        summary[f"concurrency_{c}"] = {
            "median_ratio_vs_offline": round(statistics.median(x["ratio_vs_offline"] for x in runs), 3),
            "median_ratio_vs_offline_same_concurrency":
                round(statistics.median(x["ratio_vs_offline_same_concurrency"] for x in runs), 3),
        }
    print(json.dumps({
        "benchmark": "serving_vs_offline",
        "model": args.model or "default (gemma3-270m Q4_K_M GGUF)",
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "greedy": True, "ignore_eos": True},
        "engine": engine_args,
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "offline": offline,
        "offline_closed_loop": offline_at,
        "serving": serving,
        "summary": summary,
        "target": "serving output_tok_s >= 0.9 x offline at concurrency 16 and 64",
    }, indent=2))


if __name__ == "__main__":
    main()
