"""Runner vs transformers on tiny random models: greedy tokens equal, logprobs within 1e-4 (fp32)."""

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
MAX_TOKENS = 10


_GREEDY_CACHE: dict = {}


def _transformers_greedy(folder, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    key = (str(folder), tuple(prompt), max_tokens)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = _generate(folder, prompt, max_tokens)
    return _GREEDY_CACHE[key]


def _generate(folder, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    model = _hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, lps


_HF_CACHE: dict = {}


def _hf_model(folder):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 (heavy import, only when needed)

    key = str(folder)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _HF_CACHE[key]


def _runner(folder, block_size: int, backend: str = "fast") -> ModelRunner:
    cfg = EngineConfig(model=ModelConfig(model=str(folder), dtype="float32", device="cpu"),
                       cache=CacheConfig(block_size=block_size, num_gpu_blocks_override=400 // block_size + 8))
    return ModelRunner(cfg, attn_backend=backend)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_llama3_dir"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_mixed_batch_greedy_matches_transformers(request, fixture, block_size):
    folder = request.getfixturevalue(fixture)
    runner = _runner(folder, block_size)
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3, ignore_eos=True) for _ in PROMPTS]
    # Staggered arrivals + chunk 4: steps mix a prefilling chunk with decoding sequences.
    outs = run_requests(runner, PROMPTS, params, chunk=4, arrivals=[0, 2, 5])
    for prompt, out in zip(PROMPTS, outs):
        want_tokens, want_lps = _transformers_greedy(folder, prompt, MAX_TOKENS)
        assert [t.token_id for t in out] == want_tokens
        for t, lp in zip(out, want_lps):
            assert abs(t.logprob - lp) < 1e-4
            assert t.rank == 1  # greedy picks the top token of the raw distribution (no penalties)
            assert t.top_logprobs[0][0] == t.token_id and len(t.top_logprobs) == 3


def test_reference_backend_matches_transformers(tiny_llama_dir):
    runner = _runner(tiny_llama_dir, 4, backend="reference")
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True) for _ in PROMPTS[:2]]
    outs = run_requests(runner, PROMPTS[:2], params, chunk=3, arrivals=[0, 1])
    for prompt, out in zip(PROMPTS[:2], outs):
        assert [t.token_id for t in out] == _transformers_greedy(tiny_llama_dir, prompt, 6)[0]


def test_logits_match_transformers_full_prompt(tiny_qwen3_dir):
    """One-shot prefill: the last-position logits equal transformers' within fp32 noise."""
    runner = _runner(tiny_qwen3_dir, 16)
    prompt = PROMPTS[0]
    out = run_requests(runner, [prompt], [SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)], chunk=100)[0]
    with torch.no_grad():
        ref = torch.log_softmax(_hf_model(tiny_qwen3_dir)(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top = ref.topk(5)
    assert [tid for tid, _ in out[0].top_logprobs] == top.indices.tolist()
    assert max(abs(lp - r) for (_, lp), r in zip(out[0].top_logprobs, top.values.tolist())) < 1e-4


def test_runner_drops_finished_state_and_rejects_unknown(tiny_llama_dir):
    from tokenmill.engine.outputs import ScheduledSeq, SchedulerOutput

    runner = _runner(tiny_llama_dir, 16)
    run_requests(runner, [PROMPTS[1]], [SamplingParams(temperature=0.0, max_tokens=2)])
    runner.execute(SchedulerOutput([], finished_seq_ids=["s0"]))
    assert runner.states == {}
    with pytest.raises(KeyError, match="without setup"):
        runner.execute(SchedulerOutput([ScheduledSeq("zz", [5], 3, [[1]], True)]))


def test_kv_budget_sizes_blocks(tiny_llama_dir):
    cfg = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir), dtype="float32", max_model_len=256),
                       cache=CacheConfig(block_size=16, kv_cache_memory=0.001))
    runner = ModelRunner(cfg)
    # 2 layers x K,V x 16 tokens x 2 heads x 16 dims x 4 bytes = 8 KiB per block; the budget holds every block,
    # the null block 0 included: 0.001 GiB / 8 KiB = 131 blocks in all.
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    assert runner.num_blocks == [int(0.001 * (1 << 30) / per_block)]
    assert runner.kv_caches[0][0].shape == (runner.num_blocks[0], 16, 2, 16)
    assert len(runner.kv_cache_groups) == 1 and runner.kv_cache_groups[0].layer_ids == [0, 1]
