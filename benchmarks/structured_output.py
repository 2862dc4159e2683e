"""Structured output on the default model (Gemma 3 270M GGUF): what constrained decoding costs. Prints JSON.

Three figures, each with its baseline measured in the same run:
1. throughput: a W1-shaped batch (64 requests x 256 prompt tokens, up to 128 out, greedy, concurrency 32 =
   max_num_seqs) with half the requests under a JSON schema, vs the same batch with no constraint; output
   tokens/s ratio (target >= 0.85). The schema is compiled before the timed runs (it is one schema: the
   grammar cache serves the other 31). Also: how many constrained outputs finished and validate, and
   whether the unconstrained half gave the same greedy tokens with and without constrained neighbours.
2. TTFT (one 256-token prompt, max_tokens=1, alone): unconstrained, the very first constrained request
   (builds xgrammar's TokenizerInfo for the 262k vocabulary), a new schema (compile), a repeated schema
   (grammar cache: no compile); overheads in ms and % of the unconstrained TTFT, with the core's own
   compile seconds for each.
3. mask cost per step at batch 32 on the 262,144-wide logits: the engine's StructuredOutputManager.bitmask()
   (xgrammar's batched fill_next_token_bitmask over 32 matchers) + apply_bitmask on [32, 262144] float32
   logits, matchers advanced by the masked argmax each step. Needs only the tokenizer (--mask-only).

    python benchmarks/structured_output.py                         # all three (several minutes on 2 cores)
    python benchmarks/structured_output.py --mask-only             # 3. only (no model weights loaded)
    python benchmarks/structured_output.py --num-requests 16 --output-len 32 --ttft-repeats 2   # quick

Timings on a shared machine are noisy: compare the ratios of one run (--repeats for medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.default_model_throughput import make_prompts

# A record an extraction client might ask for: bounded strings and lists, so a greedy 270M model can finish.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 48},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 6},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 240},
    },
    "required": ["title", "keywords", "rating", "summary"],
    "additionalProperties": False,
}


def variant(i: int) -> dict[str, Any]:
    """SCHEMA with a renamed property: a schema the grammar cache has not seen."""
    props = dict(SCHEMA["properties"])
    props[f"note_{i}"] = props.pop("summary")
    return {**SCHEMA, "properties": props, "required": ["title", "keywords", "rating", f"note_{i}"]}


def ms(s: float) -> float:
    return round(s * 1000.0, 2)


# ---- 3. mask cost -------------------------------------------------------------------------------------
def gguf_tokenizer(path: str) -> Any:
    from tokenmill.model.cache_dir import file_hash
    from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(path, file_hash(path))


def mask_cost(tok: Any, batch: int, steps: int, width: int) -> dict[str, Any]:
    import torch

    from tokenmill.sampling_params import StructuredOutputsParams
    from tokenmill.structured_output.manager import (
        StructuredOutputManager,
        apply_bitmask,
    )

    stop = [t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")) if isinstance(t, int)]
    mgr = StructuredOutputManager(tok, width, stop)
    t0 = time.perf_counter()
    mgr.submit("r", StructuredOutputsParams(json=SCHEMA))
    ready: dict[str, Any] = {}
    while not ready:
        mgr.wait(1.0)
        ready, failed = mgr.poll()
        if failed:
            raise RuntimeError(failed["r"])
    first_compile_s = time.perf_counter() - t0  # includes TokenizerInfo for the whole vocabulary
    ids = [f"s{i}" for i in range(batch)]
    for sid in ids:
        assert mgr.add_seq(sid, ready["r"], stop, []) is None
    g = torch.Generator().manual_seed(0)
    fill, apply, positions = [], [], {sid: 0 for sid in ids}
    live = list(ids)
    for _ in range(steps):
        if not live:
            break
        logits = torch.randn(len(live), width, generator=g)
        t0 = time.perf_counter()
        mask = mgr.bitmask(live)
        t1 = time.perf_counter()
        apply_bitmask(logits, mask)
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
        for sid, token in zip(list(live), logits.argmax(-1).tolist()):
            assert mgr.accept(sid, token, positions[sid]) is None  # the mask only lets grammar tokens through
            positions[sid] += 1
            if mgr.is_terminated(sid):
                live.remove(sid)
    full = [f + a for f, a in zip(fill, apply)]
    return {"batch": batch, "logits_width": width, "steps_timed": len(fill),
            "first_compile_with_tokenizer_info_s": round(first_compile_s, 3),
            "fill_bitmask_ms_median": ms(statistics.median(fill)),
            "apply_bitmask_ms_median": ms(statistics.median(apply)),
            "per_step_ms_median": ms(statistics.median(full)),
            "per_step_ms_p90": ms(sorted(full)[int(0.9 * (len(full) - 1))])}


# ---- 1. and 2. on the engine -------------------------------------------------------------------------
def compile_stats(llm: Any) -> tuple[int, float]:
    s = llm.engine.stats()
    return s.num_grammar_compiles, s.grammar_compile_seconds_sum


def timed_ttft(llm: Any, prompt: list[int], params: Any) -> tuple[float, float]:
    """(seconds for one request with max_tokens=1, the core's compile seconds it caused)."""
    n0, c0 = compile_stats(llm)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": prompt}], params)
    elapsed = time.perf_counter() - t0
    assert out[0].outputs[0].finish_reason != "error", out[0].outputs[0]
    n1, c1 = compile_stats(llm)
    return elapsed, (c1 - c0) if n1 > n0 else 0.0


def ttft_figures(llm: Any, prompt: list[int], repeats: int) -> dict[str, Any]:
    from tokenmill import SamplingParams
    from tokenmill.sampling_params import StructuredOutputsParams

    def one(schema: dict | None) -> tuple[float, float]:
        so = StructuredOutputsParams(json=schema) if schema is not None else None
        return timed_ttft(llm, prompt, SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=so))

    first = one(variant(-1))  # the first constrained request of the process
    new = [one(SCHEMA)]  # SCHEMA is new here; from now on the grammar cache holds it
    plain, repeated = [], []
    for i in range(repeats):  # interleaved, so a slow spell hits all three
        plain.append(one(None)[0])
        new.append(one(variant(i)))
        repeated.append(one(SCHEMA))
    base = statistics.median(plain)
    # Overheads pair each constrained request with the unconstrained one beside it: a slow spell of a
    # shared machine then moves both (new[0], the SCHEMA warm-up, pairs with plain[0] too).
    new_d = statistics.median(t - p for (t, _), p in zip(new, [plain[0], *plain]))
    rep_d = statistics.median(t - p for (t, _), p in zip(repeated, plain))
    new_s, rep_s = base + new_d, base + rep_d
    return {
        "unconstrained_ttft_s": round(base, 4),
        "first_constrained_request": {"ttft_s": round(first[0], 4), "compile_s": round(first[1], 4),
                                      "overhead_ms": ms(first[0] - plain[0])},
        "new_schema": {"ttft_s": round(new_s, 4), "compile_s_median": round(statistics.median(c for _, c in new), 4),
                       "overhead_ms": ms(new_s - base), "overhead_pct_of_ttft": round(100 * (new_s - base) / base, 1)},
        "repeated_schema": {"ttft_s": round(rep_s, 4),
                            "compile_s_median": round(statistics.median(c for _, c in repeated), 5),
                            "overhead_ms": ms(rep_s - base),
                            "overhead_pct_of_ttft": round(100 * (rep_s - base) / base, 1)},
        "repeats": repeats,
    }


