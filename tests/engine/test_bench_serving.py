"""benchmarks/serving.py's offline baseline at a concurrency: a closed loop over the real engine that keeps
at most C requests in flight and still completes every prompt (the like-for-like figure for serving at C)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("concurrency", [1, 3, 16])
def test_closed_loop_keeps_at_most_c_in_flight_and_finishes_all(bench, llama_llm, concurrency):
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(6, 500) for _ in range(rng.randrange(3, 20))] for _ in range(7)]
    engine = llama_llm.engine
    in_flight: list[int] = []
    step = engine.step

    def counting_step():
        in_flight.append(len(engine.scheduler.requests))
        return step()

    engine.step = counting_step
    try:
        result = bench.run_offline_closed_loop(llama_llm, prompts, output_len=4, concurrency=concurrency)
    finally:
        del engine.step
    assert result["output_tokens"] == 4 * len(prompts)
    assert result["concurrency"] == concurrency
    assert max(in_flight) == min(concurrency, len(prompts))
    assert not engine.has_unfinished()
    assert llama_llm.all_blocks_free()

