"""bf16 vs float32 on the same model and prompts: how much does the low-precision path change the output?

Both runs use tokenmill's own engine (float32 = the exact path that matches transformers token for token).
A fixed, built-in prompt set; for each prompt the float32 engine generates --output-len greedy tokens. Then:
- teacher-forced, on prompt + float32 continuation, one prefill each in both dtypes: at every position the
  next-token distributions are compared: greedy (argmax) agreement, mean and max KL(fp32 || bf16), max and
  mean |logit difference|;
- free-running: bf16 generates its own greedy continuation; the fraction identical to float32's and the mean
  index of the first differing token.
Prints one JSON object. bf16 runs wherever bf16 is stored (CPUs without native bf16 use the bf16-weight panel
GEMM with float32 accumulation; CPUs with AMX / AVX512-BF16 use oneDNN): it measures numerics, not speed.

    .venv/bin/python benchmarks/bf16_accuracy.py                  # the default model (Gemma 3 270M)
    .venv/bin/python benchmarks/bf16_accuracy.py --model DIR_OR_GGUF --output-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three laws of thermodynamics state that",
    "Ingredients for a simple bread: flour, water,",
    "In 1969, the Apollo 11 mission",
    "To install the package, run the following command:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Photosynthesis is the process by which plants",
    "SELECT name, email FROM users WHERE",
    "Dear hiring manager, I am writing to apply for the position of",
    "The most important thing to remember when learning a new language is",
    "Water boils at 100 degrees Celsius at sea level, but on a mountain",
    "1, 2, 3, 5, 8, 13, 21,",
    "The mitochondria is often called the powerhouse of the cell because",
    "Here is a short poem about autumn:\n",
]


def all_position_logits(runner, ids: list[int]):
    """Float32 logits [T, V] at every position of one prefill of `ids` through the runner's model and cache."""
    import torch

    from tokenmill.kernels.metadata import AttentionMetadata
    from tokenmill.layers.attention import ForwardContext

    bs = runner.block_size
    blocks = list(range(1, -(-len(ids) // bs) + 1))  # block 0 is the null block
    meta = [AttentionMetadata.build([len(ids)], [0], [blocks], bs, g.sliding_window, runner.device)
            for g in runner.kv_cache_groups]
    ctx = ForwardContext(meta, runner.layer_to_group, runner.kv_caches, runner.attn_backend, runner.cpu_kernels)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(len(ids)), ctx)
        return runner.model.compute_logits(hidden).float().clone()


def make_llm(model: str | None, dtype: str):
    from tokenmill import LLM

    return LLM(model, dtype=dtype, max_model_len=1024, kv_cache_memory=0.25)


def greedy(llm, prompt_ids: list[list[int]], output_len: int) -> list[list[int]]:
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def compare(want_logits, got_logits, want_tokens, got_tokens) -> dict:
    import torch

    w = torch.cat(want_logits).double()
    g = torch.cat(got_logits).double()
    kl = (w.softmax(-1) * (w.log_softmax(-1) - g.log_softmax(-1))).sum(-1)
    diff = (w - g).abs()
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(want_tokens, got_tokens)]
    return {
        "positions": int(w.shape[0]),
        "greedy_token_agreement": round(float((w.argmax(-1) == g.argmax(-1)).double().mean()), 5),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "max_logit_diff": round(float(diff.max()), 4), "mean_logit_diff": round(float(diff.mean()), 5),
        "logit_std": round(float(w.std()), 3),
        "free_running_identical_fraction": round(sum(a == b for a, b in zip(want_tokens, got_tokens)) / len(want_tokens), 4),
        "mean_first_divergence": round(sum(first) / len(first), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf; default: the packaged Gemma 3 270M")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    args = ap.parse_args()

    import gc

    from tokenmill.kernels.cpu_features import host_cpu_features

    t0 = time.perf_counter()
    llm = make_llm(args.model, "float32")
    prompt_ids = [llm.loaded.tokenizer(p)["input_ids"] for p in PROMPTS[: args.num_prompts]]
    fp32_tokens = greedy(llm, prompt_ids, args.output_len)
    forced = [p + t for p, t in zip(prompt_ids, fp32_tokens)]
    fp32_logits = [all_position_logits(llm.runner, seq) for seq in forced]
    t32 = time.perf_counter() - t0
    del llm
    gc.collect()
    t0 = time.perf_counter()
    llm = make_llm(args.model, "bfloat16")
    bf16_tokens = greedy(llm, prompt_ids, args.output_len)
    bf16_logits = [all_position_logits(llm.runner, seq) for seq in forced]
    t16 = time.perf_counter() - t0
    report = {"model": args.model or "default (Gemma 3 270M Q4_K_M)", "cpu": host_cpu_features().describe(),
              "bf16_linears": "oneDNN (native bf16)" if host_cpu_features().native_bf16 else "bf16-weight panel GEMM",
              "prompts": len(prompt_ids), "output_len": args.output_len,
              **compare(fp32_logits, bf16_logits, fp32_tokens, bf16_tokens),
              "seconds": {"float32": round(t32, 1), "bfloat16": round(t16, 1)}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