def throughput(llm: Any, prompts: list[list[int]], output_len: int, fraction: float, repeats: int) -> dict[str, Any]:
    from tokenmill import SamplingParams
    from tokenmill.sampling_params import StructuredOutputsParams

    free = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)  # W1's requests
    json_p = SamplingParams(temperature=0.0, max_tokens=output_len,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    step = max(1, round(1 / fraction)) if fraction > 0 else len(prompts) + 1
    constrained = [i % step == step - 1 for i in range(len(prompts))]  # interleaved: mixed in every step
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], json_p)  # compile (and cache) the schema first

    def run(mixed: bool) -> tuple[float, list[Any]]:
        params = [json_p if (mixed and c) else free for c in constrained]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return time.perf_counter() - t0, outs

    plain_t, mixed_t = [], []
    for _ in range(repeats):
        t, plain_outs = run(False)
        plain_t.append((t, sum(len(o.outputs[0].token_ids) for o in plain_outs)))
        t, mixed_outs = run(True)
        mixed_t.append((t, sum(len(o.outputs[0].token_ids) for o in mixed_outs)))
    plain_tps = statistics.median(n / t for t, n in plain_t)
    mixed_tps = statistics.median(n / t for t, n in mixed_t)
    con = [o.outputs[0] for o, c in zip(mixed_outs, constrained) if c]
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids
            for a, b, c in zip(plain_outs, mixed_outs, constrained) if not c]
    return {
        "num_requests": len(prompts), "num_constrained": sum(constrained), "prompt_len": len(prompts[0]),
        "max_output_len": output_len, "repeats": repeats,
        "unconstrained": {"output_tok_s": round(plain_tps, 1), "runs": [[round(t, 2), n] for t, n in plain_t]},
        "half_json_schema": {"output_tok_s": round(mixed_tps, 1), "runs": [[round(t, 2), n] for t, n in mixed_t]},
        # per round (the two runs back to back), then the median: a loaded spell skews both runs of a round
        "round_ratios": [round((nm / tm) / (np_ / tp), 3) for (tp, np_), (tm, nm) in zip(plain_t, mixed_t)],
        "throughput_ratio": round(statistics.median((nm / tm) / (np_ / tp)
                                                    for (tp, np_), (tm, nm) in zip(plain_t, mixed_t)), 3),
        "target_ratio": 0.85,
        "constrained_outputs": validity(con),
        "unconstrained_greedy_identical_fraction": round(sum(same) / max(1, len(same)), 3),
    }


