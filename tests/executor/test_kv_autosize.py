"""KV cache auto-sizing on a model with two KV groups (tiny Gemma 3: full attention + an 8-token window)."""

import pytest

from tests.fixtures.gemma import TINY_GEMMA_WINDOW
from tokenmill import LLM, SamplingParams
from tokenmill.engine.core import EngineCore

# Per group: 2 layers x K and V x 2 KV heads x 32 dims x 4 bytes = 1 KiB per token, 4 KiB per 4-token block.
BLOCK_BYTES = 4 * 1024
TIGHT = {"dtype": "float32", "block_size": 4, "max_num_seqs": 4, "max_num_batched_tokens": 32}


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 500 + 3 for j in range(length)] for i in range(n)]


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_auto_size_gives_the_window_group_only_what_it_can_use(tiny_gemma3_dir):
    llm = LLM(str(tiny_gemma3_dir), max_model_len=256, **TIGHT)
    groups = [g.sliding_window for g in llm.runner.kv_cache_groups]
    assert groups == [TINY_GEMMA_WINDOW, None]
    # window group: 4 sequences x (2 window blocks + 1 being filled) + a 32-token chunk (8 blocks) + 1, + null
    # full group: 4 sequences x 256 tokens, + null
    assert llm.runner.num_blocks == [4 * 3 + 8 + 1 + 1, 4 * 64 + 1]
    tensors = [t for pair in llm.runner.kv_caches for t in pair]
    assert [t.shape[0] for t in tensors[::2]] == [22, 257, 22, 257]
    assert llm.runner.kv_cache_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert llm.engine.kv_capacity_tokens() == 256 * 4


@pytest.fixture(scope="module")
def roomy(tiny_gemma3_dir):
    return LLM(str(tiny_gemma3_dir), max_model_len=256, num_gpu_blocks_override=512, **TIGHT)


def test_tight_cache_with_window_smaller_than_prompts_matches_a_roomy_one(tiny_gemma3_dir, roomy):
    budget_gib = (71 + 22) * BLOCK_BYTES / (1 << 30)  # 70 full blocks (280 tokens) and the window group's 21
    tight = LLM(str(tiny_gemma3_dir), max_model_len=256, kv_cache_memory=budget_gib, **TIGHT)
    assert tight.runner.num_blocks == [22, 71]
    prompts = _prompts(4, 60)  # 240 prompt tokens at once against 84 tokens of window blocks
    want = _greedy(roomy, prompts, 20)
    assert _greedy(tight, prompts, 20) == want
    assert _greedy(tight, [list(range(3, 203))], 30) == _greedy(roomy, [list(range(3, 203))], 30)
    assert tight.all_blocks_free()


def test_window_pool_smaller_than_window_plus_chunk_runs_exactly(tiny_gemma3_dir, roomy):
    # The engine sees 5 window blocks (20 tokens) per sequence pool: less than the window (8) plus one 32-token
    # chunk, so each prefill is cut to what the pool holds after the blocks that slid out are released.
    llm = LLM(str(tiny_gemma3_dir), max_model_len=256, num_gpu_blocks_override=512, **TIGHT)
    llm.runner.num_blocks = [6, 512]
    llm.engine = EngineCore(llm.config, llm.runner)
    prompts = [list(range(3, 63)), list(range(100, 145))]
    assert _greedy(llm, prompts, 12) == _greedy(roomy, prompts, 12)
    assert llm.all_blocks_free()


def test_max_model_len_must_fit_the_cache(tiny_gemma3_dir):
    small = 80 * BLOCK_BYTES / (1 << 30)  # 2 null blocks, the window group's 21, 57 full blocks: 228 tokens
    with pytest.raises(ValueError, match=r"max_model_len=256.*lower --max-model-len to at most 228.*--kv-cache-memory"):
        LLM(str(tiny_gemma3_dir), max_model_len=256, kv_cache_memory=small, **TIGHT)
    llm = LLM(str(tiny_gemma3_dir), kv_cache_memory=small, **TIGHT)  # the model's own limit (512) is lowered
    assert llm.loaded.max_model_len == llm.engine.max_model_len == 228
    with pytest.raises(ValueError, match="more than max_model_len=228"):
        llm.generate([list(range(3, 253))], SamplingParams(max_tokens=1))
