"""Workload W1 on the default model (Gemma 3 270M Q4_K_M GGUF, fp32): tokenmill vs transformers, one run.

W1: 64 requests x 256 prompt tokens x 128 output tokens, greedy, ignore_eos. Baselines in the same process,
same prompts: transformers loading the same GGUF (`gguf_file=`), as static batches of --hf-batch and
one-at-a-time on --hf-single requests. Also: single-stream time per output token (one request alone),
model load time, and peak RSS of the tokenmill part (measured before transformers is loaded). Prints JSON.

    python benchmarks/default_model_throughput.py                    # full W1 (several minutes on 2 cores)
    python benchmarks/default_model_throughput.py --num-requests 8 --output-len 16 --hf-batch 8   # quick
    python benchmarks/default_model_throughput.py --repeats 3     # medians of 3 interleaved rounds (~13 min)

Where the time goes (fp32, 2 threads): prefill and decode steps are matmul-bound. Layer weights are prepacked
for oneDNN once at load (1.4x MKL's column-major layout at 64 rows); the tied LM head (640 x 262,144, 62% of
decode FLOPs) runs the native panel GEMM into a reused logits buffer (1.1-1.7x oneDNN at 1-128 rows,
benchmarks/lm_head_gemm.py). Decode attention, RMSNorm, GELU(tanh)*up and the wide argmax run native CPU
kernels (kernels/csrc/, built on first use), each checked against its PyTorch oracle in
tests/model/test_cpu_kernels.py. Compute roofline for W1 is about 170 tok/s (fp32 at 150 GFLOP/s).
Timings on a shared machine are noisy; compare ratios from the same run (--repeats for medians).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.offline_throughput import run_hf_batch  # noqa: E402 - the same static-batch transformers loop


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Ids from the ordinary-text range (avoid Gemma's control / unused tokens at the start of the vocab).
    return [[2] + torch.randint(1000, vocab - 1000, (length - 1,), generator=g).tolist() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file; default: the packaged Gemma 3 270M")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-single", type=int, default=2, help="requests run one at a time through transformers")
    ap.add_argument("--single-stream-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--quantization", default="auto",
                    help="auto (the GGUF's blocks kept, the default) | none (dequantized to the model dtype)")
    ap.add_argument("--dense-batch-weights", action="store_true",
                    help="with blocks kept: a dense copy for steps over 32 rows (tokenmill serve --dense-batch-weights)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of (tokenmill W1, transformers static batch, transformers one-at-a-time); medians")
    args = ap.parse_args()

    import torch

    import tokenmill
    from tokenmill import SamplingParams
    from tokenmill.model.default_model import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = args.model or default_model_path()
    t0 = time.perf_counter()
    llm = tokenmill.LLM(path, max_model_len=args.prompt_len + args.output_len + 16, kv_cache_memory=1.0,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=False, quantization=args.quantization,
                        dense_batch_weights=args.dense_batch_weights)
    load_s = time.perf_counter() - t0
    prompts = make_prompts(args.num_requests, args.prompt_len, llm.loaded.vocab_size)
    total_out = args.num_requests * args.output_len
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up

    def run_tokenmill() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    tm_times = []
    tm_s, tm_tokens = run_tokenmill()
    tm_times.append(tm_s)
    one = {"prompt_token_ids": prompts[0]}
    t0 = time.perf_counter()
    llm.generate([one], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate([one], SamplingParams(temperature=0.0, max_tokens=args.single_stream_tokens, ignore_eos=True))
    single_s = time.perf_counter() - t0
    tm_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)

    result: dict = {
        "model": Path(path).name, "dtype": "float32", "threads": torch.get_num_threads(), "rounds": args.repeats,
        "workload": {"name": "W1", "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "greedy": True, "ignore_eos": True},
        "tokenmill": {"elapsed_s": round(tm_s, 2), "output_tok_s": round(total_out / tm_s, 1),
                      "load_s": round(load_s, 2), "peak_rss_gib": round(tm_rss, 2),
                      "single_stream_ttft_s": round(ttft, 3),
                      "single_stream_s_per_output_token": round((single_s - ttft) / max(1, args.single_stream_tokens - 1), 4)},
    }
    print(json.dumps({"partial": result}), file=sys.stderr, flush=True)  # survives a later timeout
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        p = Path(path)
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    n_single = min(args.hf_single, len(prompts))
    hb_times, hs_times = [], []
    # Rounds interleave the three measurements, so a slow spell of a shared machine hits all of them.
    for r in range(args.repeats):
        if r:
            tm_times.append(run_tokenmill()[0])
        if hf is None:
            continue
        hb_s, hb_tokens = run_hf_batch(hf, prompts, args.output_len, args.hf_batch)
        hb_times.append(hb_s)
        if r == 0:
            result["greedy_identical_fraction"] = round(
                sum(a == b for a, b in zip(tm_tokens, hb_tokens)) / len(prompts), 3)
        if n_single:
            hs_times.append(run_hf_batch(hf, prompts[:n_single], args.output_len, 1)[0])
        print(json.dumps({"partial_round": r, "tokenmill_s": tm_times[-1], "hf_batch_s": hb_s,
                          "hf_single_s": hs_times[-1] if hs_times else None}), file=sys.stderr, flush=True)
    tm_med = statistics.median(tm_times)
    result["tokenmill"].update(elapsed_s=round(tm_med, 2), output_tok_s=round(total_out / tm_med, 1),
                               runs_output_tok_s=[round(total_out / t, 1) for t in tm_times])
    if hb_times:
        hb_med = statistics.median(hb_times)
        result["transformers_static_batch"] = {"batch": args.hf_batch, "elapsed_s": round(hb_med, 2),
                                               "output_tok_s": round(total_out / hb_med, 1),
                                               "runs_output_tok_s": [round(total_out / t, 1) for t in hb_times]}
        result["ratio_vs_static_batch"] = round(hb_med / tm_med, 2)
    if hs_times:
        hs_med, single_total = statistics.median(hs_times), n_single * args.output_len
        result["transformers_one_at_a_time"] = {"requests": n_single, "output_tok_s": round(single_total / hs_med, 1),
                                                "s_per_output_token": round(hs_med / single_total, 4),
                                                "runs_output_tok_s": [round(single_total / t, 1) for t in hs_times]}
        result["ratio_vs_one_at_a_time"] = round(total_out / tm_med / (single_total / hs_med), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
