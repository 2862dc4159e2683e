"""Quantized GGUF blocks (quantization="auto") vs the dequantized float32 path (quantization="none").

Same GGUF file, same tokenmill engine, both dtype float32; the only difference is how the weights are held:
"none" dequantizes every tensor to float32 (the exact path that matches transformers), "auto" keeps the
Q8_0 / Q5_0 / Q4_K / Q6_K blocks and runs the native kernels over them. Those kernels take two routes
(layers/quantized.py): up to INT8_MAX_ROWS (32) rows per linear, the LM head included when its rows are
interleaved (Q8_0 / Q5_0, as the default model's; other heads PLAIN_HEAD_INT8_MAX_ROWS, 16), the activations are
quantized to 8 bits (integer dot products: decode of up to 32 sequences); above it the blocks are dequantized
panel by panel for a float32 GEMM (prefill, wide decode batches). So this reports both:

- teacher_forced_prefill: prompt + the float32 greedy continuation, one prefill each (bf16_accuracy.py's
  all_position_logits: every position; the default prompts give sequences of over 32 tokens, so every matrix
  takes the panel route);
- teacher_forced_decode: the prompt prefilled, then the same continuation fed one token per forward (1 row,
  the 8-bit activation route), logits of every decode step;
- for each: greedy (argmax) agreement, mean / max KL(none || auto) per position, max and mean |logit
  difference|, and the std of the "none" logits (for scale);
- free_running: both engines generate --output-len greedy tokens (ignore_eos) in batches of --gen-batch
  prompts (default 1: single stream, the 8-bit route); how many of the N prompts give identical
  continuations, and the mean index of the first differing token (= output_len when identical).

One engine at a time: the "none" logits are kept (float32, ~1.3 GB at the defaults), the "auto" ones are
compared per prompt (float64) as they are made and dropped. Prints one JSON object to stdout; progress goes to stderr. Measures numerics, not
speed.

    .venv/bin/python benchmarks/quant_accuracy.py                          # default model, 16 prompts x 32
    .venv/bin/python benchmarks/quant_accuracy.py --model FILE.gguf --output-len 64
    .venv/bin/python benchmarks/quant_accuracy.py --num-prompts 2 --output-len 8   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The same prompts, teacher-forced logits and greedy generation as the bf16 comparison.
from benchmarks.bf16_accuracy import PROMPTS, all_position_logits, greedy


def log(msg: str) -> None:
    print(f"[quant_accuracy] {msg}", file=sys.stderr, flush=True)


def make_llm(model: str, quantization: str, max_model_len: int):
    from tokenmill import LLM

    # No prefix cache: all_position_logits writes K/V straight into blocks 1.. behind the engine's back.
    return LLM(model, quantization=quantization, dtype="float32", max_model_len=max_model_len,
               kv_cache_memory=0.25, max_num_seqs=8, enable_prefix_caching=False)


def decode_step_logits(runner, prompt_len: int, ids: list[int]):
    """Float32 logits [len(ids) - prompt_len, V]: ids[:prompt_len] prefilled, then ids[prompt_len:] fed one
    token per forward (as decode runs them), each step's logits kept. Bounded by len(ids)."""
    import torch

    from tokenmill.kernels.metadata import AttentionMetadata
    from tokenmill.layers.attention import ForwardContext

    bs = runner.block_size
    blocks = list(range(1, -(-len(ids) // bs) + 1))  # block 0 is the null block

    def forward(start: int, end: int) -> torch.Tensor:
        meta = [AttentionMetadata.build([end - start], [start], [blocks], bs, g.sliding_window, runner.device)
                for g in runner.kv_cache_groups]
        ctx = ForwardContext(meta, runner.layer_to_group, runner.kv_caches, runner.attn_backend, runner.cpu_kernels)
        hidden = runner.model(torch.tensor(ids[start:end]), torch.arange(start, end), ctx)
        return runner.model.compute_logits(hidden[-1:]).float().clone()

    with torch.inference_mode():
        forward(0, prompt_len)
        return torch.cat([forward(p, p + 1) for p in range(prompt_len, len(ids))])


def run_engine(model: str, quantization: str, args, ref: dict | None = None) -> dict:
    """Load one engine, generate, compute both kinds of teacher-forced logits. Without `ref` (the "none" run)
    the logits are kept; with it, each prompt's logits are compared with ref's at once and dropped."""
    prompt_ids = ref["prompt_ids"] if ref else None
    forced = ref["forced"] if ref else None
    t0 = time.perf_counter()
    llm = make_llm(model, quantization, args.max_model_len)
    load_s = time.perf_counter() - t0
    weights = llm.loaded.quantization
    log(f"{quantization}: loaded in {load_s:.1f}s, weights {weights}")
    if prompt_ids is None:
        prompt_ids = [llm.loaded.tokenizer(p)["input_ids"] for p in PROMPTS[: args.num_prompts]]
    t0 = time.perf_counter()
    tokens: list[list[int]] = []
    for i in range(0, len(prompt_ids), args.gen_batch):
        tokens += greedy(llm, prompt_ids[i : i + args.gen_batch], args.output_len)
    gen_s = time.perf_counter() - t0
    log(f"{quantization}: generated {len(tokens)} x {args.output_len} tokens in {gen_s:.1f}s")
    if forced is None:
        forced = [p + t for p, t in zip(prompt_ids, tokens)]
    t0 = time.perf_counter()
    prefill: list | LogitStats = [] if ref is None else LogitStats()
    decode: list | LogitStats = [] if ref is None else LogitStats()
    for i, (p, seq) in enumerate(zip(prompt_ids, forced)):
        pre, dec = all_position_logits(llm.runner, seq), decode_step_logits(llm.runner, len(p), seq)
        if ref is None:
            prefill.append(pre)
            decode.append(dec)
        else:
            prefill.add(ref["prefill"][i], pre)
            decode.add(ref["decode"][i], dec)
    logits_s = time.perf_counter() - t0
    log(f"{quantization}: teacher-forced logits in {logits_s:.1f}s")
    check = None
    if ref is None:
        # Sanity of the logit paths: the argmax of the logits that produced each generated token is that token.
        pre = dec = n = 0
        for p, t, lp, ld in zip(prompt_ids, tokens, prefill, decode):
            pre += sum(int(a) == b for a, b in zip(lp[len(p) - 1 : -1].argmax(-1), t))
            dec += sum(int(a) == b for a, b in zip(ld[:-1].argmax(-1), t[1:]))
            n += len(t)
        check = {"prefill_argmax_is_generated_token": round(pre / n, 4),
                 "decode_argmax_is_generated_token": round(dec / max(n - len(tokens), 1), 4)}
    del llm
    gc.collect()
    return {"weights": weights, "self_check": check, "prompt_ids": prompt_ids, "tokens": tokens, "forced": forced, "prefill": prefill,
            "decode": decode, "seconds": {"load": round(load_s, 1), "generate": round(gen_s, 1),
                                          "teacher_forced": round(logits_s, 1)}}


class LogitStats:
    """Running comparison of reference (`none`) vs test (`auto`) logits, fed one prompt at a time (float64)."""

    def __init__(self) -> None:
        self.n = self.agree = 0
        self.kl_sum = self.diff_sum = 0.0
        self.kl_max = self.diff_max = 0.0
        self.ref_sum = self.ref_sq = 0.0
        self.ref_count = 0

    def add(self, ref, got) -> None:
        w, g = ref.double(), got.double()
        kl = (w.softmax(-1) * (w.log_softmax(-1) - g.log_softmax(-1))).sum(-1)
        diff = (w - g).abs()
        self.n += w.shape[0]
        self.agree += int((w.argmax(-1) == g.argmax(-1)).sum())
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.diff_sum += float(diff.sum())
        self.diff_max = max(self.diff_max, float(diff.max()))
        self.ref_sum += float(w.sum())
        self.ref_sq += float((w * w).sum())
        self.ref_count += w.numel()

    def report(self) -> dict:
        mean = self.ref_sum / self.ref_count
        std = math.sqrt(max(self.ref_sq / self.ref_count - mean * mean, 0.0))
        return {"positions": self.n, "greedy_token_agreement": round(self.agree / self.n, 5),
                "mean_kl": self.kl_sum / self.n, "max_kl": self.kl_max,
                "max_logit_diff": float(f"{self.diff_max:.4g}"),
                "mean_logit_diff": float(f"{self.diff_sum / self.ref_count:.4g}"),
                "logit_std": round(std, 3)}


def free_running(ref_tokens: list[list[int]], got_tokens: list[list[int]]) -> dict:
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ref_tokens, got_tokens)]
    same = sum(a == b for a, b in zip(ref_tokens, got_tokens))
    return {"identical": same, "of": len(ref_tokens), "identical_fraction": round(same / len(ref_tokens), 4),
            "mean_first_divergence": round(sum(first) / len(first), 2),
            "first_divergence_per_prompt": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file; default: the packaged Gemma 3 270M Q4_K_M")
    ap.add_argument("--num-prompts", type=int, default=len(PROMPTS), help=f"first N of the {len(PROMPTS)} prompts")
    ap.add_argument("--output-len", type=int, default=32, help="greedy tokens per prompt (ignore_eos)")
    ap.add_argument("--gen-batch", type=int, default=1,
                    help="prompts per generate() call in free-running; <= 8 keeps decode on the 8-bit route")
    ap.add_argument("--max-model-len", type=int, default=512)
    args = ap.parse_args()
    if not 1 <= args.num_prompts <= len(PROMPTS):
        ap.error(f"--num-prompts must be in [1, {len(PROMPTS)}]")
    if args.output_len < 1 or args.gen_batch < 1:
        ap.error("--output-len and --gen-batch must be >= 1")

    from tokenmill.kernels.cpu_features import host_cpu_features
    from tokenmill.layers.quantized import INT8_MAX_ROWS, PLAIN_HEAD_INT8_MAX_ROWS
    from tokenmill.model.default_model import default_model_path

    model = args.model or default_model_path()
    log(f"model {model}")
    ref = run_engine(model, "none", args)
    got = run_engine(model, "auto", args, ref)
    report = {
        "benchmark": "quant_accuracy",
        "model": model,
        "cpu": host_cpu_features().describe(),
        "weights": {"none": ref["weights"], "auto": got["weights"]},
        "dtype": "float32",
        "prompts": len(ref["prompt_ids"]),
        "prompt_lens": [len(p) for p in ref["prompt_ids"]],
        "output_len": args.output_len,
        "gen_batch": args.gen_batch,
        "int8_max_rows": INT8_MAX_ROWS,
        "plain_head_int8_max_rows": PLAIN_HEAD_INT8_MAX_ROWS,
        "kl": "KL(none || auto) per position, nats",
        "reference_self_check": ref["self_check"],
        "teacher_forced_prefill": got["prefill"].report(),
        "teacher_forced_decode": got["decode"].report(),
        "free_running": free_running(ref["tokens"], got["tokens"]),
        "seconds": {"none": ref["seconds"], "auto": got["seconds"]},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
