"""Offline throughput: tokenmill LLM vs transformers on the same workload, in one run; prints JSON.

Default model: a SmolLM-135M-shaped Llama with random weights (hidden 576, intermediate 1536, 30 layers,
9 heads, 3 KV heads, vocab 49152, tied embeddings, fp32), built locally once (no hub access).
Default workload: 32 requests x 128 prompt tokens x 64 output tokens, greedy, ignore_eos.

    python benchmarks/offline_throughput.py                      # SmolLM-shaped random model
    python benchmarks/offline_throughput.py --model PATH         # any HF folder / .gguf tokenmill loads

Baselines (same process, same prompts): transformers `generate` as one static batch of --hf-batch requests,
and one-at-a-time on --hf-single requests. `--model` is the hook for other workloads (e.g. the default
Gemma 3 model, W1 = --num-requests 64 --prompt-len 256 --output-len 128).
Timings on a shared machine are noisy; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.fixtures builds the tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5)


def build_smollm_shaped(folder: Path) -> Path:
    """Random-weight SmolLM-135M-shaped Llama saved as an HF folder (tokenizer trained locally)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.tiny_models import make_tokenizer

    if (folder / "model.safetensors").is_file():
        return folder
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(**SMOLLM_SHAPE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_tokenmill(model: str, prompts: list[list[int]], output_len: int, args) -> tuple[float, list[list[int]], float]:
    import tokenmill
    from tokenmill import SamplingParams

    t0 = time.perf_counter()
    llm = tokenmill.LLM(model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    elapsed = time.perf_counter() - t0
    return elapsed, [list(o.outputs[0].token_ids) for o in outs], load_s


def _hf_model(model: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()


def run_hf_batch(hf, prompts: list[list[int]], output_len: int, batch: int) -> tuple[float, list[list[int]]]:
    import torch

    outs: list[list[int]] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])  # equal lengths: no padding needed
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                              min_new_tokens=output_len, do_sample=False, pad_token_id=0)
            outs += gen[:, ids.shape[1] :].tolist()
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf; default: SmolLM-shaped random Llama")
    ap.add_argument("--model-dir", default="/tmp/tokenmill-bench/smollm135m-random", help="where the default model is built")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32, help="transformers static batch size")
    ap.add_argument("--hf-single", type=int, default=2, help="requests run one at a time through transformers (0: skip)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model = args.model or str(build_smollm_shaped(Path(args.model_dir)))
    from tokenmill.config import ModelConfig
    from tokenmill.model.loader import load_model

    vocab = load_model(ModelConfig(model=model, dtype=args.dtype)).vocab_size if args.model else SMOLLM_SHAPE["vocab_size"]
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab)
    total_out = args.num_requests * args.output_len
    result: dict = {"model": args.model or "smollm-135m-shaped-random", "workload": {
        "num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "greedy": True, "ignore_eos": True}, "threads": torch.get_num_threads(), "dtype": args.dtype}

    tm_s, tm_tokens, load_s = run_tokenmill(model, prompts, args.output_len, args)
    result["tokenmill"] = {"elapsed_s": round(tm_s, 2), "output_tok_s": round(total_out / tm_s, 1), "load_s": round(load_s, 2)}
    if not args.skip_hf and not (args.model or "").endswith(".gguf"):
        hf = _hf_model(model, args.dtype)
        hb_s, hb_tokens = run_hf_batch(hf, prompts, args.output_len, args.hf_batch)
        result["transformers_static_batch"] = {"batch": args.hf_batch, "elapsed_s": round(hb_s, 2),
                                               "output_tok_s": round(total_out / hb_s, 1)}
        result["ratio_vs_static_batch"] = round(hb_s / tm_s, 2)
        # Greedy agreement (random fp32 weights: rare near-ties may flip between batch shapes).
        result["greedy_identical_fraction"] = round(sum(a == b for a, b in zip(tm_tokens, hb_tokens)) / len(prompts), 3)
        if args.hf_single:
            n = min(args.hf_single, len(prompts))
            hs_s, _ = run_hf_batch(hf, prompts[:n], args.output_len, 1)
            single_tok_s = n * args.output_len / hs_s
            result["transformers_one_at_a_time"] = {"requests": n, "output_tok_s": round(single_tok_s, 1),
                                                    "s_per_output_token": round(hs_s / (n * args.output_len), 4)}
            result["ratio_vs_one_at_a_time"] = round(total_out / tm_s / single_tok_s, 2)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
