"""Benchmark arithmetic against hand-computed values (vLLM's definitions)."""

from __future__ import annotations

import pytest

from tokenmill.bench.client import RequestResult, SSEDecoder
from tokenmill.bench.metrics import calculate_result, parse_goodput, peak_concurrency, token_timeline
from tokenmill.bench.runner import arrival_offsets


def _req(start: float, ttft: float, itl: list[float], tokens: int, prompt: int = 10) -> RequestResult:
    return RequestResult(success=True, prompt_len=prompt, output_tokens=tokens, num_chunks=len(itl) + 1,
                         ttft=ttft, itl=itl, latency=ttft + sum(itl), start_time=start)


def test_hand_computed_two_requests_and_a_failure() -> None:
    a = _req(0.0, 0.100, [0.010, 0.030], tokens=3)  # e2e 0.140, tpot (0.140-0.100)/2 = 0.020
    b = _req(0.5, 0.300, [0.050], tokens=2)  # e2e 0.350, tpot 0.050
    failed = RequestResult(error="HTTP 500", prompt_len=10)
    r = calculate_result([a, b, failed], duration_s=2.0, tokenizer=None,
                         percentile_metrics=["ttft", "tpot", "itl", "e2el"], percentiles=[50.0, 99.0],
                         goodput={"ttft": 200.0})
    assert r["completed"] == 2 and r["failed"] == 1
    assert r["total_input_tokens"] == 20 and r["total_output_tokens"] == 5
    assert r["request_throughput"] == pytest.approx(1.0)
    assert r["output_throughput"] == pytest.approx(2.5)
    assert r["total_token_throughput"] == pytest.approx(12.5)
    assert r["request_goodput"] == pytest.approx(0.5)  # only a meets ttft <= 200 ms
    assert r["mean_ttft_ms"] == pytest.approx(200.0)
    assert r["median_ttft_ms"] == pytest.approx(200.0)
    assert r["std_ttft_ms"] == pytest.approx(100.0)
    assert r["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)
    assert r["mean_tpot_ms"] == pytest.approx(35.0)
    assert r["mean_itl_ms"] == pytest.approx(30.0)  # (10 + 30 + 50) / 3
    assert r["median_itl_ms"] == pytest.approx(30.0)
    assert r["mean_e2el_ms"] == pytest.approx(245.0)
    assert r["p50_e2el_ms"] == pytest.approx(245.0)
    assert r["output_lens"] == [3, 2, 0]
    assert r["max_concurrent_requests"] == 1  # a ends at 0.14, b starts at 0.5


def test_one_token_request_has_no_tpot_but_counts_zero_for_goodput() -> None:
    a = _req(0.0, 0.1, [], tokens=1)
    r = calculate_result([a], 1.0, None, ["tpot"], [99.0], {"tpot": 1.0})
    assert r["mean_tpot_ms"] == 0.0  # numpy over [0] as vLLM does
    assert r["request_goodput"] == pytest.approx(1.0)
    assert "mean_ttft_ms" not in r  # only the selected metrics


def test_output_len_falls_back_to_chunks_without_usage_or_tokenizer() -> None:
    a = _req(0.0, 0.1, [0.01, 0.01], tokens=0)
    r = calculate_result([a], 1.0, None, [], [], {})
    assert r["total_output_tokens"] == 3 and r["request_goodput"] is None


def test_peak_concurrency_and_timeline() -> None:
    rs = [_req(0.0, 0.5, [0.5], 2), _req(0.2, 0.5, [0.5], 2), _req(1.0, 0.1, [], 1)]
    assert peak_concurrency(rs) == 2  # the third starts when the first ends (half-open)
    t, tps = token_timeline(rs)
    assert sum(tps) == 5 and t[0] == 0.0


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500 tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad, field in [("ttft500", "NAME:MILLISECONDS"), ("itl:5", "one of"), ("ttft:x", "number"),
                       ("ttft:-1", ">= 0")]:
        with pytest.raises(ValueError, match=field):
            parse_goodput([bad])


def test_arrivals_mean_rate_and_burstiness() -> None:
    assert arrival_offsets(4, float("inf"), 1.0, 0) == [0.0] * 4
    times = arrival_offsets(200, 10.0, 1.0, 0)
    assert times == sorted(times) and times[-1] == pytest.approx(20.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    regular = arrival_offsets(200, 10.0, 50.0, 0)
    rgaps = [b - a for a, b in zip(regular, regular[1:])]
    spread = lambda g: max(g) - min(g)  # noqa: E731
    assert spread(rgaps) < spread(gaps)  # high burstiness value = more uniform arrivals


def test_sse_decoder_handles_split_events_and_comments() -> None:
    d = SSEDecoder()
    assert d.feed('data: {"a"') == []
    assert d.feed(': 1}\n\n: ping\n\ndata: [DO') == ['{"a": 1}']
    assert d.feed("NE]\r\n\r\n") == ["[DONE]"]
