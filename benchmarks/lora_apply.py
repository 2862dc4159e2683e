"""The batched LoRA apply on CPU: three designs over one step of all wrapped layers (float32).

Shapes: Gemma 3 270M (hidden 640, q 1024, k/v 256, mlp 2048, 18 layers: 72 wrapped projections, the fused
qkv / gate_up layers with one rank block per shard), max_loras adapters of rank `--rank` in the slots.
A step of `--tokens` tokens routes token t to slot t % max_loras (1 token: slot 0; 32 tokens: 8 adapters,
none contiguous: the index path). Designs:
  bgmv     gather each token's A/B from the stack, two bmm (punica's BGMV in plain PyTorch)
  masked   every slot for every token: x @ A_cat [in, max_loras*W], zero the other slots' columns per
           token, @ B_cat (two GEMMs whatever the mix, max_loras x the useful FLOPs)
  slot_loop  (lora/layers.py, per-slot route) loop over the ACTIVE slots: each slot's rows (a slice when
             contiguous, else index_select / index_add), two mm: only useful FLOPs, 2-4 ops per slot
  grouped    (lora/layers.py, chosen when several adapters are balanced) tokens gathered into padded
             [slots, per_slot] groups, two bmm against the stacked A/B, one index_add: 5 ops a layer
             (the 1-token step has one adapter: the per-slot route, grouped == slot_loop there)
Each is timed as base layer + delta (the base: oneDNN-packed, as the runner prepares it), interleaved round
after round; the JSON gives the median ms per step and the overhead over the base layers alone, and for
one rank-`--rank` adapter on all seven targets: its size on disk / in memory / in a slot, the time to
parse + validate it and to write it into a slot.

    python benchmarks/lora_apply.py
    python benchmarks/lora_apply.py --tokens 1 32 128 --max-loras 8 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HIDDEN, Q, KV, MLP, LAYERS = 640, 1024, 256, 2048, 18


def build(max_loras: int, rank: int):
    """The 72 wrapped layers of one model, every slot filled with a random adapter on all seven targets."""
    import torch

    from tokenmill.layers.linear import try_pack
    from tokenmill.lora.adapter import LoRAModuleWeights
    from tokenmill.lora.layers import LoRABatch, LoRALinear, Shard

    batch = LoRABatch()
    layouts = [(HIDDEN, [("q_proj", Q), ("k_proj", KV), ("v_proj", KV)]), (Q, [("o_proj", HIDDEN)]),
               (HIDDEN, [("gate_proj", MLP), ("up_proj", MLP)]), (MLP, [("down_proj", HIDDEN)])]
    layers = []
    for _ in range(LAYERS):
        for fan_in, parts in layouts:
            shards, off = [], 0
            for target, size in parts:
                shards.append(Shard(target, off, size))
                off += size
            base = try_pack(torch.randn(off, fan_in) * 0.02)
            wrapped = LoRALinear(base, shards, fan_in, off, max_loras, rank, batch, torch.float32, torch.device("cpu"))
            for slot in range(max_loras):
                wrapped.set_slot(slot, {s.target: LoRAModuleWeights(0, s.target, torch.randn(rank, fan_in) * 0.05,
                                                                    torch.randn(s.size, rank) * 0.05) for s in shards})
            layers.append(wrapped)
    return batch, layers


def bgmv(layer, x, slots):
    """Each token's A [in, W] and B [W, out] gathered from the stack (a [T, W, out] copy), two bmm."""
    import torch

    h = torch.bmm(x[:, None, :], layer.a[slots])
    return layer.base(x).add_(torch.bmm(h, layer.b[slots])[:, 0])


def masked(layer, x, mask, cat):
    """Every slot for every token in two GEMMs: x @ A_cat [in, L*W], other slots' columns zeroed, @ B_cat."""
    a_cat, b_cat = cat
    return layer.base(x).addmm_((x @ a_cat).mul_(mask), b_cat)


