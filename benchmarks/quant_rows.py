"""What a few extra activation rows cost the 8-bit quantized product (speculative decoding verifies 1 + k rows
per sequence in one step), old kernel against new, on the default model's real tensors.

Builds two copies of csrc/quant_gemm.cpp with cpu_kernels.py's flags for the widest variant this CPU runs: the
committed one (`git show HEAD:...`, or --old FILE) and the working tree's (or --new FILE). For the LM head
(token_embd, Q8_0 262144 x 640) and one layer's linears (qkv / o / gate_up / down, fused as the model runs
them), at 1 and 2 threads and each row count: the median time of the int8 product, old and new repetitions
interleaved (the machine is shared and noisy), and each one relative to its own 1-row time. `crossover`: the
new int8 product against the float32 panels (quant_gemm_panels) above 16 rows over one layer's linears as the
model holds them (Q8_0 / Q5_0 rows interleaved by 8), for layers/quantized.py's INT8_MAX_ROWS; `head_crossover`
the same for the LM head with rows interleaved by 8 (INT8_MAX_ROWS) and for a random plain Q6_K head
(PLAIN_HEAD_INT8_MAX_ROWS). `--panels` compares old and new on the panel product instead. The
`lm_head.x8` workload runs the new source over the interleaved LM head (the layout the model uses) against the old
source over the plain one. Prints JSON.

    .venv/bin/python benchmarks/quant_rows.py [--reps 9] [--threads 1,2] [--rows 1,2,4,5,8,9,16]
        [--old FILE --old-headers DIR] [--new FILE [--new-headers DIR]] [--workloads lm_head,layer.o] [--cold]
        [--panels]   # old vs new on the panel product instead (prefill: --rows 256,2048 --threads 2)

Each source builds in its own folder against its own headers (--old-headers: default git HEAD's, or the working
tree's csrc with --old; --new-headers: default --new's folder when it holds quant_blocks.h, else the working
tree's csrc), so a change to quant_blocks.h or quant_dot.h is compared too. The layer's weights (~4 MB) stay in cache across repetitions, so its figures are
compute-bound; the LM head (~180 MB) streams from memory every call, as every weight does in a real decode
step. --cold evicts the caches before every call (a 128 MB write), so the layers' weights come from memory too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tokenmill.kernels.cpu_features import host_cpu_features
from tokenmill.kernels.cpu_kernels import _FLAGS, variants_for
from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.kernels.quant_kernels import QuantKernels
from tokenmill.model.default_model import default_model_path
from tokenmill.model.gguf_reader import read_gguf

CSRC = Path(__file__).resolve().parents[1] / "src" / "tokenmill" / "kernels" / "csrc"
SOURCE = "src/tokenmill/kernels/csrc/quant_gemm.cpp"
# name -> fused parts (tensor names, stacked along the output rows), as the model runs them
WORKLOADS = {
    "lm_head": ["token_embd.weight"],
    "layer.qkv": ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"],
    "layer.o": ["blk.0.attn_output.weight"],
    "layer.gate_up": ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"],
    "layer.down": ["blk.0.ffn_down.weight"],  # Q6_K
    "layer.down_q4k": ["blk.2.ffn_down.weight"],  # the other half of the layers' ffn_down
    "lm_head.x8": ["token_embd.weight"],  # new: rows interleaved by 8 (as the LM head runs); old: plain Q8_0
}


def build(source_text: str, name: str, workdir: Path, headers: dict[str, bytes]) -> QuantKernels:
    """quant_gemm.cpp alone (with the headers it includes: name -> text) as a library for the widest runnable
    variant, in its own folder so old and new each see their own headers."""
    variant = variants_for(host_cpu_features())[0]
    workdir = workdir / name
    workdir.mkdir()
    src = workdir / f"{name}.cpp"
    src.write_text(source_text)
    for header, text in headers.items():
        (workdir / header).write_bytes(text)
    lib = workdir / f"{name}.so"
    subprocess.run(["g++", *_FLAGS, *variant.march, str(src), "-o", str(lib)], check=True)
    return QuantKernels(ctypes.CDLL(str(lib)))


def folder_headers(folder: Path) -> dict[str, bytes]:
    return {h.name: h.read_bytes() for h in folder.glob("*.h")}


def head_headers() -> dict[str, bytes]:
    """csrc's headers as git HEAD has them."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", "HEAD", f"{CSRC.relative_to(CSRC.parents[3])}/"],
                             capture_output=True, text=True, check=True, cwd=CSRC.parents[3]).stdout.split()
    return {Path(p).name: subprocess.run(["git", "show", f"HEAD:{p}"], capture_output=True, check=True,
                                         cwd=CSRC.parents[3]).stdout for p in listing if p.endswith(".h")}


