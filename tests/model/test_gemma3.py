"""Tiny random Gemma 3 through tokenmill.LLM: greedy output token-for-token identical to transformers with
chunked prefill, preemption and prefix caching, prompts longer than the sliding window (8)."""

import random

import pytest
import torch

from tests.fixtures.gemma import TINY_GEMMA_WINDOW, prefill_logits
from tokenmill import LLM, SamplingParams

MAX_NEW = 12


@pytest.fixture(scope="module")
def hf_gemma(tiny_gemma3_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gemma3_dir), dtype=torch.float32).eval()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(seed: int, lengths: list[int], prefix_len: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(6, 500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(6, 500) for _ in range(n)] for n in lengths]


def _run(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


CASES = {
    "chunked_bs4": dict(block_size=4, max_num_batched_tokens=16, num_gpu_blocks_override=128),
    "no_chunking_bs16": dict(block_size=16, enable_chunked_prefill=False, max_num_batched_tokens=128,
                             num_gpu_blocks_override=64),
    "preemption_bs2": dict(block_size=2, max_num_batched_tokens=24, num_gpu_blocks_override=40),
    "bs1_no_prefix_cache": dict(block_size=1, enable_prefix_caching=False, max_num_batched_tokens=32,
                                num_gpu_blocks_override=400),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, tiny_gemma3_dir, hf_gemma):
    llm = LLM(str(tiny_gemma3_dir), dtype="float32", max_model_len=256, **CASES[case])
    prompts = _prompts(7, [3, 29, 9, 40, 17])
    assert max(map(len, prompts)) > TINY_GEMMA_WINDOW
    assert _run(llm, prompts) == [_hf_greedy(hf_gemma, p, MAX_NEW) for p in prompts]
    assert llm.all_blocks_free()
    if case.startswith("preemption"):
        assert llm.engine.stats().num_preemptions > 0


def test_prefix_cache_hits_with_sliding_window(tiny_gemma3_dir, hf_gemma):
    llm = LLM(str(tiny_gemma3_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=96,
              max_num_batched_tokens=32)
    prompts = _prompts(8, [5, 13, 2], prefix_len=20)
    want = [_hf_greedy(hf_gemma, p, MAX_NEW) for p in prompts]
    assert _run(llm, prompts[:1]) == want[:1]
    before = llm.engine.stats().prefix_cache_hits
    assert _run(llm, prompts) == want
    assert llm.engine.stats().prefix_cache_hits - before >= 3 * 16
    assert llm.all_blocks_free()


def test_layer_kinds_and_kv_groups(tiny_gemma3_dir):
    llm = LLM(str(tiny_gemma3_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=16)
    groups = [(g.layer_ids, g.sliding_window) for g in llm.runner.kv_cache_groups]
    assert groups == [([0, 2], TINY_GEMMA_WINDOW), ([1, 3], None)]
    model = llm.runner.model
    assert model.kv_layer_shapes() == [(2, 32)] * 4
    assert model.model.layers[0].self_attn.rotary is model.model.rotary_local
    assert model.model.layers[1].self_attn.rotary is model.model.rotary_global
    assert model.model.layers[0].self_attn.attn.scale == pytest.approx(24 ** -0.5)


def test_logits_match_transformers_in_bfloat16(tiny_gemma3_dir):
    """bf16 path: sqrt(hidden) rounded to bf16 and (1 + w) norms in fp32, as transformers does."""
    from transformers import AutoModelForCausalLM

    from tokenmill.config import ModelConfig
    from tokenmill.model.loader import load_model

    ids = _prompts(9, [20])[0]
    ours = load_model(ModelConfig(model=str(tiny_gemma3_dir), dtype="bfloat16"))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3_dir), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours.model, ids)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