def run_step(design: str, layers, xs, routing, cats):
    batch, slots, mask = routing
    if design == "base_only":
        batch.clear()
    elif design in ("grouped", "slot_loop"):
        batch.set(slots.tolist(), [1] * len(slots), slots.device)
        if design == "slot_loop":
            batch.group = None  # force the per-slot route
    outs = []
    for layer, cat in zip(layers, cats):
        x = xs[layer.a.shape[1]]
        if design in ("base_only", "grouped", "slot_loop"):
            outs.append(layer(x))
        elif design == "bgmv":
            outs.append(bgmv(layer, x, slots))
        else:
            outs.append(masked(layer, x, mask[layer.width], cat))
    return outs


DESIGNS = ("base_only", "bgmv", "masked", "slot_loop", "grouped")


def measure(tokens: int, layers, batch, cats, max_loras: int, rounds: int) -> dict:
    import torch

    slots = torch.arange(tokens) % max_loras
    onehot = (slots[:, None] == torch.arange(max_loras)[None, :]).float()
    mask = {l.width: onehot.repeat_interleave(l.width, dim=1) for l in layers}
    routing = (batch, slots, mask)
    xs = {l.a.shape[1]: torch.randn(tokens, l.a.shape[1]) for l in layers}
    ref = run_step("slot_loop", layers, xs, routing, cats)
    for design in ("bgmv", "masked", "grouped"):
        for r, o in zip(ref, run_step(design, layers, xs, routing, cats)):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {d: [] for d in DESIGNS}
    for _ in range(rounds):
        for d in DESIGNS:
            t0 = time.perf_counter()
            run_step(d, layers, xs, routing, cats)
            times[d].append(time.perf_counter() - t0)
    ms = {d: round(1e3 * statistics.median(t), 3) for d, t in times.items()}
    return {"tokens": tokens, "active_adapters": min(tokens, max_loras), "ms_per_step": ms,
            "overhead_vs_base": {d: round(ms[d] / ms["base_only"], 3) for d in DESIGNS[1:]}}


def adapter_io(rank: int, layers) -> dict:
    """A random PEFT adapter (rank `rank`, all seven targets, HF names) on Gemma 3 270M shapes: its size on
    disk and in memory, the time to parse + validate it (load_adapter) and to write it into one slot."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from tokenmill.lora.adapter import BaseShapes, TargetShape, load_adapter

    dims = {"q_proj": (HIDDEN, Q), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (Q, HIDDEN),
            "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
    tensors = {}
    for i in range(LAYERS):
        for t, (fan_in, fan_out) in dims.items():
            prefix = f"base_model.model.model.layers.{i}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank) * 0.05
    shapes = BaseShapes(LAYERS, {t: TargetShape(*d) for t, d in dims.items()})
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, f"{folder}/adapter_model.safetensors")
        Path(folder, "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(dims)}))
        load_s = []
        for _ in range(5):
            t0 = time.perf_counter()
            adapter = load_adapter(folder, rank, shapes)
            load_s.append(time.perf_counter() - t0)
        file_bytes = Path(folder, "adapter_model.safetensors").stat().st_size
    swap_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i, layer in enumerate(layers):
            layer.set_slot(0, {t: m for (li, t), m in adapter.modules.items() if li == i // 4})
        swap_s.append(time.perf_counter() - t0)
    return {"rank": rank, "file_mib": round(file_bytes / 2**20, 2), "cpu_mib": round(adapter.num_bytes / 2**20, 2),
            "slot_mib": round(sum(l.num_bytes for l in layers) / layers[0].a.shape[0] / 2**20, 2),
            "load_ms": round(1e3 * statistics.median(load_s), 1), "slot_write_ms": round(1e3 * statistics.median(swap_s), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    batch, layers = build(args.max_loras, args.rank)
    # The masked design's layout: all slots side by side, A_cat [in, L*W] and B_cat [L*W, out].
    cats = [(l.a.permute(1, 0, 2).reshape(l.a.shape[1], -1).contiguous(), l.b.reshape(-1, l.b.shape[2])) for l in layers]
    with torch.inference_mode():
        results = [measure(t, layers, batch, cats, args.max_loras, args.rounds) for t in args.tokens]
    print(json.dumps({"benchmark": "lora_apply", "layers": len(layers), "max_loras": args.max_loras,
                      "rank": args.rank, "threads": torch.get_num_threads(), "adapter": adapter_io(args.rank, layers),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
