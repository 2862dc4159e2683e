"""Multi-LoRA on the default model (Gemma 3 270M GGUF): adapters vs the base model, one run. Prints JSON.

Adapters: rank 16 on all seven projections (q/k/v/o, gate/up/down) of every layer, random weights, written
here as PEFT folders (adapter_config.json + adapter_model.safetensors with PEFT's HF tensor names), shaped
from the loaded model (peft itself needs the HF model class, which a GGUF file is not).

Measured, offline LLM in this process, greedy, ignore_eos, prefix caching off:
- mixed load: --num-requests concurrent requests spread round-robin over --num-adapters adapters, vs the same
  prompts on the base model alone (output tokens/s; issue 18's target: >= 0.75x);
- single stream: one request through an adapter vs the base model (output tokens/s; target >= 0.85x);
- adapter load time (parse + validate + copy, from disk into memory) and memory per adapter: in the
  in-memory cache (max_cpu_loras) and per slot of the stacked weights (max_loras slots are allocated once).
Rounds interleave base and adapter runs so a slow spell of a shared machine hits both (--repeats: medians).

    python benchmarks/lora.py                                   # 32 requests over 8 adapters (a few minutes)
    python benchmarks/lora.py --num-requests 8 --output-len 16  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# after sys.path: the same prompt ids as W1
from benchmarks.default_model_throughput import make_prompts

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(folder: Path, shapes, rank: int, seed: int) -> Path:
    """A random PEFT LoRA folder for a model of these shapes (lora.adapter.BaseShapes), all seven targets."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for target in TARGETS:
            shape = shapes.targets[target]
            name = f"base_model.model.model.layers.{layer}.{_MODULE[target]}.{target}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, shape.in_features, generator=g) / shape.in_features ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(shape.out_features, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "base_model_name_or_path": "gemma-3-270m"}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file or HF folder; default: the packaged Gemma 3 270M")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--single-stream-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import torch

    import tokenmill
    from tokenmill import SamplingParams
    from tokenmill.lora.request import LoRARequest
    from tokenmill.model.default_model import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = args.model or default_model_path()
    llm = tokenmill.LLM(path, max_model_len=args.prompt_len + args.output_len + 16, kv_cache_memory=1.0,
                        max_num_seqs=max(args.num_requests, 1), enable_prefix_caching=False,
                        enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    manager = llm.runner.lora
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-lora-bench-"))
    loras = [LoRARequest(f"adapter{i}", i + 1, str(write_adapter(tmp / f"adapter{i}", manager.shapes, args.rank, i)))
             for i in range(args.num_adapters)]
    load_s = []
    for lora in loras:  # from disk into the in-memory cache: what the load endpoint and a cold request pay
        t0 = time.perf_counter()
        manager.add(lora)
        load_s.append(time.perf_counter() - t0)
    cache_bytes = [manager.cache[lora.lora_int_id].num_bytes for lora in loras]

    prompts = [{"prompt_token_ids": p} for p in make_prompts(args.num_requests, args.prompt_len, llm.loaded.vocab_size)]
    per_prompt = [loras[i % len(loras)] for i in range(len(prompts))]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate(prompts[: len(loras)], warm, lora_request=loras)  # kernels built, every adapter in a slot
    llm.generate(prompts[:1], warm)

    def timed(batch, params, lora) -> tuple[float, float]:
        """(wall, CPU) seconds. CPU time (all threads of this process) is the steadier figure on a shared
        machine: other processes' load stretches wall time, not the work done."""
        t0, c0 = time.perf_counter(), time.process_time()
        llm.generate(batch, params, lora_request=lora)
        return time.perf_counter() - t0, time.process_time() - c0

    single = SamplingParams(temperature=0.0, max_tokens=args.single_stream_tokens, ignore_eos=True)
    runs: dict[str, list[float]] = {"base": [], "lora": [], "single_base": [], "single_lora": []}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for key, batch, params, lora in (("base", prompts, greedy, None), ("lora", prompts, greedy, per_prompt),
                                         ("single_base", prompts[:1], single, None),
                                         ("single_lora", prompts[:1], single, loras[0])):
            wall, used = timed(batch, params, lora)
            runs[key].append(wall)
            cpu[key].append(used)
        print(json.dumps({"partial_round": r, **{k: v[-1] for k, v in runs.items()}}), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    total, one = args.num_requests * args.output_len, args.single_stream_tokens
    stats = manager.stats()
    result = {
        "model": Path(path).name, "threads": torch.get_num_threads(), "rounds": args.repeats,
        "workload": {"num_requests": args.num_requests, "num_adapters": args.num_adapters, "rank": args.rank,
                     "target_modules": list(TARGETS), "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "greedy": True, "ignore_eos": True},
        "base_output_tok_s": round(total / med["base"], 1),
        "lora_output_tok_s": round(total / med["lora"], 1),
        "lora_vs_base": round(med["base"] / med["lora"], 3),
        "single_stream_base_tok_s": round(one / med["single_base"], 2),
        "single_stream_lora_tok_s": round(one / med["single_lora"], 2),
        "single_stream_lora_vs_base": round(med["single_base"] / med["single_lora"], 3),
        "cpu_time_ratios": {"lora_vs_base": round(cpu_med["base"] / cpu_med["lora"], 3),
                            "single_stream_lora_vs_base": round(cpu_med["single_base"] / cpu_med["single_lora"], 3)},
        "adapter_load_s": {"median": round(statistics.median(load_s), 4), "max": round(max(load_s), 4)},
        "memory_per_adapter_mib": {"in_memory_cache": round(statistics.median(cache_bytes) / 2**20, 2),
                                   "per_slot": round(stats["slot_bytes"] / stats["max_loras"] / 2**20, 2),
                                   "slots_allocated": round(stats["slot_bytes"] / 2**20, 2)},
        "swaps": stats["swaps"],
        "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "runs_cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "targets": {"lora_vs_base": 0.75, "single_stream_lora_vs_base": 0.85},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
