"""HTTP serving on one GGUF file, 2 threads: tokenmill quantized blocks vs tokenmill dequantized vs llama.cpp.

Servers, started one at a time on a free 127.0.0.1 port, benchmarked, then stopped (SIGTERM, then SIGKILL,
by the PID this script started):
  auto   `tokenmill serve GGUF --quantization auto --dtype float32`  (Q4_K/Q5_0/Q6_K/Q8_0 blocks, native kernels)
  none   `tokenmill serve GGUF --quantization none --dtype float32`  (every tensor dequantized to float32)
  llama  `llama-server -m GGUF -t 2 --parallel P -c C --alias NAME`  (skipped, with a note, when missing)
tokenmill uses os.cpu_count() threads (2 on this box; `serve` has no thread flag); llama-server gets `-t THREADS`
(--threads, default 2). Run it on an otherwise idle machine: on a loaded 2-core box the figures are noise.

Workload (the same for every server): the `random` dataset of tokenmill's bench client
(tokenmill.bench.datasets) with the GGUF's own tokenizer, so every prompt is exactly --input-len tokens as
the server sees them (BOS included); --output-len tokens per request (max_tokens + ignore_eos, checked in
the output). For each --concurrency level its own prompt set (so no level reuses K/V another one cached),
sent closed-loop with at most C requests in flight, as `tokenmill bench serve --max-concurrency C
--ignore-eos` does (tokenmill.bench.runner.run_benchmark; streaming /v1/completions, timed like `vllm bench
serve`). Before each timed run an untimed warm-up at the same concurrency: --warmup-requests requests
(default: C) of 16 output tokens on prompts of their own (not the timed ones, so none of those is served
from a prefix cache).

Prints one JSON object: per server and concurrency: output tok/s, TPOT p50, TTFT p50 (and ITL p50, E2E p50,
p90s), failures; then per concurrency the ratios auto/llama and auto/none (throughput: > 1 is faster; TPOT
and TTFT: < 1 is faster), all from this one run. A timed run with failed requests (seen once with
llama-server on an overloaded box: "Server disconnected without sending a response" on a reused
keep-alive connection) is kept in the JSON and rerun (--rerun-failed) on a fresh prompt set; ratios use
only runs without failures. Progress and server log paths go to stderr.

    .venv/bin/python benchmarks/quantized_serving.py                  # 1 x 8 and 8 x 32 requests, 128 in / 128 out
    .venv/bin/python benchmarks/quantized_serving.py --model FILE.gguf --llama-server /path/to/llama-server
    .venv/bin/python benchmarks/quantized_serving.py --concurrency 1,2 --num-prompts 2,2 --input-len 16 \
        --output-len 8                                                # smoke run (~2 min, mostly server starts)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.serving import free_port

LLAMA_SERVER = "/tmp/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
SERVED_NAME = "bench"


def log(msg: str) -> None:
    print(f"[quantized_serving] {msg}", file=sys.stderr, flush=True)


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float) -> dict:
    """Poll /health until 200 (llama-server answers 503 while loading), then return GET /v1/models."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log_path}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server on port {port} not healthy after {timeout_s:.0f}s; log {log_path}")


