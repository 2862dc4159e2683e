"""Speculative decoding (n-gram prompt lookup) on the default model (Gemma 3 270M GGUF): tokens/s with and
without it, baselines in the same process run. Prints JSON. Offline `LLM.generate` (no HTTP): the engine,
scheduler and runner are the serving ones; only the front end is left out.

Parts (the same prompts, greedy, the with- and without-speculation runs back to back in each round):
(a) single stream, input-grounded: prompts built in below that make a base model copy or edit text from its
    prompt (a function with a variable renamed, a passage repeated, a JSON record edited, log lines copied);
    max_tokens 128. Per workload: output tok/s with / without, speedup, acceptance rate, mean accepted length,
    and whether the greedy tokens are identical (they must be).
(b) W1 at concurrency 32: 64 random-token prompts x 256 tokens -> 128 tokens, greedy, ignore_eos,
    max_num_seqs 32, with --spec-config as given (its disable_by_batch_size left to the default) vs none.
(c) --sweep: the input-grounded prompts at concurrency 1, 2, 4, ... 32 with speculation at every batch size
    (disable_by_batch_size null): where it stops paying, hence the default disable_by_batch_size.

    python benchmarks/spec_decode.py                       # (a) + (b) on the default model
    python benchmarks/spec_decode.py --sweep --skip-w1     # (a) + (c)
    python benchmarks/spec_decode.py --tiny                # smoke run on a tiny random model (seconds)

Timings on a shared machine are noisy: compare the ratios of one run (--repeats for medians of rounds).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.fixtures for --tiny
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

_FUNCTION = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
_PASSAGE = ("The lighthouse stood at the end of a narrow spit of rock, and for ninety years its keepers had "
            "climbed the same one hundred and twelve steps every evening to light the lamp. The last keeper, "
            "a quiet woman named Ada Morrow, kept a logbook in which she wrote the weather, the ships that "
            "passed, and the birds that rested on the gallery rail. When the light was automated in 1989 she "
            "left the logbook on the desk beneath the lamp, open at a page that read: calm sea, light wind from "
            "the west, two fishing boats heading home, one heron.")
_RECORD = ('{"id": 4117, "name": "Stainless steel water bottle", "category": "outdoor", "price": 18.99, '
           '"currency": "EUR", "in_stock": true, "colors": ["silver", "black", "forest green"], '
           '"dimensions": {"height_cm": 26.5, "diameter_cm": 7.3}, "weight_g": 340, '
           '"tags": ["insulated", "leak-proof", "dishwasher safe"]}')
_LOG = "\n".join(f"2024-05-1{d} 0{h}:1{h}:0{d} INFO worker-{d}: processed batch {100 + 7 * d + h} in {h + 1}.{d}s"
                 for d in range(3) for h in range(4))

# name -> prompt: each asks a base model to reproduce (most of) text it has just read.
GROUNDED_PROMPTS: dict[str, str] = {
    "code_rename": f"Here is a Python function:\n\n{_FUNCTION}\nThe same function with the variable `total` "
                   "renamed to `running_sum`:\n\ndef moving_average(values, window):\n",
    "repeat_passage": f"Passage:\n{_PASSAGE}\n\nRepeat the passage exactly:\n",
    "json_edit": f"Record:\n{_RECORD}\n\nThe same record with the price changed to 12.50:\n",
    "copy_log": f"Log:\n{_LOG}\n\nThe same log, copied line by line:\n",
}


def spec_counts(llm: Any) -> tuple[int, int, int]:
    """(drafts, draft tokens, accepted tokens) so far: the core's cumulative SchedulerStats.spec_*."""
    s = llm.engine.stats()
    return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def timed(llm: Any, prompts: list[Any], params: Any) -> tuple[float, list[list[int]], tuple[int, int, int]]:
    """Seconds, the output token ids of each prompt, and the speculative counts this run added."""
    before = spec_counts(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    after = spec_counts(llm)
    return elapsed, [list(o.outputs[0].token_ids) for o in outs], tuple(a - b for a, b in zip(after, before))


def acceptance(counts: list[tuple[int, int, int]]) -> dict[str, Any]:
    """vLLM's figures over runs: acceptance rate = accepted / draft tokens, mean accepted length =
    1 + accepted / drafts (tokens each verifying step yields, the target's own token included)."""
    drafts, tokens, accepted = (sum(c[i] for c in counts) for i in range(3))
    return {"drafts": drafts, "draft_tokens": tokens, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / tokens, 3) if tokens else None,
            "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None}


def compare(base: Any, spec: Any, prompts: list[Any], params: Any, repeats: int) -> dict[str, Any]:
    """Rounds of (without, with) back to back on the same prompts; medians of tok/s and of per-round ratios."""
    base_tps, spec_tps, ratios, counts = [], [], [], []
    identical = True
    for _ in range(repeats):
        tb, out_b, _ = timed(base, prompts, params)
        ts, out_s, c = timed(spec, prompts, params)
        nb, ns = sum(map(len, out_b)), sum(map(len, out_s))
        base_tps.append(nb / tb)
        spec_tps.append(ns / ts)
        ratios.append((ns / ts) / (nb / tb))
        counts.append(c)
        identical = identical and out_b == out_s
    return {"output_tokens": nb, "without_tok_s": round(statistics.median(base_tps), 2),
            "with_tok_s": round(statistics.median(spec_tps), 2), "speedup": round(statistics.median(ratios), 3),
            "round_speedups": [round(r, 3) for r in ratios], **acceptance(counts),
            "greedy_identical": identical}


def single_stream(base: Any, spec: Any, max_tokens: int, repeats: int) -> dict[str, Any]:
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out: dict[str, Any] = {"max_tokens": max_tokens, "greedy": True, "workloads": {}}
    for name, prompt in GROUNDED_PROMPTS.items():
        out["workloads"][name] = compare(base, spec, [prompt], params, repeats)
        print(json.dumps({"partial": {name: out["workloads"][name]}}), file=sys.stderr, flush=True)
    w = out["workloads"].values()
    out["speedup_geomean"] = round(statistics.geometric_mean(r["speedup"] for r in w), 3)
    out["target_speedup"] = 1.6
    return out


def w1(base: Any, spec: Any, num_requests: int, prompt_len: int, output_len: int, repeats: int) -> dict[str, Any]:
    import torch

    from benchmarks.default_model_throughput import make_prompts
    from tokenmill import SamplingParams

    vocab = base.loaded.vocab_size
    if vocab > 4000:  # W1's own prompts (the ones every W1 benchmark uses)
        ids = make_prompts(num_requests, prompt_len, vocab)
    else:  # a tiny vocabulary: any ids past the special ones
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(num_requests)]
    prompts = [{"prompt_token_ids": p} for p in ids]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    r = compare(base, spec, prompts, params, repeats)
    return {"num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len,
            "concurrency": base.config.scheduler.max_num_seqs, "ignore_eos": True,
            "disable_by_batch_size": spec.config.speculative.disable_by_batch_size, **r,
            "throughput_ratio": r["speedup"], "target_ratio": 0.97}


