"""prompt_logprobs end to end through LLM: equal to transformers' log_softmax at every prompt position,
chunk by chunk, with a cached prefix, top-k and ranks in vLLM's shape."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM
from tokenmill.engine.outputs import PromptLogprobs
from tokenmill.engine.prompt_logprobs import PromptLogprobsCollector, to_logprob_dicts
from tokenmill.sampling_params import SamplingParams

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5, 8, 250, 13, 77, 91, 400, 3, 19, 23, 64, 128, 31, 2, 66]


def _hf_logprobs(ref_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log_softmax of transformers' logits at every position."""
    with torch.no_grad():
        return torch.log_softmax(ref_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check_against(want: torch.Tensor, prompt: list[int], got: list, k: int) -> None:
    assert len(got) == len(prompt)
    assert got[0] is None  # no logits predict the first prompt token
    for pos in range(1, len(prompt)):
        entry, row, tok = got[pos], want[pos - 1], prompt[pos]
        assert tok in entry
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, k + 1))
        assert [lp.logprob for lp in top] == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)
        assert next(iter(entry)) == tok  # vLLM's order: the prompt token first
        assert len(entry) in (k, k + 1)  # the prompt token joins the top-k unless it is among them


@pytest.fixture(scope="module")
def ref(llama_ref):
    return llama_ref.model


@pytest.mark.parametrize("budget", [8, 256])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, ref, budget):
    # budget 8: the 22-token prompt is prefilled in three chunks, each with its own positions' logprobs.
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=128, max_model_len=128,
              max_num_batched_tokens=budget)
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3))
    _check_against(_hf_logprobs(ref, PROMPT), PROMPT, out[0].prompt_logprobs, 3)
    assert out[0].outputs[0].logprobs is None  # prompt_logprobs does not turn on sample logprobs


def test_cached_prefix_still_yields_every_position(tiny_llama_dir, ref):
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=128, max_model_len=128,
              max_num_batched_tokens=8)
    first = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=1))
    assert first[0].prompt_logprobs is None
    plain = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=1))
    assert plain[0].num_cached_tokens >= 16  # the prefix is cached ...
    out = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    assert out[0].num_cached_tokens == 0  # ... but a prompt_logprobs request computes every position
    _check_against(_hf_logprobs(ref, PROMPT), PROMPT, out[0].prompt_logprobs, 2)
    assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_zero_top_k_and_n_samples(llama_llm, ref):
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=3, prompt_logprobs=0)
    out = llama_llm.generate({"prompt_token_ids": PROMPT}, params)[0]
    want = _hf_logprobs(ref, PROMPT)
    assert len(out.prompt_logprobs) == len(PROMPT)  # once per request, not per sample
    for pos in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[pos]
        assert list(entry) == [PROMPT[pos]]  # k=0: the prompt token alone
        assert entry[PROMPT[pos]].logprob == pytest.approx(want[pos - 1, PROMPT[pos]].item(), abs=1e-4)
        assert entry[PROMPT[pos]].decoded_token == llama_llm.get_tokenizer().decode([PROMPT[pos]])
    assert len(out.outputs) == 3 and llama_llm.all_blocks_free()


def test_prompt_logprobs_with_sliding_window_groups(tiny_gemma3_dir):
    """Gemma 3 shapes (sliding + full KV groups), chunked: the same positions as one unchunked prefill."""
    kw = {"dtype": "float32", "block_size": 4, "num_gpu_blocks_override": 128, "max_model_len": 128}
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    whole = LLM(str(tiny_gemma3_dir), max_num_batched_tokens=256, **kw).generate({"prompt_token_ids": PROMPT}, params)
    chunked = LLM(str(tiny_gemma3_dir), max_num_batched_tokens=5, **kw).generate({"prompt_token_ids": PROMPT}, params)
    a, b = whole[0].prompt_logprobs, chunked[0].prompt_logprobs
    assert a[0] is None and b[0] is None and len(a) == len(b) == len(PROMPT)
    for x, y in zip(a[1:], b[1:]):
        assert list(x) == list(y)
        assert [v.logprob for v in x.values()] == pytest.approx([v.logprob for v in y.values()], abs=1e-4)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3"])
def test_prompt_logprobs_validation_names_the_field(bad):
    with pytest.raises(ValueError, match=r"invalid prompt_logprobs=.*must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=bad)


def test_collector_restarts_with_a_recompute_and_fills_token_ids():
    """A preempted sequence is recomputed from position 0: its earlier chunks' rows are replaced, not doubled."""
    c = PromptLogprobsCollector()
    c.expect("r-0")
    c.record(PromptLogprobs("r-0", 0, [-1.0, -2.0], [1, 3], [[5], [6]], [[-1.0], [-0.5]]))
    c.record(PromptLogprobs("r-0", 0, [-1.5, -2.5], [2, 4], [[7], [8]], [[-0.1], [-0.2]]))  # recompute
    c.record(PromptLogprobs("r-0", 2, [-3.0], [1], [[9]], [[-3.0]]))
    c.record(PromptLogprobs("other", 0, [-1.0], [1], [[1]], [[-1.0]]))  # not expected: ignored
    assert c.wants("r-0") and not c.wants("other")
    rows = c.take("r-0", [10, 11, 12, 13])
    assert not c.wants("r-0") and c.take("r-0", [10]) is None  # sent once
    assert rows == [None, [11, -1.5, 2, [[7, -0.1]]], [12, -2.5, 4, [[8, -0.2]]], [13, -3.0, 1, [[9, -3.0]]]]
    dicts = to_logprob_dicts(rows, 1, str)
    assert dicts[0] is None
    assert list(dicts[1]) == [11, 7] and dicts[1][11].rank == 2 and dicts[1][7].rank == 1
    assert list(dicts[3]) == [13, 9] and dicts[3][9].decoded_token == "9"
