"""Attention of a speculative-verification step: several query tokens per sequence over the paged KV cache.

B sequences verify k drafts each (1 + k queries at the end of a context of L tokens), every layer of one step
(default: Gemma 3 270M's 4 query heads / 1 KV head of dim 256, block 16, 18 layers; 8 x 5 queries at 512).
Paths, run interleaved round after round (medians), each timing the step's plan plus every layer:
- multi_query_native: the multi-query decode batch in the native kernel (each K/V row read once per sequence)
- per_sequence_prefill: the path those chunks took before (gather the blocks, one masked SDPA per sequence)
- multi_query_pytorch: the padded multi-query SDPA (no native kernels: TOKENMILL_CPU_KERNELS=0, CUDA)
- plain_decodes_native: the same B sequences with one query each (an ordinary decode step): the floor
The outputs of the three multi-query paths are checked against each other before timing.

    python benchmarks/attention_multiquery.py
    python benchmarks/attention_multiquery.py --window 512 --random-blocks
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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queries", type=int, default=5, help="query tokens per sequence (1 + drafts)")
    ap.add_argument("--context", type=int, default=512, help="context length after the step")
    ap.add_argument("--heads", type=int, nargs=3, default=[4, 1, 256], metavar=("HQ", "HKV", "DIM"))
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=None, help="sliding window (Gemma 3's local layers: 512)")
    ap.add_argument("--random-blocks", action="store_true", help="scattered block tables (a long-running server)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch

    from tokenmill.kernels import metadata
    from tokenmill.kernels.cpu_kernels import load_cpu_kernels
    from tokenmill.kernels.metadata import AttentionMetadata
    from tokenmill.kernels.paged_attention import paged_attention

    torch.set_num_threads(args.threads)
    kernels = load_cpu_kernels()
    if kernels is None:
        sys.exit("the native CPU kernels are unavailable here (no C++ compiler?)")
    hq, hkv, dim = args.heads
    bsz, bs, n, ctx = args.batch, args.block_size, args.queries, args.context
    nb = -(-ctx // bs)
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(bsz * nb + 1, bs, hkv, dim, generator=g), torch.randn(bsz * nb + 1, bs, hkv, dim, generator=g))
              for _ in range(args.layers)]
    order = torch.randperm(bsz * nb, generator=g) if args.random_blocks else torch.arange(bsz * nb)
    tables = (order + 1).view(bsz, nb).tolist()  # block 0 is the null block
    scale = dim**-0.5

    def step(num_q: int, native: bool, max_queries: int) -> list:
        """One step over every layer: plan (once, shared by the layers) + attention; returns the outputs."""
        saved, metadata.MAX_DECODE_QUERIES = metadata.MAX_DECODE_QUERIES, max_queries
        try:
            meta = AttentionMetadata.build([num_q] * bsz, [ctx - num_q] * bsz, tables, bs, args.window)
            q = qs[num_q]
            k, v = q[:, :hkv], q[:, :hkv]  # this step's K/V: already in the caches, read only by fresh prompts
            return [paged_attention(q, k, v, kc, vc, meta, scale, kernels if native else None) for kc, vc in caches]
        finally:
            metadata.MAX_DECODE_QUERIES = saved

    qs = {m: torch.randn(bsz * m, hq, dim, generator=g) for m in (1, n)}
    paths = {
        "multi_query_native": lambda: step(n, True, metadata.MAX_DECODE_QUERIES),
        "per_sequence_prefill": lambda: step(n, True, 1),  # 1: every chunk of several queries is a prefill
        "multi_query_pytorch": lambda: step(n, False, metadata.MAX_DECODE_QUERIES),
        "plain_decodes_native": lambda: step(1, True, metadata.MAX_DECODE_QUERIES),
    }
    want = paths["per_sequence_prefill"]()
    for name in ("multi_query_native", "multi_query_pytorch"):
        for got, ref in zip(paths[name](), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({
        "shape": {"batch": bsz, "queries_per_seq": n, "context": ctx, "heads": args.heads, "layers": args.layers,
                  "block_size": bs, "window": args.window, "random_blocks": args.random_blocks},
        "threads": torch.get_num_threads(),
        "kernel_variant": kernels.variant,
        "ms_per_step": {name: round(t * 1e3, 2) for name, t in med.items()},
        "ms_per_step_min": {name: round(min(ts) * 1e3, 2) for name, ts in times.items()},  # robust on a busy machine
        "speedup_vs_per_sequence_prefill": round(med["per_sequence_prefill"] / med["multi_query_native"], 2),
        "pytorch_multi_query_vs_per_sequence_prefill": round(med["per_sequence_prefill"] / med["multi_query_pytorch"], 2),
        "cost_vs_plain_decodes": round(med["multi_query_native"] / med["plain_decodes_native"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
