"""Greedy outputs through LLM + the real ModelRunner are token-for-token identical to transformers generate()."""

import random

import pytest

from tokenmill import LLM, SamplingParams

MAX_NEW = 10


def _prompts(seed: int, lengths: list[int], prefix_len: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(6, 500) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(6, 500) for _ in range(n)] for n in lengths]


def _check(llm: LLM, ref, prompts: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == ref.greedy(p, MAX_NEW), f"prompt of {len(p)} tokens diverged"
        assert o.outputs[0].finish_reason == "length"
    assert llm.all_blocks_free(), "blocks leaked"


CASES = {
    "bs16_chunked": dict(block_size=16, enable_chunked_prefill=True, max_num_batched_tokens=2048),
    "bs1_chunked_small_budget": dict(block_size=1, enable_chunked_prefill=True, max_num_batched_tokens=16),
    "bs16_no_chunking": dict(block_size=16, enable_chunked_prefill=False, max_num_batched_tokens=64),
    "bs4_no_prefix_cache": dict(block_size=4, enable_prefix_caching=False, max_num_batched_tokens=24),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(case, tiny_llama_dir, llama_ref):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, num_gpu_blocks_override=512 if "bs1" in case else 64,
              **CASES[case])
    _check(llm, llama_ref, _prompts(1, [3, 17, 40, 9, 28]))


def test_greedy_matches_transformers_qwen2(tiny_qwen2_dir, qwen2_ref):
    llm = LLM(str(tiny_qwen2_dir), dtype="float32", max_model_len=256, block_size=8, max_num_batched_tokens=32)
    _check(llm, qwen2_ref, _prompts(2, [5, 33, 12]))


def test_greedy_under_forced_preemption(tiny_llama_dir, llama_ref):
    # 5 sequences of up to 50 tokens need ~60 blocks of 4; 20 blocks force preemption by recompute
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=20,
              max_num_batched_tokens=64)
    _check(llm, llama_ref, _prompts(3, [30, 12, 25, 40, 18]))
    assert llm.engine.stats().num_preemptions > 0


def test_greedy_with_prefix_cache_hits(tiny_llama_dir, llama_ref):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=128)
    prompts = _prompts(4, [3, 9, 14, 1], prefix_len=21)
    _check(llm, llama_ref, prompts[:1])  # warms the cache with the shared prefix
    hits_before = llm.engine.stats().prefix_cache_hits
    _check(llm, llama_ref, prompts)
    st = llm.engine.stats()
    assert st.prefix_cache_hits - hits_before >= 4 * 20  # each prompt reuses the 5 full prefix blocks
    assert st.prefix_cache_queries >= st.prefix_cache_hits


def test_greedy_sliding_window_gemma3(tiny_gemma3_dir):
    """Sliding-window KV groups: blocks released outside the window and prefix hits stay correct."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gemma3_dir), dtype=torch.float32).eval()
    llm = LLM(str(tiny_gemma3_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=24,
              max_num_batched_tokens=16)
    assert any(g.sliding_window for g in llm.runner.kv_cache_groups)
    prompts = _prompts(5, [30, 7, 22], prefix_len=12)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for _ in range(2):  # second round hits the prefix cache
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        for p, o in zip(prompts, outs):
            t = torch.tensor([p])
            with torch.no_grad():
                exp = ref.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_NEW,
                                   min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            assert o.outputs[0].token_ids == exp
        assert llm.all_blocks_free()
    st = llm.engine.stats()
    assert st.prefix_cache_hits > 0 and st.num_preemptions > 0


def test_text_prompts_and_prompt_too_long(tiny_llama_dir, llama_llm):
    tok = llama_llm.get_tokenizer()
    outs = llama_llm.generate(["Hello world", "The quick brown fox"], SamplingParams(temperature=0, max_tokens=4))
    assert outs[0].prompt == "Hello world" and outs[0].prompt_token_ids == tok("Hello world")["input_ids"]
    assert len(outs[1].outputs[0].token_ids) <= 4
    with pytest.raises(ValueError, match="max_model_len=256"):
        llama_llm.generate({"prompt_token_ids": [5] * 300})
    assert llama_llm.all_blocks_free()


def test_gemma3_sliding_group_holds_only_window_blocks(tiny_gemma3_dir):
    from tokenmill.engine.outputs import NULL_BLOCK_ID
    from tokenmill.engine.request import EngineCoreRequest

    llm = LLM(str(tiny_gemma3_dir), dtype="float32", max_model_len=256, block_size=4, num_gpu_blocks_override=64)
    core = llm.engine
    groups = llm.runner.kv_cache_groups
    gi = next(i for i, g in enumerate(groups) if g.sliding_window)
    core.add_request(EngineCoreRequest("w", list(range(10, 50)), SamplingParams(max_tokens=4, ignore_eos=True)))
    core.step()
    core.step()
    tables = core.scheduler.kv.tables["w#0"]
    window_blocks = groups[gi].sliding_window // 4 + 2
    assert sum(b != NULL_BLOCK_ID for b in tables[gi]) <= window_blocks < len(tables[gi])
    assert NULL_BLOCK_ID not in tables[1 - gi]  # the full-attention group keeps everything
    while core.has_unfinished():
        core.step()
    assert llm.all_blocks_free()
