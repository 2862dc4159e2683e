"""Speculative decoding end to end on the tiny fixture model: outputs identical with and without speculation
(greedy, seeded sampling, logprobs, stops, max_tokens, n > 1, structured output) across chunked prefill, prefix
hits and preemption, with many rejected drafts and no leaked KV block."""

import dataclasses
import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import SpeculativeConfig
from tokenmill.engine.args import engine_config
from tokenmill.sampling_params import StructuredOutputsParams as S

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3,
                          disable_by_batch_size=None)  # every batch size: the tests batch several prompts


def _llm(model_dir, spec: SpeculativeConfig | None, **kw) -> LLM:
    cfg = engine_config(str(model_dir), dtype="float32", max_model_len=kw.pop("max_model_len", 256), **kw)
    return LLM(config=dataclasses.replace(cfg, speculative=spec))


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    """Random prompts whose second half repeats their first: n-gram lookup finds matches in them."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        half = [rng.randrange(6, 500) for _ in range(max(1, n // 2))]
        out.append((half + half)[:n])
    return out


def _run(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in r.outputs] for r in outs]


def _assert_speculated(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st.spec_num_draft_tokens > 0, "no draft was verified: the test did not exercise speculation"
    assert 0 < st.spec_num_accepted_tokens < st.spec_num_draft_tokens, "wanted both accepted and rejected drafts"
    assert llm.all_blocks_free(), "KV blocks leaked"


CASES = {
    "plain": {"block_size": 16},
    "small_budget_chunked": {"block_size": 4, "max_num_batched_tokens": 6, "enable_chunked_prefill": True},
    "no_prefix_cache": {"block_size": 4, "enable_prefix_caching": False},
    "preemption": {"block_size": 4, "num_gpu_blocks_override": 24, "max_num_batched_tokens": 64},
}


@pytest.mark.parametrize("case", list(CASES))
def test_ngram_greedy_identical(case, tiny_llama_dir):
    prompts = _prompts(1, [3, 17, 40, 9, 28, 33])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    base = _run(_llm(tiny_llama_dir, None, **CASES[case]), prompts, params)
    spec_llm = _llm(tiny_llama_dir, NGRAM, **CASES[case])
    assert _run(spec_llm, prompts, params) == base
    _assert_speculated(spec_llm)
    if case == "preemption":
        assert spec_llm.engine.stats().num_preemptions > 0


def test_prefix_hits_with_speculation(tiny_llama_dir):
    shared = _prompts(2, [24])[0]
    prompts = [shared + [7, 8], shared + [9], shared + [10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    base = _run(_llm(tiny_llama_dir, None, block_size=4), prompts, params)
    spec_llm = _llm(tiny_llama_dir, NGRAM, block_size=4)
    got = [_run(spec_llm, [p], params)[0] for p in prompts]  # one at a time: later ones hit the cache
    assert got == base
    assert spec_llm.engine.stats().prefix_cache_hits > 0
    _assert_speculated(spec_llm)


def test_stops_and_max_tokens_inside_accepted_runs(tiny_llama_dir):
    prompts = _prompts(3, [20, 31, 12, 26])
    base_llm, spec_llm = _llm(tiny_llama_dir, None), _llm(tiny_llama_dir, NGRAM)
    free = _run(base_llm, prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    # stop on tokens and text that the greedy outputs reach mid-way
    stop_ids = sorted({o[0][0][12] for o in free} | {o[0][0][25] for o in free})
    stop_text = [o[0][1][10:13] for o in free if len(o[0][1]) > 14][:2]
    cases = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 5, 7, 13)]
    cases += [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=stop_ids),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=stop_text),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=stop_text,
                             include_stop_str_in_output=True)]
    for params in cases:
        assert _run(spec_llm, prompts, params) == _run(base_llm, prompts, params), params
    _assert_speculated(spec_llm)


def test_seeded_sampling_n_and_logprobs_identical(tiny_llama_dir):
    """A seeded row draws from a generator seeded by its output index, with or without drafts, and verification
    accepts a draft exactly when the row's own sample equals it: seeded outputs are identical too."""
    prompts = _prompts(4, [15, 22, 9])
    params = SamplingParams(n=3, temperature=0.7, top_k=3, seed=7, max_tokens=30, ignore_eos=True, logprobs=2)
    base_llm, spec_llm = _llm(tiny_llama_dir, None), _llm(tiny_llama_dir, NGRAM)
    base = base_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    spec = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for a, b in zip(base, spec):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            assert len(y.logprobs) == len(y.token_ids)
            for la, lb in zip(x.logprobs, y.logprobs):
                assert la.keys() == lb.keys()
                assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
    _assert_speculated(spec_llm)


SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "integer", "maximum": 99}},
          "required": ["a", "b"]}


def test_structured_output_with_speculation(tiny_llama_dir):
    prompts = _prompts(5, [10, 14, 18, 12])
    constraints = [S(json=SCHEMA), S(regex=r"(ab|cd){2,6}"), S(choice=["yes", "no", "maybe so"]), S(json_object=True)]
    params = [SamplingParams(temperature=t, seed=3, max_tokens=120, structured_outputs=c)
              for c, t in zip(constraints, (0.0, 1.0, 1.0, 0.0))]
    base = _run(_llm(tiny_llama_dir, None, max_model_len=512), prompts, params)
    spec_llm = _llm(tiny_llama_dir, NGRAM, max_model_len=512)
    assert _run(spec_llm, prompts, params) == base
    assert spec_llm.engine.stats().spec_num_draft_tokens > 0
    assert spec_llm.all_blocks_free()


def test_disable_by_batch_size(tiny_llama_dir):
    spec = dataclasses.replace(NGRAM, disable_by_batch_size=2)
    prompts = _prompts(6, [20, 24, 28])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = _llm(tiny_llama_dir, spec)
    assert _run(llm, prompts, params) == _run(_llm(tiny_llama_dir, None), prompts, params)
    assert llm.engine.stats().spec_num_drafts == 0, "three sequences decode together: above the bound"
    _run(llm, prompts[:1], params)
    assert llm.engine.stats().spec_num_drafts > 0


def test_penalties_get_no_drafts_and_stay_exact(tiny_llama_dir):
    prompts = _prompts(7, [20, 11])
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True, repetition_penalty=1.3)
    llm = _llm(tiny_llama_dir, NGRAM)
    assert _run(llm, prompts, params) == _run(_llm(tiny_llama_dir, None), prompts, params)
    assert llm.engine.stats().spec_num_drafts == 0


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory):
    """A different random model with the same tokenizer and vocabulary: a draft that is mostly wrong."""
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other_llama"), "llama", seed=11, num_hidden_layers=1)


@pytest.mark.parametrize("draft", ["self", "other"])
def test_draft_model_greedy_identical(draft, tiny_llama_dir, other_llama_dir):
    path = tiny_llama_dir if draft == "self" else other_llama_dir
    spec = SpeculativeConfig(method="draft_model", model=str(path), num_speculative_tokens=3,
                             disable_by_batch_size=None)
    prompts = _prompts(8, [5, 19, 33, 12])
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    case = {"block_size": 4, "num_gpu_blocks_override": 40, "max_num_batched_tokens": 32}  # chunked, preempting
    base = _run(_llm(tiny_llama_dir, None, **case), prompts, params)
    llm = _llm(tiny_llama_dir, spec, **case)
    assert _run(llm, prompts, params) == base
    st = llm.engine.stats()
    assert st.spec_num_draft_tokens > 0
    if draft == "self":  # the target drafting for itself: every draft is its own greedy token
        assert st.spec_num_accepted_tokens == st.spec_num_draft_tokens
    else:
        assert st.spec_num_accepted_tokens < st.spec_num_draft_tokens / 2
    assert llm.all_blocks_free()
    llm.engine.step()  # hands the last finished sequences to the runner, which releases their draft blocks
    kv = llm.runner.proposer.kv
    assert kv.num_free_blocks == kv.capacity_blocks, "draft KV blocks leaked"


def test_streaming_delivers_several_tokens_per_chunk(tiny_llama_dir):
    """AsyncLLM streams the accepted run of a step as one delta; the concatenated deltas equal the offline output."""
    import asyncio

    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.inproc_client import InProcessCoreClient
    from tokenmill.executor.model_runner import ModelRunner

    cfg = dataclasses.replace(engine_config(str(tiny_llama_dir), dtype="float32", max_model_len=256, block_size=4),
                              speculative=NGRAM)
    prompt = _prompts(9, [30])[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def stream():
        engine = AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))
        try:
            return [out.outputs[0] async for out in engine.generate({"prompt_token_ids": prompt}, params, "r")]
        finally:
            await engine.shutdown()

    chunks = asyncio.run(stream())
    expected = _run(_llm(tiny_llama_dir, None, block_size=4), [prompt], params)[0][0]
    assert [t for c in chunks for t in c.token_ids] == expected[0]
    assert "".join(c.text for c in chunks) == expected[1]
    assert max(len(c.token_ids) for c in chunks) > 1, "no step emitted an accepted run"
