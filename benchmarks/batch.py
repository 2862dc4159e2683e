"""A batch file through `tokenmill run-batch`'s path vs offline `LLM.generate` on the same prompts, one run; JSON.

Default: 500 /v1/completions lines on the default model (Gemma 3 270M GGUF), prompts from the bench datasets
module (random text of --input-len tokens), --max-tokens 32 output tokens each, greedy, ignore_eos, so both
sides produce exactly the same number of tokens. The batch side is run_batch() itself (validation, the
engine core in its own process as in `tokenmill run-batch`, the HTTP handlers without HTTP through
execute_line, fsync'd output lines); the offline side is LLM.generate on the same prompt texts. Each side's
time excludes model load; the ratio (batch tok/s over offline tok/s) is the figure (target >= 0.9).

    python benchmarks/batch.py                              # 500 lines (several minutes on 2 cores)
    python benchmarks/batch.py --num-lines 32               # quick check
    python benchmarks/batch.py --num-lines 64 --repeats 4   # order alternating, median ratio (shared machine)

The machine may be shared: the JSON carries the 1-minute load average before and after; compare the
ratio, not the absolute rates, and rerun when the load is high.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_prompts(tokenizer, n: int, input_len: int, seed: int) -> list[str]:
    from tokenmill.bench.datasets import sample_random

    return [r.prompt for r in sample_random(tokenizer, n, input_len, 1, 0.0, seed)]


def run_offline(args, prompts: list[str]) -> dict:
    from tokenmill import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs)
    load_s = time.perf_counter() - t0
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up (kernels, caches)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    texts = [o.outputs[0].text for o in outs]
    del llm
    return {"elapsed_s": round(elapsed, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2),
            "load_s": round(load_s, 2), "texts": texts}


def run_batch_path(args, prompts: list[str], model_name: str, workdir: Path) -> dict:
    from tokenmill.batch.run_batch import run_batch
    from tokenmill.engine.args import engine_config

    inp, out = workdir / "in.jsonl", workdir / "out.jsonl"
    with open(inp, "w") as f:
        for i, p in enumerate(prompts):
            body = {"model": model_name, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                    "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")
    config = engine_config(args.model, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs)
    t0 = time.perf_counter()
    concurrency = args.max_concurrency or 2 * config.scheduler.max_num_seqs
    summary = asyncio.run(run_batch(config, inp, out, concurrency, progress=False))
    wall = time.perf_counter() - t0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    texts = [results[f"line-{i}"]["response"]["body"]["choices"][0]["text"] for i in range(len(prompts))]
    return {"elapsed_s": round(summary.elapsed_s, 3), "completion_tokens": summary.completion_tokens,
            "tokens_per_s": round(summary.completion_tokens_per_s, 2), "failed": summary.failed,
            "wall_with_load_s": round(wall, 2), "concurrency": concurrency, "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the packaged Gemma 3 270M GGUF")
    ap.add_argument("--num-lines", type=int, default=500)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=None, help="run-batch lines in flight (default 2x seqs)")
    ap.add_argument("--kv-cache-memory", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-first", action="store_true", help="run the run-batch side first (in round 1)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds, order alternating; the ratio is the median")
    args = ap.parse_args()

    from tokenmill.bench.datasets import load_tokenizer
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME

    load_before = os.getloadavg()[0]
    if args.model is None:
        from tokenmill.model.default_model import default_model_path

        tokenizer = load_tokenizer(default_model_path())  # the GGUF's own tokenizer, as the engine loads it
    else:
        tokenizer = load_tokenizer(args.model)
    prompts = make_prompts(tokenizer, args.num_lines, args.input_len, args.seed)
    rounds: list[tuple[dict, dict]] = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            def batch_side(tmp: str = tmp) -> dict:
                return run_batch_path(args, prompts, args.model or DEFAULT_MODEL_NAME, Path(tmp))

            # Alternate the order (A B, B A, ...) so a load drift on a shared machine hits both sides alike.
            if (r % 2 == 1) != args.batch_first:
                batch, offline = batch_side(), run_offline(args, prompts)
            else:
                offline, batch = run_offline(args, prompts), batch_side()
        rounds.append((offline, batch))
    offline, batch = rounds[len(rounds) // 2]
    same = sum(a == b for a, b in zip(offline.pop("texts"), batch.pop("texts"), strict=True))
    ratios = sorted(b["tokens_per_s"] / o["tokens_per_s"] for o, b in rounds if o["tokens_per_s"])
    ratio = statistics.median(ratios) if ratios else 0.0
    print(json.dumps({
        "model": args.model or DEFAULT_MODEL_NAME, "num_lines": args.num_lines, "input_len": args.input_len,
        "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "batch_first": args.batch_first,
        "offline_llm_generate": offline,
        "run_batch": batch, "ratio_batch_over_offline": round(ratio, 3), "target_ratio": 0.9,
        "ratios_per_round": [round(x, 3) for x in ratios],
        "identical_texts": f"{same}/{args.num_lines}",
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
