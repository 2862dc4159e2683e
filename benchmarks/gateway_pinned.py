"""`benchmarks/gateway.py --mode pinned`: replicas that share one machine, each pinned to its own cores.

One run, interleaved per repeat: the same streaming load (a) straight to 1 replica that may use every core
and (b) through the gateway to N replicas, each started with `--cpu-cores` set to its own share of the cores
(the split the gateway's local actuator makes). All replicas are real `tokenmill serve` processes (the
default model unless --model) and stay up for the whole run; the idle side costs no CPU while the other is
measured. The figure is (b)'s throughput over (a)'s; the target on a 2-core machine is >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import time

import gateway as gw
import httpx
import psutil

from tokenmill.cpu_affinity import available_cores, format_cpu_list, plan_core_shares


def serve_cmd(args: argparse.Namespace, port: int, cores: tuple[int, ...] | None) -> list[str]:
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve"] + ([args.model] if args.model else [])
    cmd += ["--port", str(port), *shlex.split(args.serve_args)]
    return cmd + (["--cpu-cores", format_cpu_list(cores)] if cores else [])


def launch(cmd: list[str], port: int, started: list[subprocess.Popen]) -> tuple[str, subprocess.Popen]:
    """Start without waiting (replicas load in parallel); its own session so stop_all reaches its children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    started.append(proc)
    return f"http://127.0.0.1:{port}", proc


def engine_cores(url: str) -> str:
    """The cores the replica's engine core process may run on, as the kernel reports them."""
    pid = httpx.get(f"{url}/debug/stats", timeout=10).json()["core_pid"]
    return format_cpu_list(os.sched_getaffinity(pid))


def rss_gib(proc: subprocess.Popen) -> float:
    p = psutil.Process(proc.pid)
    return round(sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / (1 << 30), 2)


def pinned_scaling(args: argparse.Namespace) -> dict:
    cores = available_cores()
    n = args.replicas
    shares = [None] * n if args.no_pin else plan_core_shares(cores, n)
    started: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        single_port = gw.free_port()
        single = launch(serve_cmd(args, single_port, None), single_port, started)
        pair = []
        for share in shares:
            port = gw.free_port()
            pair.append(launch(serve_cmd(args, port, share), port, started))
        for url, proc in [single, *pair]:
            gw.wait_healthy(url, proc, timeout_s=900)
        load_s = time.monotonic() - t0
        gw_port = gw.free_port()
        gw_cmd = [sys.executable, "-m", "tokenmill.cli", "gateway", "--port", str(gw_port), "--log-level", "warning",
                  "--policy", "least-outstanding", "--max-concurrency", "256"]
        for url, _ in pair:
            gw_cmd += ["--replica", url]
        gw_url = gw.spawn(gw_cmd, gw_port, started)
        run = lambda url, k: asyncio.run(gw.load(url, k, args.concurrency, args.max_tokens))
        run(single[0], args.concurrency), run(gw_url, 2 * args.concurrency)  # warm-up: first-request paths
        one, many = [], []
        for _ in range(args.repeats):
            one.append(run(single[0], args.requests))
            many.append(run(gw_url, args.requests))
        out = {
            "mode": "pinned", "model": args.model or "default model", "serve_args": args.serve_args,
            "cores": format_cpu_list(cores), "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "repeats": args.repeats, "replicas_load_s": round(load_s, 1),
            "one_replica_direct": {"engine_cores": engine_cores(single[0]), "rss_gib": rss_gib(single[1]),
                                   "ttft_p50_ms": gw.med(one, "ttft_p50_ms"),
                                   "throughput_tok_s": gw.med(one, "throughput_tok_s"),
                                   "runs_tok_s": [round(r["throughput_tok_s"], 2) for r in one]},
            f"{n}_replicas_gateway": {"pinned": not args.no_pin,
                                      "engine_cores": [engine_cores(u) for u, _ in pair],
                                      "rss_gib": [rss_gib(p) for _, p in pair],
                                      "ttft_p50_ms": gw.med(many, "ttft_p50_ms"),
                                      "throughput_tok_s": gw.med(many, "throughput_tok_s"),
                                      "runs_tok_s": [round(r["throughput_tok_s"], 2) for r in many]},
        }
        ratio = out[f"{n}_replicas_gateway"]["throughput_tok_s"] / out["one_replica_direct"]["throughput_tok_s"]
        out["throughput_ratio"] = round(ratio, 3)
        out["target_met_ratio_ge_0.9"] = ratio >= 0.9
        out["load_avg_1m"] = round(psutil.getloadavg()[0], 2)
        out["note"] = ("client and gateway share the cores with the replicas; other work on the machine "
                       "(load_avg_1m) moves both sides alike, since they are interleaved")
        return out
    finally:
        gw.stop_all(started)