def validity(outs: list[Any]) -> dict[str, Any]:
    """Finish reasons and schema validity of the constrained outputs (a "length" one is cut, not invalid)."""
    import jsonschema

    reasons: dict[str, int] = {}
    valid = 0
    for o in outs:
        reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
        if o.finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(o.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    stopped = reasons.get("stop", 0)
    return {"finish_reasons": reasons, "stopped_and_valid": f"{valid}/{stopped}",
            "mean_output_tokens": round(statistics.mean(len(o.token_ids) for o in outs), 1) if outs else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file; default: the packaged Gemma 3 270M")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32, help="max_num_seqs")
    ap.add_argument("--constrained-fraction", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved (unconstrained, mixed) rounds; medians")
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--mask-batch", type=int, default=32)
    ap.add_argument("--mask-steps", type=int, default=64)
    ap.add_argument("--mask-only", action="store_true", help="only the per-step mask cost (tokenizer, no weights)")
    ap.add_argument("--skip-mask", action="store_true")
    args = ap.parse_args()

    import torch

    from tokenmill.model.default_model import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = args.model or default_model_path()
    result: dict[str, Any] = {"model": Path(path).name, "threads": torch.get_num_threads()}
    if not args.mask_only:
        import tokenmill

        llm = tokenmill.LLM(path, max_model_len=args.prompt_len + args.output_len + 16, kv_cache_memory=1.0,
                            max_num_seqs=args.concurrency, enable_prefix_caching=False)
        prompts = make_prompts(args.num_requests, args.prompt_len, llm.loaded.vocab_size)
        width = llm.engine.scheduler.structured.logits_width
        result["logits_width"] = width
        from tokenmill import SamplingParams

        llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
        result["ttft"] = ttft_figures(llm, prompts[0], args.ttft_repeats)
        print(json.dumps({"partial": result}), file=sys.stderr, flush=True)  # survives a later timeout
        result["throughput"] = throughput(llm, prompts, args.output_len, args.constrained_fraction, args.repeats)
        print(json.dumps({"partial": result}), file=sys.stderr, flush=True)
        del llm
    if not args.skip_mask:
        width = result.get("logits_width", 262_144)
        result["mask_cost"] = mask_cost(gguf_tokenizer(path), args.mask_batch, args.mask_steps, width)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
