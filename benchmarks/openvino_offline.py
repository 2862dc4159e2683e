"""Offline workload W1 through OpenVINO GenAI's ContinuousBatchingPipeline (the offline peer of tokenmill).

W1: 64 requests x 256 prompt tokens x 128 output tokens, greedy, ignore_eos: the same prompt token ids as
benchmarks/default_model_throughput.py (`make_prompts`, seed 0: BOS 2 then ids drawn by torch.randint from
[1000, vocab - 1000)), fed to the pipeline as token ids (no detokenize / retokenize). Each --model-dir is an
OpenVINO export (`optimum-cli export openvino ...`) of the same model; they run one after another, each loaded,
warmed up (one short request), timed on the whole workload, then released. Prints JSON: per export the wall
time and output tok/s, plus the OpenVINO version and the CPU plugin's inference precision hint and KV cache
precision it ran at (the device defaults unless --inference-precision / --kv-cache-precision are given; a CPU
without bf16 / fp16 units resolves a bf16 or f16 hint to f32, reported as "inference_precision_effective").

It runs in OpenVINO's own venv, not tokenmill's (it imports neither tokenmill nor, at module level, torch;
torch 2.13.0+cpu, which optimum-intel installs there, is imported inside `make_prompts` only, so the random
prompt ids are bit-identical to tokenmill's; "prompt_ids_sha256" in the output lets two runs be compared).
Recipe (venv, GGUF -> HF folder, exports): benchmarks/PEERS.md, "OpenVINO GenAI (offline peer)".

    HF_HUB_OFFLINE=1 /tmp/ov/venv/bin/python benchmarks/openvino_offline.py \
        --model-dir /tmp/ov/gemma3-ov-fp16 --model-dir /tmp/ov/gemma3-ov-int8          # full W1
    /tmp/ov/venv/bin/python benchmarks/openvino_offline.py --model-dir /tmp/ov/gemma3-ov-fp16 \
        --num-requests 8 --output-len 16                                                # quick
    # then tokenmill on the same workload, right after (same session, figures side by side):
    .venv/bin/python benchmarks/default_model_throughput.py --skip-hf

Timings on a shared machine are noisy: interleave runs of both sides (--repeats repeats within this process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The prompt ids of benchmarks/default_model_throughput.py's `make_prompts` (same code, same generator)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # Ids from the ordinary-text range (avoid Gemma's control / unused tokens at the start of the vocab).
    return [[2] + torch.randint(1000, vocab - 1000, (length - 1,), generator=g).tolist() for _ in range(n)]


def prompts_sha256(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts, separators=(",", ":")).encode()).hexdigest()[:16]


def _ov_type_name(value) -> str:
    """'f32' / 'bf16' / 'u8' ... for an openvino Type (or its str() for anything else)."""
    name = getattr(value, "to_string", None)
    return name() if callable(name) else str(value)


def effective_precisions(ov, props: dict) -> dict[str, str]:
    """What the CPU plugin resolves the precision hints to (a CPU without bf16/fp16 units runs f32 whatever is
    asked): compile a one-MatMul probe model with the same properties and read its properties back."""
    import numpy as np
    import openvino.opset13 as ops

    x = ops.parameter([1, 64], np.float32)
    probe = ov.Model([ops.matmul(x, ops.constant(np.ones((64, 64), np.float32)), False, False)], [x])
    compiled = ov.Core().compile_model(probe, "CPU", props)
    return {"inference_precision": _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "kv_cache_precision": _ov_type_name(compiled.get_property("KV_CACHE_PRECISION"))}


def cpu_properties(args) -> dict:
    props: dict = {}
    if args.inference_precision:
        props["INFERENCE_PRECISION_HINT"] = args.inference_precision
    if args.kv_cache_precision:
        props["KV_CACHE_PRECISION"] = args.kv_cache_precision
    if args.threads:
        props["INFERENCE_NUM_THREADS"] = args.threads
    return props


def const_mib_by_type(xml: Path) -> dict[str, float]:
    """MiB of the IR's constants (weights) per element type: f16 for the fp16 export, u8 (+ f16 scales) for int8."""
    sizes: dict[str, int] = {}
    for m in re.finditer(r'type="Const" version="[^"]*">\s*<data element_type="(\w+)"[^>]*?size="(\d+)"',
                         xml.read_text()):
        sizes[m.group(1)] = sizes.get(m.group(1), 0) + int(m.group(2))
    return {k: round(v / 2**20, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v >= 2**20}


def run_export(model_dir: Path, prompts: list[list[int]], args, ov, ov_genai) -> tuple[dict, list[list[int]]]:
    import numpy as np

    sched = ov_genai.SchedulerConfig()
    sched.max_num_seqs = args.max_num_seqs
    sched.max_num_batched_tokens = args.max_num_batched_tokens
    sched.cache_size = args.cache_size_gb  # GB of KV cache blocks
    sched.enable_prefix_caching = False
    sched.dynamic_split_fuse = True
    t0 = time.perf_counter()
    pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), sched, "CPU", cpu_properties(args))
    load_s = time.perf_counter() - t0

    def config(max_new: int) -> object:
        c = ov_genai.GenerationConfig()
        c.do_sample = False  # greedy
        c.max_new_tokens = max_new
        c.min_new_tokens = max_new
        c.ignore_eos = True
        return c

    def tensors(ps: list[list[int]]) -> list:
        return [ov.Tensor(np.asarray([p], dtype=np.int64)) for p in ps]

    pipe.generate(tensors([prompts[0][:16]]), [config(2)])  # warm-up (first-inference setup), as tokenmill's
    inputs, configs = tensors(prompts), [config(args.output_len)] * len(prompts)
    times, cpu_times, outputs = [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        results = pipe.generate(inputs, configs)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # CPU seconds of all this process's threads
        outputs = [list(r.m_generation_ids[0]) for r in results]
    n_out = sum(len(o) for o in outputs)
    metrics = pipe.get_metrics()
    med = statistics.median(times)
    cfg = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    out = {
        "model_dir": str(model_dir),
        "model_type": cfg.get("model_type"),
        "weights_bin_mib": round((model_dir / "openvino_model.bin").stat().st_size / 2**20, 1),
        "const_mib_by_type": const_mib_by_type(model_dir / "openvino_model.xml"),
        "load_s": round(load_s, 2),
        "elapsed_s": round(med, 2),
        "output_tok_s": round(n_out / med, 1),
        "runs_output_tok_s": [round(n_out / t, 1) for t in times],
        # Less sensitive to other work on a shared machine than wall time (but not immune: caches, SMT).
        "runs_output_tok_per_cpu_s": [round(n_out / c, 1) for c in cpu_times],
        "runs_cpu_utilization": [round(c / t, 2) for c, t in zip(cpu_times, times)],
        "output_tokens": n_out,
        "min_max_output_len": [min(map(len, outputs)), max(map(len, outputs))],
        "max_cache_usage_pct": round(float(getattr(metrics, "max_cache_usage", float("nan"))), 1),
    }
    del pipe
    return out, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", action="append", required=True, type=Path,
                    help="OpenVINO export folder (repeat for several exports, e.g. fp16 and int8)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of the workload per export (median)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--cache-size-gb", type=int, default=2, help="KV cache size of the pipeline (GB)")
    ap.add_argument("--inference-precision", default=None,
                    help="CPU INFERENCE_PRECISION_HINT (f32, bf16, f16); default: the device's own default")
    ap.add_argument("--kv-cache-precision", default=None,
                    help="CPU KV_CACHE_PRECISION (u8, f16, bf16, f32); default: the device's own default")
    ap.add_argument("--threads", type=int, default=0,
                    help="INFERENCE_NUM_THREADS; 0 = the plugin's default (all cores)")
    ap.add_argument("--save-outputs", type=Path, default=None, help="write the generated ids per export (JSON)")
    args = ap.parse_args()

    import openvino as ov
    import openvino_genai as ov_genai

    first = args.model_dir[0]
    vocab = json.loads((first / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab)
    core = ov.Core()
    result: dict = {
        "engine": "openvino_genai.ContinuousBatchingPipeline",
        "openvino": ov.__version__, "openvino_genai": ov_genai.__version__,
        "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "cpu_optimization_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        "inference_precision_hint_requested": args.inference_precision or "device default",
        "kv_cache_precision_requested": args.kv_cache_precision or "device default",
        # The precisions the CPU plugin resolves those to: the inference precision it ran at.
        **{k + "_effective": v for k, v in effective_precisions(ov, cpu_properties(args)).items()},
        "threads": args.threads or os.cpu_count(),
        "workload": {"name": "W1", "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "greedy": True, "ignore_eos": True,
                     "prompt_ids_sha256": prompts_sha256(prompts),
                     "prompt_lens": sorted({len(p) for p in prompts})},
        "scheduler": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "cache_size_gb": args.cache_size_gb, "dynamic_split_fuse": True,
                      "enable_prefix_caching": False},
        "exports": {},
    }
    all_outputs: dict = {}
    for d in args.model_dir:
        res, outs = run_export(d, prompts, args, ov, ov_genai)
        result["exports"][d.name] = res
        all_outputs[d.name] = outs
        print(json.dumps({"partial": {d.name: res}}), file=sys.stderr, flush=True)  # survives a later timeout
    names = list(all_outputs)
    if len(names) > 1:  # greedy agreement of each export with the first one
        ref = all_outputs[names[0]]
        result["greedy_identical_fraction_vs_" + names[0]] = {
            n: round(sum(a == b for a, b in zip(ref, all_outputs[n])) / len(ref), 3) for n in names[1:]}
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2)
    if args.save_outputs:
        args.save_outputs.write_text(json.dumps({"prompts_sha256": prompts_sha256(prompts), "outputs": all_outputs}))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
