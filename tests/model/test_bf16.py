"""bf16 end to end on the fixture models: its logits bounded against the float32 path (the exact one).

bf16 keeps 8 significant bits, so logits move by a few hundredths; the bounds below are a few times what these
models show (measured when written: max |logit diff| 0.02-0.06 at logit std 0.65, mean KL 1e-5-6e-5) and far below what a broken
path gives (a wrong rounding, layout or cache read moves logits by O(1)). Every bf16 path is checked: the
native kernels (bf16-weight panel GEMM where the CPU has no native bf16, oneDNN where it has), the plain
PyTorch path without kernels, and a bf16 KV cache under a float32 model.
"""

from __future__ import annotations

import pytest
import torch

from tests.model.harness import run_requests
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.executor.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams

PROMPTS = [
    [1, 17, 42, 99, 7, 300, 12, 5, 8, 250, 13, 77, 91, 400, 3, 19, 23, 64, 128],
    [1, 200, 201, 202, 9],
    [1, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333, 444],
]
STEPS = 6


def _step_logits(folder, dtype: str, kv_cache_dtype: str = "auto") -> list[tuple[list[int], list[torch.Tensor]]]:
    """Per prompt (run alone: prefill in chunks of 4, then greedy decodes), the sampled tokens and the float32
    logits of each sampled position, captured from compute_logits."""
    cfg = EngineConfig(model=ModelConfig(model=str(folder), dtype=dtype, device="cpu"),
                       cache=CacheConfig(block_size=4, kv_cache_dtype=kv_cache_dtype, num_gpu_blocks_override=64))
    runner = ModelRunner(cfg)
    captured: list[torch.Tensor] = []
    compute = runner.model.compute_logits

    def capture(hidden, out=None):
        logits = compute(hidden, out)
        captured.append(logits[0].clone())
        return logits

    runner.model.compute_logits = capture
    rows = []
    for prompt in PROMPTS:
        captured.clear()
        out = run_requests(runner, [prompt], [SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)],
                           chunk=4)[0]
        rows.append(([t.token_id for t in out], list(captured)))
    return rows


def _compare(want, got) -> dict[str, float]:
    """Logits at the positions both runs reached with the same context: up to and including the first step
    where their greedy tokens differ (later steps condition on different tokens)."""
    w_rows, g_rows = [], []
    for (w_tokens, w_logits), (g_tokens, g_logits) in zip(want, got):
        for i in range(len(w_tokens)):
            w_rows.append(w_logits[i])
            g_rows.append(g_logits[i])
            if w_tokens[i] != g_tokens[i]:
                break
    w, g = torch.stack(w_rows).double(), torch.stack(g_rows).double()
    kl = (w.softmax(-1) * (w.log_softmax(-1) - g.log_softmax(-1))).sum(-1)
    return {"max_abs": float((w - g).abs().max()), "mean_kl": float(kl.mean()), "positions": len(w_rows),
            "greedy_agree": float((w.argmax(-1) == g.argmax(-1)).double().mean()), "scale": float(w.std())}


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_gemma3_dir"])
def test_bf16_logits_stay_close_to_float32(request, fixture, monkeypatch):
    folder = request.getfixturevalue(fixture)
    want = _step_logits(folder, "float32")
    native = _step_logits(folder, "bfloat16")
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", "0")
    plain = _step_logits(folder, "bfloat16")
    for name, got in (("native kernels", native), ("PyTorch", plain)):
        stats = _compare(want, got)
        assert stats["mean_kl"] < 5e-4, (name, stats)
        assert stats["max_abs"] < 0.1 * max(1.0, stats["scale"]), (name, stats)
        assert stats["greedy_agree"] >= 0.8, (name, stats)
    # the two bf16 paths compute the same roundings in float32 (up to summation order): closer still
    both = _compare(plain, native)
    assert both["max_abs"] < 0.1 * max(1.0, both["scale"]), both


def test_bf16_kv_cache_under_a_float32_model(tiny_llama_dir):
    want = _step_logits(tiny_llama_dir, "float32")
    got = _step_logits(tiny_llama_dir, "float32", kv_cache_dtype="bfloat16")
    stats = _compare(want, got)
    assert 0 < stats["max_abs"] < 0.02 * max(1.0, stats["scale"]), stats  # rounded K/V: close, not identical
    assert stats["mean_kl"] < 1e-3 and stats["greedy_agree"] >= 0.9, stats


def test_bf16_model_uses_bf16_layouts(tiny_gemma3_dir):
    """On this CPU's bf16 path: every linear prepared (no float32 copies left), the caches in bf16."""
    cfg = EngineConfig(model=ModelConfig(model=str(tiny_gemma3_dir), dtype="bfloat16", device="cpu"),
                       cache=CacheConfig(num_gpu_blocks_override=16))
    runner = ModelRunner(cfg)
    linears = [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(getattr(m, "_cpu_ready", False) for m in linears)
    assert all(p.dtype == torch.bfloat16 for p in runner.model.parameters())
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in runner.kv_caches)
    # lazily zeroed (calloc'd) caches still read as zeros everywhere, the null block 0 included
    assert all(not k.any() and not v.any() for k, v in runner.kv_caches)
    out = run_requests(runner, PROMPTS[:1], [SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)])[0]
    assert len(out) == 3 and all(torch.isfinite(torch.tensor(t.logprob)) for t in out)
