"""Interactive TTFT while a large Batch-API job runs on the same `tokenmill serve`, vs with no batch; JSON.

One server (the default Gemma 3 270M GGUF unless --model), one run. Rounds alternate: interactive load
alone, then the same load while a batch runs (a fresh batch of --batch-lines lines, created with the
`openai` client and waited on until it is in_progress with its lines in flight, cancelled at the round's
end), so a drift in machine load hits both sides. The interactive load is --num-requests streaming
/v1/completions at concurrency --concurrency, prompts of --input-len random tokens (fresh per round, so
the prefix cache does not help either side), --max-tokens tokens each. The figure is TTFT p50 with the
batch over TTFT p50 without (target <= 1.5), with the batch's own throughput while the load ran.

    .venv/bin/python benchmarks/batch_interactive.py                                 # defaults
    .venv/bin/python benchmarks/batch_interactive.py --num-requests 12 --batch-max-tokens 32  # ~10 min, loaded 2 cores
    .venv/bin/python benchmarks/batch_interactive.py --max-batch-inflight-shared 32  # the shared cap off (= 32 lines)

The machine may be shared: the JSON carries the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.<name>
    from server_procs import free_port, start, stop
except ImportError:
    from benchmarks.server_procs import free_port, start, stop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1]) if len(values) > 1 else values[0]


async def one_ttft(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> float:
    """Seconds from sending a streaming completion to its first text chunk (the stream is read to its end)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    t0, ttft = time.perf_counter(), None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
    assert ttft is not None, "stream ended without text"
    return ttft


async def interactive_load(url: str, model: str, prompts: list[str], args) -> list[float]:
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def run(p: str) -> float:
            async with sem:
                return await one_ttft(client, model, p, args.max_tokens)
        return list(await asyncio.gather(*(run(p) for p in prompts)))


def in_flight(url: str) -> int:
    return httpx.get(f"{url}/debug/stats", timeout=10).json()["in_flight_seqs"]


def wait_for(pred, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def batch_file(oai, model: str, prompts: list[str], max_tokens: int, workdir: Path) -> str:
    path = workdir / "batch.jsonl"
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    with open(path, "rb") as f:
        return oai.files.create(file=f, purpose="batch").id


def with_batch_round(url: str, oai, file_id: str, model: str, prompts: list[str], args) -> dict:
    """Start a batch, wait until its lines fill the engine, run the load, then cancel the batch."""
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    wait_for(lambda: oai.batches.retrieve(batch.id).status == "in_progress", "batch in_progress")
    wait_for(lambda: in_flight(url) >= args.batch_fill, f"{args.batch_fill} batch lines in flight")
    done0, t0 = oai.batches.retrieve(batch.id).request_counts.completed, time.perf_counter()
    ttfts = asyncio.run(interactive_load(url, model, prompts, args))
    done1, elapsed = oai.batches.retrieve(batch.id).request_counts.completed, time.perf_counter() - t0
    oai.batches.cancel(batch.id)
    wait_for(lambda: oai.batches.retrieve(batch.id).status == "cancelled", "batch cancelled")
    wait_for(lambda: in_flight(url) == 0, "engine idle after cancel")
    assert done1 < args.batch_lines, "the batch finished during the round: raise --batch-lines"
    return {"ttfts": ttfts, "batch_lines_done": done1 - done0, "elapsed_s": elapsed}


def summary(ttfts: list[float]) -> dict:
    return {"ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p90_ms": round(1000 * percentile(ttfts, 90), 1), "num_requests": len(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the packaged Gemma 3 270M GGUF")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of (no batch, with batch) rounds")
    ap.add_argument("--num-requests", type=int, default=24, help="interactive requests per round")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-lines", type=int, default=300)
    ap.add_argument("--batch-input-len", type=int, default=64)
    ap.add_argument("--batch-max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batch-inflight", type=int, default=None, help="default: the server's (max_num_seqs/2)")
    ap.add_argument("--max-batch-inflight-shared", type=int, default=None, help="default: the server's")
    ap.add_argument("--kv-cache-memory", type=float, default=0.5)
    args = ap.parse_args()

    from openai import OpenAI

    from tokenmill.bench.datasets import load_tokenizer, sample_random
    from tokenmill.config import BatchConfig
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME, default_model_path

    model_path = args.model or str(default_model_path())
    model = args.model or DEFAULT_MODEL_NAME
    tokenizer = load_tokenizer(model_path)
    args.batch_fill = args.max_batch_inflight or args.max_num_seqs // 2

    def prompts(n: int, input_len: int, seed: int) -> list[str]:
        return [r.prompt for r in sample_random(tokenizer, n, input_len, 1, 0.0, seed)]

    load_before = os.getloadavg()[0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--kv-cache-memory", str(args.kv_cache_memory), "--max-num-seqs", str(args.max_num_seqs),
                 "--batch-dir", f"{tmp}/batches"]
        if args.max_batch_inflight:
            flags += ["--max-batch-inflight", str(args.max_batch_inflight)]
        if args.max_batch_inflight_shared:
            flags += ["--max-batch-inflight-shared", str(args.max_batch_inflight_shared)]
        cmd = [str(ROOT / ".venv/bin/tokenmill"), "serve", model_path, "--served-model-name", model,
               "--port", str(port), *flags]
        proc = start(cmd, url, Path(tmp) / "server.log")
        try:
            oai = OpenAI(base_url=f"{url}/v1", api_key="none")
            file_id = batch_file(oai, model, prompts(args.batch_lines, args.batch_input_len, 10_000),
                                 args.batch_max_tokens, Path(tmp))
            asyncio.run(interactive_load(url, model, prompts(4, args.input_len, 9_999), args))  # warm-up
            alone: list[float] = []
            shared: list[float] = []
            rounds, batch_tok_s = [], []
            for r in range(args.rounds):
                a = asyncio.run(interactive_load(url, model, prompts(args.num_requests, args.input_len, 2 * r), args))
                b = with_batch_round(url, oai, file_id, model, prompts(args.num_requests, args.input_len, 2 * r + 1),
                                     args)
                alone += a
                shared += b["ttfts"]
                batch_tok_s.append(b["batch_lines_done"] * args.batch_max_tokens / b["elapsed_s"])
                rounds.append({"no_batch_ttft_p50_ms": round(1000 * statistics.median(a), 1),
                               "with_batch_ttft_p50_ms": round(1000 * statistics.median(b["ttfts"]), 1),
                               "ratio": round(statistics.median(b["ttfts"]) / statistics.median(a), 3),
                               "batch_lines_done": b["batch_lines_done"],
                               "batch_tokens_per_s": round(batch_tok_s[-1], 1)})
        finally:
            stop(proc)
    print(json.dumps({
        "model": model, "server_flags": flags[:4] + flags[6:], "concurrency": args.concurrency,
        "input_len": args.input_len, "max_tokens": args.max_tokens, "batch_lines": args.batch_lines,
        "batch_input_len": args.batch_input_len, "batch_max_tokens": args.batch_max_tokens,
        "batch_in_flight_before_load": args.batch_fill,
        "max_batch_inflight_shared": args.max_batch_inflight_shared or BatchConfig().max_inflight_shared,
        "no_batch": summary(alone), "with_batch": summary(shared),
        "ratio_ttft_p50": round(statistics.median(shared) / statistics.median(alone), 3), "target_ratio": 1.5,
        "batch_tokens_per_s_during_load": round(statistics.mean(batch_tok_s), 1), "rounds": rounds,
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
