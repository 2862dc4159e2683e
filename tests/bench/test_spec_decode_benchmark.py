"""benchmarks/spec_decode.py on the tiny random Llama: the comparison runs both engines on the same prompts,
the greedy tokens agree, and the acceptance figures are vLLM's (rate = accepted / draft tokens, mean
accepted length = 1 + accepted / drafts)."""

from __future__ import annotations

import pytest

from benchmarks import spec_decode as bench


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    import tokenmill

    kw = {"max_model_len": 256, "max_num_seqs": 4, "kv_cache_memory": 0.05, "enable_prefix_caching": False}
    base = tokenmill.LLM(str(tiny_llama_dir), **kw)
    spec = tokenmill.LLM(str(tiny_llama_dir), speculative_config={**bench.DEFAULT_SPEC, "disable_by_batch_size": None},
                         **kw)
    return base, spec


def test_acceptance_figures_are_vllms():
    got = bench.acceptance([(4, 16, 6), (2, 8, 2)])
    assert got == {"drafts": 6, "draft_tokens": 24, "accepted_tokens": 8, "acceptance_rate": round(8 / 24, 3),
                   "mean_accepted_length": round(1 + 8 / 6, 3)}
    assert bench.acceptance([(0, 0, 0)])["acceptance_rate"] is None


def test_compare_runs_both_engines_and_counts_the_drafts(engines):
    from tokenmill import SamplingParams

    base, spec = engines
    # A repeated phrase: the n-gram proposer finds its continuation in the prompt.
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    r = bench.compare(base, spec, [prompt, "Hello world! " * 8], SamplingParams(temperature=0.0, max_tokens=12),
                      repeats=2)
    assert r["greedy_identical"] is True
    assert r["output_tokens"] > 0 and r["without_tok_s"] > 0 and r["with_tok_s"] > 0
    assert len(r["round_speedups"]) == 2
    assert r["drafts"] > 0 and 0 <= r["accepted_tokens"] <= r["draft_tokens"]  # the spec engine drafted
    assert r["acceptance_rate"] == round(r["accepted_tokens"] / r["draft_tokens"], 3)
    assert 1.0 <= r["mean_accepted_length"] <= 1 + bench.DEFAULT_SPEC["num_speculative_tokens"]
    before = bench.spec_counts(base)
    bench.timed(base, [prompt], SamplingParams(temperature=0.0, max_tokens=4))
    assert bench.spec_counts(base) == before == (0, 0, 0)  # the baseline never speculates


def test_w1_part_reports_its_shape(engines):
    base, spec = engines
    r = bench.w1(base, spec, num_requests=4, prompt_len=16, output_len=6, repeats=1)
    assert (r["num_requests"], r["prompt_len"], r["output_len"], r["concurrency"]) == (4, 16, 6, 4)
    assert r["output_tokens"] == 4 * 6  # ignore_eos: every request runs to the end
    assert r["greedy_identical"] is True and r["throughput_ratio"] == r["speedup"] > 0
    assert r["disable_by_batch_size"] is None
