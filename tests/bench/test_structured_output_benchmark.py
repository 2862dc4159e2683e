"""benchmarks/structured_output.py on a tiny random model: every part runs, and what it checks holds
(constrained outputs never fail, unconstrained greedy tokens do not change beside constrained ones, the
masked argmax is always a token the grammar accepts)."""

from __future__ import annotations

import pytest

from benchmarks import structured_output as bench


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    import tokenmill

    return tokenmill.LLM(str(tiny_llama_dir), max_model_len=64, max_num_seqs=4, kv_cache_memory=0.05,
                         enable_prefix_caching=False)


def prompts(n: int, length: int) -> list[list[int]]:
    return [[1] + [10 + (7 * i + 3 * j) % 200 for j in range(length - 1)] for i in range(n)]


def test_throughput_part(llm):
    r = bench.throughput(llm, prompts(8, 12), output_len=10, fraction=0.5, repeats=1)
    assert r["num_constrained"] == 4 and r["num_requests"] == 8
    assert r["unconstrained"]["runs"][0][1] == 8 * 10  # ignore_eos: every unconstrained request runs to the end
    assert r["throughput_ratio"] > 0
    reasons = r["constrained_outputs"]["finish_reasons"]
    assert sum(reasons.values()) == 4 and "error" not in reasons
    valid, stopped = r["constrained_outputs"]["stopped_and_valid"].split("/")
    assert valid == stopped  # every constrained output that finished validates against the schema
    assert r["unconstrained_greedy_identical_fraction"] == 1.0


def test_ttft_part_reports_compiles(llm):
    r = bench.ttft_figures(llm, prompts(1, 12)[0], repeats=1)
    assert r["first_constrained_request"]["compile_s"] > 0  # the core compiled and reported it
    assert r["new_schema"]["compile_s_median"] > 0
    for key in ("first_constrained_request", "new_schema", "repeated_schema"):
        assert "overhead_ms" in r[key]


def test_mask_part_masked_argmax_is_always_accepted(llm):
    width = llm.engine.scheduler.structured.logits_width
    r = bench.mask_cost(llm.get_tokenizer(), batch=4, steps=6, width=width)
    assert r["batch"] == 4 and r["logits_width"] == width and 1 <= r["steps_timed"] <= 6
