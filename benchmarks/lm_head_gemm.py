"""LM head matmul on CPU (float32): the native panel GEMM vs oneDNN's prepacked linear vs MKL column-major.

Default shape: Gemma 3 270M's tied head, hidden 640 x vocabulary 262,144. The three run interleaved, round
after round, in one process; each prints its median GFLOP/s and the ratio to oneDNN. oneDNN and MKL allocate
their output per call, as they do inside a model step; the panel GEMM writes into a reused buffer, as the
model runner gives it (a fresh 67 MB output costs 20-30 ms of page faults at 64 rows).

    python benchmarks/lm_head_gemm.py
    python benchmarks/lm_head_gemm.py --hidden 896 --vocab 151936 --rows 1 64   # Qwen2.5 0.5B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    from tokenmill.kernels.cpu_kernels import load_cpu_kernels
    from tokenmill.layers.linear import PackedLinear, column_major

    torch.set_num_threads(os.cpu_count() or 1)
    kernels = load_cpu_kernels()
    if kernels is None:
        sys.exit("the native CPU kernels are unavailable here (no C++ compiler?)")
    weight = torch.randn(args.vocab, args.hidden) * 0.02
    panels = kernels.pack_panels(weight)
    onednn = PackedLinear(weight)
    mkl = partial(torch.nn.functional.linear, weight=column_major(weight))
    out = torch.empty(max(args.rows) * args.vocab)
    results = []
    for rows in args.rows:
        x = torch.randn(rows, args.hidden)
        buf = out[: rows * args.vocab].view(rows, args.vocab)
        fns = {"panel_gemm": lambda: kernels.panel_gemm(x, panels, out=buf), "onednn": lambda: onednn(x),
               "mkl_column_major": lambda: mkl(x)}
        torch.testing.assert_close(fns["panel_gemm"](), fns["onednn"](), rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        flop = 2 * rows * args.hidden * args.vocab
        gflops = {name: round(flop / statistics.median(ts) / 1e9, 1) for name, ts in times.items()}
        results.append({"rows": rows, "gflop_s": gflops,
                        "panel_vs_onednn": round(gflops["panel_gemm"] / gflops["onednn"], 2),
                        "panel_vs_mkl": round(gflops["panel_gemm"] / gflops["mkl_column_major"], 2)})
    print(json.dumps({"shape": [args.vocab, args.hidden], "threads": torch.get_num_threads(), "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
