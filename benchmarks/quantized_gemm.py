"""The quantized-weight products against the dense float32 one, on the default model's real tensors.

For each matrix shape of Gemma 3 270M Q4_K_M (its actual block types: Q5_0 q/gate/up, Q4_K o, Q6_K down,
Q8_0 embedding = LM head) and each row count: the 8-bit activation kernel (`int8`), the dequantize-into-
panels GEMM (`panels`) and oneDNN's prepacked float32 linear on the dequantized weight (`fp32`, what
--quantization none runs), timed in the same process, interleaved. Prints JSON: milliseconds per call and
the ratios fp32/int8 and fp32/panels (> 1: the quantized kernel is faster), and the row count where the
panels overtake the int8 kernel (layers/quantized.py: INT8_MAX_ROWS).

    .venv/bin/python benchmarks/quantized_gemm.py [--threads 2] [--reps 30] [--rows 1,2,4,8,16,32,64,256]

Weights stay hot in cache across repetitions here except the 262k-row LM head; in a real decode step every
weight comes from memory, which favours the quantized kernels more than this shows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from tokenmill.kernels.cpu_kernels import load_cpu_kernels
from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.kernels.quant_reference import dequantize_weight
from tokenmill.layers.linear import PackedLinear
from tokenmill.model.default_model import default_model_path
from tokenmill.model.gguf_reader import read_gguf

TENSORS = ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight",
           "token_embd.weight"]


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,256")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_cpu_kernels()
    if kernels is None:
        sys.exit("native kernels unavailable (no C++ compiler?)")
    qk = kernels.quant
    gguf = read_gguf(default_model_path())
    results = []
    for name in TENSORS:
        info = gguf.tensors[name]
        shape = tuple(int(s) for s in info.shape)
        raw = torch.from_numpy(np.array(info.data, dtype=np.uint8, copy=True))
        weight = QuantizedTensor.from_bytes(raw, info.ggml_type, shape)
        dense = PackedLinear(dequantize_weight(weight))
        head = name.startswith("token")
        reps = max(2, args.reps // 10) if head else args.reps
        for rows in [int(r) for r in args.rows.split(",")]:
            if head and rows > 64:
                continue
            x = torch.randn(rows, shape[1])
            out = torch.empty(rows, shape[0])
            plan = qk.plan([(0, weight)])
            int8 = _time(lambda x=x, plan=plan, out=out: qk.linear(x, plan, out, int8=True), reps)
            panels = _time(lambda x=x, plan=plan, out=out: qk.linear(x, plan, out, int8=False), reps)
            fp32 = _time(lambda x=x, dense=dense: dense(x), reps)
            results.append({"tensor": name, "type": weight.qtype.name, "shape": list(shape), "rows": rows,
                            "int8_ms": round(int8, 4), "panels_ms": round(panels, 4), "fp32_ms": round(fp32, 4),
                            "fp32_over_int8": round(fp32 / int8, 3), "fp32_over_panels": round(fp32 / panels, 3)})
            print(json.dumps(results[-1]), file=sys.stderr)
    crossover = {}
    for name in TENSORS:
        rows = [r for r in results if r["tensor"] == name and r["panels_ms"] < r["int8_ms"]]
        crossover[name] = min((r["rows"] for r in rows), default=None)
    print(json.dumps({"variant": kernels.variant, "threads": args.threads, "results": results,
                      "panels_faster_from_rows": crossover}, indent=1))


if __name__ == "__main__":
    main()