def load_parts(gguf, names: list[str]) -> list[tuple[int, QuantizedTensor]]:
    parts, off = [], 0
    for name in names:
        info = gguf.tensors[name]
        shape = tuple(int(s) for s in info.shape)
        raw = torch.from_numpy(np.array(info.data, dtype=np.uint8, copy=True))
        parts.append((off, QuantizedTensor.from_bytes(raw, info.ggml_type, shape)))
        off += shape[0]
    return parts


def once_ms(qk: QuantKernels, plan, x: torch.Tensor, out: torch.Tensor, int8: bool = True) -> tuple[float, float]:
    """(wall, this thread's CPU) milliseconds of one call."""
    start, cpu = time.perf_counter(), time.thread_time()
    qk.linear(x, plan, out, int8=int8)
    return (time.perf_counter() - start) * 1e3, (time.thread_time() - cpu) * 1e3


def interleaved(libs: dict[str, QuantKernels], plans: dict, x, out, reps: int,
                cold: torch.Tensor | None = None, int8: bool = True) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms per library, one call of each per round (warm-up round dropped). `cold`: a buffer
    larger than the last-level cache, rewritten before each call so the weights come from memory."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in libs}
    for rnd in range(reps + 1):
        for name, qk in libs.items():
            if cold is not None:
                cold.add_(1.0)
            t = once_ms(qk, plans[name], x, out, int8)
            if rnd:
                times[name].append(t)
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="rounds per point (the layer's get 10x as many)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,4,5,8,9,16")
    ap.add_argument("--crossover-rows", default="16,20,24,32", help="'' to skip the crossover")
    ap.add_argument("--head-crossover-rows", default="16,32,64,96",
                    help="the interleaved LM head's int8 product vs panels ('' to skip)")
    ap.add_argument("--old", type=Path, help="old quant_gemm.cpp (default: git HEAD's)")
    ap.add_argument("--new", type=Path, help="new quant_gemm.cpp (default: the working tree's)")
    ap.add_argument("--old-headers", type=Path, help="folder of the headers the old source builds against "
                    "(default: git HEAD's csrc headers without --old, else the working tree's csrc)")
    ap.add_argument("--new-headers", type=Path, help="the same for the new source (default: --new's folder when "
                    "it holds quant_blocks.h, else the working tree's csrc)")
    ap.add_argument("--cold", action="store_true", help="evict the caches before every call (as in a real decode "
                    "step, whose ~240 MB of weights stream from memory; the layers' figures are otherwise cache-hot)")
    ap.add_argument("--panels", action="store_true", help="old vs new on the float32 panel product (prefill "
                    "sizes: --rows 256,2048) instead of the int8 one")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    args = ap.parse_args()
    old_src = args.old.read_text() if args.old else subprocess.run(
        ["git", "show", f"HEAD:{SOURCE}"], capture_output=True, text=True, check=True,
        cwd=CSRC.parents[3]).stdout
    new_src = (args.new or CSRC / "quant_gemm.cpp").read_text()
    new_headers = args.new_headers or (args.new.parent if args.new and (args.new.parent / "quant_blocks.h").exists()
                                       else CSRC)
    old_headers = (folder_headers(args.old_headers) if args.old_headers else
                   folder_headers(CSRC) if args.old else head_headers())
    gguf = read_gguf(default_model_path())
    row_counts = [int(r) for r in args.rows.split(",")]
    results = []
    cold = torch.zeros(32 << 20) if args.cold else None  # 128 MB
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": build(old_src, "old", Path(tmp), old_headers),
                "new": build(new_src, "new", Path(tmp), folder_headers(new_headers))}
        for workload in args.workloads.split(","):
            names = WORKLOADS[workload]
            parts = load_parts(gguf, names)
            plans = {name: qk.plan(parts) for name, qk in libs.items()}
            if workload.endswith(".x8"):
                plans["new"] = libs["new"].plan([(off, w.interleave()) for off, w in parts])
            width, k = plans["new"].width, plans["new"].k
            reps = args.reps if workload.startswith("lm_head") else 10 * args.reps
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                base: dict[str, float] = {}
                for rows in row_counts:
                    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                    med = interleaved(libs, plans, x, torch.empty(rows, width), reps, cold, not args.panels)
                    base = base or med
                    point = {"workload": workload, "threads": threads, "rows": rows}
                    # wall time; at 1 thread also the thread's CPU time, which leaves out the time other
                    # processes held the core (at 2 threads the OpenMP worker's share would be missing)
                    for kind, i in (("", 0), ("cpu_", 1)) if threads == 1 else (("", 0),):
                        point.update({f"old_{kind}ms": round(med["old"][i], 3), f"new_{kind}ms": round(med["new"][i], 3),
                                      f"old_{kind}rel": round(med["old"][i] / base["old"][i], 2),
                                      f"new_{kind}rel": round(med["new"][i] / base["new"][i], 2),
                                      f"old_over_new_{kind}".rstrip("_"): round(med["old"][i] / med["new"][i], 2)})
                    results.append(point)
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        crossover = crossover_rows(libs["new"], gguf, [int(r) for r in args.crossover_rows.split(",") if r], args.reps)
        head = head_crossover(libs["new"], gguf, [int(r) for r in args.head_crossover_rows.split(",") if r], args.reps)
    print(json.dumps({"results": results, "crossover": crossover, "head_crossover": head}, indent=1))


