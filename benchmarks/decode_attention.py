"""Decode attention over the paged KV cache on CPU (float32): the native kernel vs the PyTorch path.

One decode step of every layer: B sequences, one query token each, attending to ctx ~ U[L-64, L] cached
positions (default: Gemma 3 270M's 4 query heads / 1 KV head of dim 256, 18 layers, W1's 64 x ~320). The
PyTorch path (used when the native kernels are unavailable) gathers the blocks into a padded batch and
runs one masked SDPA. Both run interleaved, round after round; prints medians, the K/V bytes read per
second, and the ratio. --random-blocks scatters the block tables (a long-running server's cache) instead
of allocating each sequence's blocks in order (a fresh batch). The native kernel also runs over a bf16 copy
of the same caches (`native_bf16_cache`: --kv-cache-dtype bfloat16, and bf16 models): half the bytes read.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --heads 32 8 128 --layers 4 --batch 16 --context 2048  # Llama-8B-like
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=320)
    ap.add_argument("--heads", type=int, nargs=3, default=[4, 1, 256], metavar=("HQ", "HKV", "DIM"))
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--random-blocks", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    from tokenmill.kernels.cpu_kernels import load_cpu_kernels
    from tokenmill.kernels.paged_attention import _decode_sdpa

    torch.set_num_threads(os.cpu_count() or 1)
    kernels = load_cpu_kernels()
    if kernels is None:
        sys.exit("the native CPU kernels are unavailable here (no C++ compiler?)")
    hq, hkv, dim = args.heads
    bsz, bs = args.batch, args.block_size
    nb = -(-args.context // bs)
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(bsz * nb + 1, bs, hkv, dim), torch.randn(bsz * nb + 1, bs, hkv, dim))
              for _ in range(args.layers)]
    order = torch.randperm(bsz * nb, generator=g) if args.random_blocks else torch.arange(bsz * nb)
    blocks = (order + 1).view(bsz, nb).contiguous()  # block 0 is the null block
    ctx = torch.randint(max(1, args.context - 64), args.context + 1, (bsz,), generator=g)
    zeros = torch.zeros(bsz, dtype=torch.int64)
    mask = torch.where(torch.arange(nb * bs)[None, :] < ctx[:, None], 0.0, float("-inf"))[:, None, None, :]
    q = torch.randn(bsz, hq, dim, generator=g)
    scale = dim**-0.5
    bf16_caches = [(kc.bfloat16(), vc.bfloat16()) for kc, vc in caches]
    fns = {
        "native": lambda i: kernels.decode_attention(q, *caches[i], blocks, zeros, zeros, ctx, scale),
        "native_bf16_cache": lambda i: kernels.decode_attention(q, *bf16_caches[i], blocks, zeros, zeros, ctx, scale),
        "pytorch_sdpa": lambda i: _decode_sdpa(q, *caches[i], blocks, mask, scale),
    }
    torch.testing.assert_close(fns["native"](0), fns["pytorch_sdpa"](0), rtol=1e-4, atol=1e-5)
    widened = _decode_sdpa(q, bf16_caches[0][0].float(), bf16_caches[0][1].float(), blocks, mask, scale)
    torch.testing.assert_close(fns["native_bf16_cache"](0), widened, rtol=1e-4, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(args.layers):
                fn(i)
            times[name].append(time.perf_counter() - t0)
    kv_elems = args.layers * int(ctx.sum()) * hkv * dim * 2
    med = {name: statistics.median(ts) for name, ts in times.items()}
    elem_bytes = {"native": 4, "native_bf16_cache": 2, "pytorch_sdpa": 4}
    print(json.dumps({
        "shape": {"batch": bsz, "context": args.context, "heads": args.heads, "layers": args.layers,
                  "block_size": bs, "random_blocks": args.random_blocks},
        "threads": torch.get_num_threads(),
        "ms_per_step": {name: round(t * 1e3, 1) for name, t in med.items()},
        "kv_gb_per_s": {name: round(kv_elems * elem_bytes[name] / t / 1e9, 1) for name, t in med.items()},
        "native_vs_pytorch": round(med["pytorch_sdpa"] / med["native"], 2),
        "bf16_cache_vs_float32_cache": round(med["native"] / med["native_bf16_cache"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