def sweep(base: Any, spec: Any, concurrencies: list[int], max_tokens: int, repeats: int) -> dict[str, Any]:
    """Input-grounded prompts, `c` at once (cycled through the workloads), speculation at every batch size."""
    from tokenmill import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    texts = list(GROUNDED_PROMPTS.values())
    rows = {}
    for c in concurrencies:
        prompts = [texts[i % len(texts)] for i in range(c)]
        rows[str(c)] = compare(base, spec, prompts, params, repeats)
        print(json.dumps({"partial_sweep": {c: rows[str(c)]}}), file=sys.stderr, flush=True)
    paying = [c for c in concurrencies if rows[str(c)]["speedup"] >= 1.0]
    # the largest batch size up to which every measured size still gained (None: it never paid)
    best = None
    for c in concurrencies:
        if c not in paying:
            break
        best = c
    return {"max_tokens": max_tokens, "by_concurrency": rows, "recommended_disable_by_batch_size": best}


def build_tiny(folder: Path) -> str:
    from tests.fixtures.tiny_models import build_tiny_model

    return str(build_tiny_model(folder, "llama", max_position_embeddings=2048))  # the prompts fit its byte BPE


def load(path: str, spec: dict | None, args: argparse.Namespace) -> Any:
    import tokenmill

    return tokenmill.LLM(path, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                         max_num_seqs=args.concurrency, enable_prefix_caching=False, speculative_config=spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf; default: the packaged Gemma 3 270M")
    ap.add_argument("--tiny", action="store_true", help="smoke run: a tiny random Llama, small sizes")
    ap.add_argument("--spec-config", default=json.dumps(DEFAULT_SPEC), help="vLLM's speculative_config JSON")
    ap.add_argument("--max-tokens", type=int, default=128, help="(a) and (c): output tokens per request")
    ap.add_argument("--num-requests", type=int, default=64, help="(b) W1 requests")
    ap.add_argument("--prompt-len", type=int, default=256, help="(b) W1 prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="(b) W1 output tokens")
    ap.add_argument("--concurrency", type=int, default=32, help="max_num_seqs of every engine")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (without, with); medians")
    ap.add_argument("--kv-cache-memory", type=float, default=0.75, help="GiB per engine")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--skip-w1", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="(c) speedup by concurrency")
    ap.add_argument("--sweep-concurrency", default="1,2,4,8,16,32")
    args = ap.parse_args()
    if args.tiny:
        args.max_tokens, args.num_requests, args.prompt_len, args.output_len = 16, 8, 32, 8
        args.concurrency, args.kv_cache_memory = 8, 0.1
        args.sweep_concurrency = "1,2,4"

    import torch

    from tokenmill.model.default_model import default_model_path
    from tokenmill.spec_decode.config import parse_speculative_config

    torch.set_num_threads(os.cpu_count() or 1)
    spec_cfg = json.loads(args.spec_config)
    parse_speculative_config(spec_cfg)  # a bad config fails here, before any model loads
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(Path(tmp) / "tiny") if args.tiny else (args.model or default_model_path())
        result = run(path, spec_cfg, args)
    print(json.dumps(result, indent=2))


def run(path: str, spec_cfg: dict, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill import SamplingParams

    warm = SamplingParams(temperature=0.0, max_tokens=4)
    engines: dict[str, Any] = {}

    def engine(name: str, spec: dict | None) -> Any:
        """Loaded on first use (each holds its own weights and KV cache), warmed up once."""
        if name not in engines:
            engines[name] = load(path, spec, args)
            engines[name].generate(["warm-up"], warm)
        return engines[name]

    t0 = time.perf_counter()
    base = engine("base", None)
    result: dict[str, Any] = {
        "model": Path(path).name, "threads": torch.get_num_threads(), "offline_llm_generate": True,
        "speculative_config": spec_cfg, "load_s": round(time.perf_counter() - t0, 1),
        "kv_cache_memory_gib": args.kv_cache_memory, "repeats": args.repeats}
    # (a) and (c) speculate at every batch size; (b) keeps the config's disable_by_batch_size (or the default).
    always_cfg = {**spec_cfg, "disable_by_batch_size": None}
    if not args.skip_single:
        result["single_stream"] = single_stream(base, engine("always", always_cfg), args.max_tokens, args.repeats)
    if args.sweep:
        cs = [int(c) for c in args.sweep_concurrency.split(",")]
        result["sweep"] = sweep(base, engine("always", always_cfg), cs, args.max_tokens, args.repeats)
    if not args.skip_w1:
        same = _default_batch(spec_cfg) is None
        default = engine("always", always_cfg) if same else engine("default", spec_cfg)
        result["w1"] = w1(base, default, args.num_requests, args.prompt_len, args.output_len, args.repeats)
    result["parsed"] = {name: _as_dict(e.config.speculative) for name, e in engines.items()}
    return result


def _default_batch(spec_cfg: dict) -> int | None:
    from tokenmill.spec_decode.config import parse_speculative_config

    return parse_speculative_config(spec_cfg).disable_by_batch_size


def _as_dict(cfg: Any) -> dict[str, Any] | None:
    from dataclasses import asdict

    return None if cfg is None else asdict(cfg)


if __name__ == "__main__":
    main()