def head_crossover(qk: QuantKernels, gguf, row_counts: list[int], reps: int) -> list[dict]:
    """An LM head's int8 product against its float32 panels at 2 threads (wall time): the default model's
    interleaved Q8_0 head (INT8_MAX_ROWS), and a random plain-layout Q6_K head of 32768 x 2048 (the type of
    llama.cpp's Q4_K_M heads on larger models, PLAIN_HEAD_INT8_MAX_ROWS)."""
    sys.path.insert(0, str(CSRC.parents[3]))  # the repository root, for the tests' block generator
    from tests.fixtures.quant_blocks import random_blocks

    q6k = QuantizedTensor.from_bytes(torch.from_numpy(random_blocks("Q6_K", 32768, 2048, seed=1)),
                                     GGMLQuantizationType.Q6_K, (32768, 2048))
    heads = {"Q8_0x8": qk.plan([(off, w.interleave()) for off, w in load_parts(gguf, WORKLOADS["lm_head"])]),
             "Q6_K": qk.plan([(0, q6k)])}
    torch.set_num_threads(2)
    rows_out = []
    for head, plan in heads.items():
        for rows in row_counts:
            x, out = torch.randn(rows, plan.k), torch.empty(rows, plan.width)
            times: dict[bool, list[float]] = {True: [], False: []}
            for rnd in range(reps + 1):
                for int8 in (True, False):
                    t = once_ms(qk, plan, x, out, int8)[0]
                    if rnd:
                        times[int8].append(t)
            rows_out.append({"head": head, "rows": rows, "int8_ms": round(statistics.median(times[True]), 2),
                             "panels_ms": round(statistics.median(times[False]), 2)})
            print(json.dumps(rows_out[-1]), file=sys.stderr, flush=True)
    return rows_out


def crossover_rows(qk: QuantKernels, gguf, row_counts: list[int], reps: int) -> list[dict]:
    """The new int8 product against the float32 panels, summed over one layer's linears (blk.0's, Q8_0 / Q5_0
    parts interleaved by 8 as the model holds them), per thread count (1 thread: CPU time; 2 threads: wall time)."""
    layer = [load_parts(gguf, WORKLOADS[w]) for w in ("layer.qkv", "layer.o", "layer.gate_up", "layer.down")]
    plans = [qk.plan([(off, w.interleave() if w.can_interleave() else w) for off, w in parts]) for parts in layer]
    rows_out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in row_counts:
            xs = [torch.randn(rows, p.k) for p in plans]
            outs = [torch.empty(rows, p.width) for p in plans]
            times: dict[bool, list[float]] = {True: [], False: []}
            for rnd in range(3 * reps + 1):
                for int8 in (True, False):
                    t = sum(once_ms(qk, p, x, o, int8)[0 if threads > 1 else 1] for p, x, o in zip(plans, xs, outs))
                    if rnd:
                        times[int8].append(t)
            rows_out.append({"threads": threads, "rows": rows, "int8_ms": round(statistics.median(times[True]), 3),
                             "panels_ms": round(statistics.median(times[False]), 3)})
            print(json.dumps(rows_out[-1]), file=sys.stderr, flush=True)
    return rows_out


if __name__ == "__main__":
    main()
