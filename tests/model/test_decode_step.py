"""The fused decode step (layers/decode_step.py, kernels/csrc/decode_step.cpp) against the same steps layer by
layer: Gemma 3 (gelu, sandwich norms, q/k norms, sliding and global layers with their own RoPE tables) bit for
bit, also with a bf16 KV cache; Llama and Qwen3 (silu, computed by torch in the layer path) within float32
rounding. Several sequences decode in one step; sliding windows are passed; the fused path is checked to run,
and to stay off where it must (dense weights, LoRA, prefill chunks); verification steps of speculative
decoding run fused too."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.gemma import build_tiny_gemma3
from tests.fixtures.tiny_models import build_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.engine.args import engine_config
from tokenmill.engine.outputs import ScheduledSeq
from tokenmill.kernels.cpu_features import host_cpu_features
from tokenmill.kernels.cpu_kernels import load_cpu_kernels, variants_for
from tokenmill.layers.quantized import INT8_MAX_ROWS

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="native kernels unavailable")

PROMPTS = [[5, 9, 30, 2, 77, 100, 3, 41, 8, 12, 90, 6], [7, 7, 200, 31], [300, 11, 4, 65, 23, 17, 18, 99, 120]]


@pytest.fixture(scope="module")
def models(tmp_path_factory, gguf_cache_dir):
    base = tmp_path_factory.mktemp("decode_step")
    return {
        # sliding window 8 (prompts + outputs pass it), local and global RoPE tables, k = 64 rows
        "gemma3": build_tiny_gemma3(base / "gemma3", seed=5),
        # K-quant rows (256), GQA, silu
        "llama": build_tiny_model(base / "llama", "llama", seed=6, hidden_size=256, intermediate_size=512,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2),
        # q / k norms with silu
        "qwen3": build_tiny_model(base / "qwen3", "qwen3", seed=7),
    }


def _llm(path, quantization: str | None, **kw) -> LLM:
    cfg = engine_config(str(path), dtype="float32", max_model_len=256, quantization=quantization, block_size=4,
                        enable_prefix_caching=False, **kw)  # (a prefix hit changes the prefill: not this test)
    return LLM(config=cfg)


def _fused(llm: LLM):
    return llm.runner.model.model.fused_layers


def _count_calls(llm: LLM) -> list[int]:
    """Wraps the fused kernel to count its calls (the list's one entry)."""
    fused = _fused(llm)
    calls = [0]
    run = fused.kernel.run

    def counted(*a, **k):
        calls[0] += 1
        return run(*a, **k)

    fused.kernel.run = counted
    return calls


def _generate(llm: LLM, max_tokens: int = 24):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _with_and_without(llm: LLM):
    calls = _count_calls(llm)
    fused = _generate(llm)
    assert calls[0] > 0, "the fused step never ran"
    llm.runner.model.model.fused_layers = None
    return fused, _generate(llm)


@pytest.mark.parametrize("kv_dtype", ["auto", "bfloat16"])
def test_gemma3_bit_identical(models, kv_dtype):
    """(q8_0: the tiny Gemma's 64-wide rows do not tile by 256; the llama case covers the K-quants.)"""
    llm = _llm(models["gemma3"], "q8_0", kv_cache_dtype=kv_dtype)
    fused, layered = _with_and_without(llm)
    for (ta, la), (tb, lb) in zip(fused, layered):
        assert ta == tb
        for a, b in zip(la, lb):
            assert {t: v.logprob for t, v in a.items()} == {t: v.logprob for t, v in b.items()}


@pytest.mark.parametrize("arch,quantization", [("llama", "q4_k"), ("llama", "q8_0"), ("qwen3", "q8_0")])
def test_silu_models_match_within_rounding(models, arch, quantization):
    """silu's float32 rounding (native here, torch's in the layer path) then passes through the 8-bit activation
    quantization, where a one-ulp difference now and then lands on the other side of a rounding step: one
    quantum, which moved a logprob by 0.012 once (a 25-row prefill on 8-bit activations left that history). So:
    the same tokens, nearly every logprob within float32 rounding, none off by more than a few quanta."""
    llm = _llm(models[arch], quantization)
    fused, layered = _with_and_without(llm)
    diffs = []
    for (ta, la), (tb, lb) in zip(fused, layered):
        assert ta == tb
        for a, b in zip(la, lb):
            assert a.keys() == b.keys()
            diffs += [abs(a[t].logprob - b[t].logprob) for t in a]
    diffs.sort()
    assert diffs[len(diffs) * 9 // 10] < 1e-4 and diffs[-1] < 0.05, (diffs[len(diffs) // 2], diffs[-1])


VARIANTS = [v.name for v in variants_for(host_cpu_features())]  # every kernel variant this CPU runs
WIDE = list(range(41, 57))  # 1 + 15 drafts: 16 queries, metadata.MAX_DECODE_QUERIES


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [[[40], [41], [42]], [[40], [41, 42, 43], [44]], [[40], WIDE, [60]]],
                         ids=["decodes", "verifying", "verifying-wide"])
def test_one_decode_step_hidden_states(models, tokens, variant, monkeypatch):
    """One step straight through the model: three decodes, or a sequence verifying 2 (or 15: 18 rows in all, more
    than 16) drafts among two decodes (1 + k queries over its K/V): fused == layer by layer, every element (gelu),
    in every kernel variant this CPU runs (the narrower ones take the scalar int8 paths)."""
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", variant)
    llm = _llm(models["gemma3"], "q8_0")
    assert llm.runner.cpu_kernels.variant == variant
    runner = llm.runner
    decoder = runner.model.model
    ids, pos, ctx, _ = runner._prepare(_decode_batch(runner, tokens))
    with torch.inference_mode():
        x = decoder.embed_tokens(ids) * torch.tensor(decoder.embed_scale)
        fused = decoder.fused_layers(x, pos, ctx)
        assert fused is not None
        layered = x
        for layer in decoder.layers:
            layered = layer(pos, layered, ctx)
    torch.testing.assert_close(fused, layered, atol=0, rtol=0)


def _decode_batch(runner, tokens: list[list[int]]):
    """Sequences at positions 20, 9 and 33 (made-up K/V history in blocks 1.. of every group) with these tokens."""
    seqs, next_block = [], 1
    for i, (p, ids) in enumerate(zip([20, 9, 33], tokens)):
        blocks = list(range(next_block, next_block + (p + len(ids)) // 4 + 1))
        next_block += len(blocks)
        seqs.append(ScheduledSeq(seq_id=f"s{i}", token_ids=ids, start_pos=p,
                                 block_ids=[blocks] * len(runner.kv_cache_groups), sample=True))
    for k, v in runner.kv_caches:
        torch.manual_seed(0)
        k.normal_()
        v.normal_()
    return seqs


def test_stays_off_for_dense_weights_lora_and_prefill(models):
    assert _fused(_llm(models["gemma3"], None)) is None  # dense weights: the panel / PyTorch layers
    llm = _llm(models["gemma3"], "q8_0")
    # a prompt's first chunk beside a decode: layer by layer
    seqs = _decode_batch(llm.runner, [[40], [41]])
    seqs[1] = ScheduledSeq(seq_id="p", token_ids=[7, 8, 9], start_pos=0, block_ids=[[50]] * len(seqs[0].block_ids),
                           sample=True)
    ids, pos, ctx, _ = llm.runner._prepare(seqs)
    with torch.inference_mode():
        decoder = llm.runner.model.model
        assert decoder.fused_layers(decoder.embed_tokens(ids), pos, ctx) is None
        # caches of another dtype than the kernel reads: off, on every call (the verdict is remembered)
        ids, pos, ctx, _ = llm.runner._prepare(_decode_batch(llm.runner, [[40], [41]]))
        ctx.kv_caches = [(k.half(), v.half()) for k, v in ctx.kv_caches]
        x = decoder.embed_tokens(ids)
        assert decoder.fused_layers(x, pos, ctx) is None and decoder.fused_layers(x, pos, ctx) is None
    # more rows than INT8_MAX_ROWS (33: two sequences verifying 15 drafts each beside a decode): layer by layer
    llm = _llm(models["gemma3"], "q8_0")
    ids, pos, ctx, _ = llm.runner._prepare(_decode_batch(llm.runner, [WIDE, list(range(60, 76)), [80]]))
    assert ids.numel() == INT8_MAX_ROWS + 1
    with torch.inference_mode():
        decoder = llm.runner.model.model
        assert decoder.fused_layers(decoder.embed_tokens(ids), pos, ctx) is None
    lora = _llm(models["gemma3"], "q8_0", enable_lora=True, max_lora_rank=8)
    assert _fused(lora) is None  # adapters wrap the projections