def stop(proc: subprocess.Popen, name: str) -> None:
    """Stop one server this script started, by its PID: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    log(f"{name}: stopping pid {proc.pid}")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


async def run_level(base_url: str, warm, timed, concurrency: int, args) -> dict:
    from tokenmill.bench.metrics import summary_keys
    from tokenmill.bench.runner import RunConfig, run_benchmark

    def config() -> RunConfig:
        return RunConfig(base_url=base_url, model=SERVED_NAME, max_concurrency=concurrency, num_warmups=0,
                         max_duration_s=args.max_duration, request_timeout_s=args.request_timeout,
                         ignore_eos=True, seed=args.seed, percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                         percentiles=[50.0, 90.0], show_progress=False)

    if warm:
        w = await run_benchmark(config(), warm, None)
        if w["failed"]:
            raise RuntimeError(f"warm-up failed: {next(e for e in w['errors'] if e)}")
    r = await run_benchmark(config(), timed, None)
    s = summary_keys(r)
    out_lens = sorted(set(r["output_lens"]))
    return {
        "concurrency": concurrency, "requests": len(timed), "completed": s["completed"], "failed": s["failed"],
        "first_error": next((e for e in r["errors"] if e), None),
        "output_lens": out_lens, "input_lens": sorted(set(r["input_lens"])),
        "duration_s": round(s["duration"], 3),
        "output_tok_s": round(s["output_throughput"], 2),
        "tpot_p50_ms": round(s["median_tpot_ms"], 2), "tpot_p90_ms": round(s["p90_tpot_ms"], 2),
        "ttft_p50_ms": round(s["median_ttft_ms"], 1), "ttft_p90_ms": round(s["p90_ttft_ms"], 1),
        "itl_p50_ms": round(s["median_itl_ms"], 2), "e2el_p50_ms": round(s["median_e2el_ms"], 1),
        "max_concurrent_requests": s["max_concurrent_requests"],
    }


def ratios(a: dict, b: dict) -> dict:
    def div(x: float, y: float) -> float | None:
        return round(x / y, 3) if y else None

    return {"output_tok_s": div(a["output_tok_s"], b["output_tok_s"]),
            "tpot_p50": div(a["tpot_p50_ms"], b["tpot_p50_ms"]),
            "ttft_p50": div(a["ttft_p50_ms"], b["ttft_p50_ms"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file; default: the packaged Gemma 3 270M Q4_K_M")
    ap.add_argument("--servers", default="auto,none,llama", help="comma list of auto, none, llama, in run order")
    ap.add_argument("--llama-server", default=LLAMA_SERVER, help="llama-server binary (skipped when missing)")
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t (tokenmill uses os.cpu_count())")
    ap.add_argument("--llama-parallel", type=int, default=8, help="llama-server --parallel slots")
    ap.add_argument("--llama-ctx", type=int, default=8192, help="llama-server -c (shared by the slots)")
    ap.add_argument("--concurrency", default="1,8", help="comma list of max in-flight requests")
    ap.add_argument("--num-prompts", default="8,32", help="comma list: timed requests per concurrency level")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens, BOS included")
    ap.add_argument("--output-len", type=int, default=128, help="max_tokens, with ignore_eos")
    ap.add_argument("--warmup-requests", type=int, default=-1,
                    help="untimed requests (16 output tokens) before each timed run; -1: as many as the concurrency")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="tokenmill serve --max-num-seqs")
    ap.add_argument("--max-model-len", type=int, default=1024, help="tokenmill serve --max-model-len")
    ap.add_argument("--kv-cache-memory", type=float, default=1.0, help="tokenmill serve --kv-cache-memory (GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerun-failed", type=int, default=1,
                    help="rerun a level whose timed run had failed requests, up to N times, on a fresh prompt set "
                         "of the same lengths (the failed attempt stays in the JSON)")
    ap.add_argument("--max-duration", type=float, default=900.0, help="bound of one timed run (s)")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--log-dir", default="/tmp", help="server logs go to LOG_DIR/quantized-serving-NAME-PORT.log")
    args = ap.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally blocks stop the servers started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    levels = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.num_prompts.split(",")]
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels) or min(levels + counts) < 1:
        ap.error("--num-prompts: one positive count, or one per --concurrency level")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or set(servers) - {"auto", "none", "llama"}:
        ap.error("--servers: a comma list of auto, none, llama")
    if args.input_len + args.output_len > min(args.max_model_len, args.llama_ctx // args.llama_parallel):
        ap.error("--input-len + --output-len exceeds --max-model-len or --llama-ctx / --llama-parallel")

    from tokenmill.bench.datasets import build_workload, load_tokenizer
    from tokenmill.model.default_model import default_model_path

    model = str(Path(args.model or default_model_path()).resolve())
    log(f"model {model}; building the workload with its tokenizer")
    tok = load_tokenizer(model)

    def workload(n: int, seed: int, output_len: int):
        return build_workload("random", tokenizer=tok, num_prompts=n, dataset_path=None, input_len=args.input_len,
                              output_len=output_len, range_ratio=0.0, seed=seed)

    # One prompt set per level, and one per level for its warm-up (distinct seeds): no timed prompt is in any
    # prefix cache. Every server gets the same sets.
    timed = {c: workload(n, args.seed + i, args.output_len) for i, (c, n) in enumerate(zip(levels, counts))}
    reruns: dict[tuple[int, int], list] = {}  # (level, attempt) -> prompt set, built on first need

    def timed_set(i: int, c: int, attempt: int) -> list:
        if attempt == 0:
            return timed[c]
        if (c, attempt) not in reruns:  # the same rerun set for every server that needs it
            reruns[c, attempt] = workload(counts[i], args.seed + 100 * attempt + i, args.output_len)
        return reruns[c, attempt]
    warm = {}
    for i, c in enumerate(levels):
        n = c if args.warmup_requests < 0 else args.warmup_requests
        warm[c] = workload(n, args.seed + 1000 + i, min(16, args.output_len)) if n else []

    tokenmill_flags = ["--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs), "--max-model-len",
                       str(args.max_model_len), "--kv-cache-memory", str(args.kv_cache_memory)]
    report: dict = {
        "benchmark": "quantized_serving", "model": model, "cpu_count": os.cpu_count(),
        "workload": {"dataset": "random (tokenmill.bench.datasets, GGUF tokenizer)", "input_len": args.input_len,
                     "output_len": args.output_len, "ignore_eos": True, "endpoint": "/v1/completions (stream)",
                     "levels": [{"concurrency": c, "requests": n} for c, n in zip(levels, counts)],
                     "warmup_requests": {str(c): len(w) for c, w in warm.items()}, "seed": args.seed},
        "servers": {}, "notes": [],
    }
    for name in servers:
        port = free_port()
        if name == "llama":
            binary = Path(args.llama_server)
            if not (binary.is_file() and os.access(binary, os.X_OK)):
                note = f"llama: skipped, no executable llama-server at {binary}"
                log(note)
                report["notes"].append(note)
                continue
            argv = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
                    "--parallel", str(args.llama_parallel), "-c", str(args.llama_ctx), "--alias", SERVED_NAME]
        else:
            argv = [sys.executable, "-m", "tokenmill.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
                    "--served-model-name", SERVED_NAME, "--quantization", name, *tokenmill_flags]
        log_path = Path(args.log_dir) / f"quantized-serving-{name}-{port}.log"
        log(f"{name}: starting `{shlex.join(argv)}` (log {log_path})")
        entry: dict = {"command": shlex.join(argv), "log": str(log_path), "runs": []}
        report["servers"][name] = entry
        proc = None
        try:
            with open(log_path, "wb") as fh:
                t0 = time.perf_counter()
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            models = wait_ready(proc, port, log_path, args.startup_timeout)
            entry["startup_s"] = round(time.perf_counter() - t0, 1)
            meta = (models.get("data") or [{}])[0].get("metadata")
            if meta:
                entry["precision"] = {k: meta.get(k) for k in ("dtype", "quantization", "kv_cache_dtype")}
            log(f"{name}: ready in {entry['startup_s']}s {entry.get('precision', '')}")
            for i, c in enumerate(levels):
                for attempt in range(1 + max(args.rerun_failed, 0)):
                    run = asyncio.run(run_level(f"http://127.0.0.1:{port}", warm[c], timed_set(i, c, attempt), c, args))
                    run["attempt"] = attempt
                    entry["runs"].append(run)
                    log(f"{name}: {json.dumps(run)}")
                    if not run["failed"]:
                        break
                    note = f"{name} c={c} attempt {attempt}: {run['failed']} failed ({run['first_error']})"
                    log(note)
                    report["notes"].append(note)
        except (RuntimeError, TimeoutError, OSError, ValueError, httpx.HTTPError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            log(f"{name}: {entry['error']}")
        finally:
            if proc is not None:
                stop(proc, name)

    def run_of(name: str, c: int) -> dict | None:
        """The first attempt at level c without failures (ratios use only complete runs)."""
        runs = report["servers"].get(name, {}).get("runs", [])
        return next((r for r in runs if r["concurrency"] == c and not r["failed"]), None)

    summary = {}
    for c in levels:
        row: dict = {}
        for name in servers:
            r = run_of(name, c)
            if r:
                row[name] = {k: r[k] for k in ("output_tok_s", "tpot_p50_ms", "ttft_p50_ms", "attempt")}
        auto = run_of("auto", c)
        for other in ("llama", "none"):
            if auto and run_of(other, c):
                row[f"auto/{other}"] = ratios(auto, run_of(other, c))
        summary[f"concurrency_{c}"] = row
    report["summary"] = summary
    report["ratio_meaning"] = "auto/X: output_tok_s > 1 means auto is faster; tpot_p50 and ttft_p50 < 1 mean faster"
    for name, entry in report["servers"].items():
        for r in entry["runs"]:
            if not r["failed"] and r["output_lens"] != [args.output_len]:
                report["notes"].append(f"{name} c={r['concurrency']}: output lengths {r['output_lens']}, "
                                       f"not all {args.output_len}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
