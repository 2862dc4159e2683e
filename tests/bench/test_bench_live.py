"""`tokenmill bench serve` / `compare` against a live `tokenmill serve` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from typer.testing import CliRunner

from tokenmill.bench.cli import bench_app

# The saved result's schema: vLLM's key names (plus tokenmill's run settings). Scripts depend on these.
STABLE_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
    "max_concurrent_requests", "input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times",
    "generated_texts", "errors", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "base_url", "endpoint", "num_unsent", "goodput_config", "dataset_name", "date",
    "tokenizer_id",
} | {f"{stat}_{m}_ms" for stat in ("mean", "median", "std", "p50", "p90", "p99")
     for m in ("ttft", "tpot", "itl", "e2el")}


def test_bench_serve_live(live_server: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "live.json", tmp_path / "live.png"
    res = CliRunner().invoke(bench_app, [
        "serve", "--base-url", live_server, "--model", "tiny", "--tokenizer", str(tiny_llama_dir),
        "--dataset-name", "random", "--random-input-len", "24", "--random-output-len", "8",
        "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos", "--goodput", "e2el:600000",
        "--metric-percentiles", "50,90,99", "--max-duration", "90", "--json", str(out), "--plot", str(png),
        "--no-progress"])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert set(r) == STABLE_KEYS
    # counts add up
    assert r["completed"] == 12 and r["failed"] == 0 and r["num_unsent"] == 0
    assert r["output_lens"] == [8] * 12  # ignore_eos: every request generates max_tokens
    assert r["total_output_tokens"] == sum(r["output_lens"]) == 96
    assert r["total_input_tokens"] == sum(r["input_lens"])
    assert all(24 <= n <= 25 for n in r["input_lens"])  # the server may add a BOS token
    assert all(len(itl) <= 7 for itl in r["itls"])  # tokens may arrive batched in one event
    assert r["request_goodput"] == r["request_throughput"]  # a 10-minute SLO is always met
    assert r["output_throughput"] * r["duration"] == pytest.approx(96)
    # percentiles ordered, means within range
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 <= r[f"p50_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"], m
        assert r[f"median_{m}_ms"] == r[f"p50_{m}_ms"]
    lat = [x * 1000 for x in r["latencies"]]
    assert min(lat) <= r["mean_e2el_ms"] <= max(lat)
    assert all(t <= e for t, e in zip(r["ttfts"], r["latencies"]))
    assert r["mean_ttft_ms"] > 0 and r["mean_tpot_ms"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_live_endpoints(live_server: str, replica_url: str, tiny_llama_dir: Path,
                                    tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(bench_app, [
        "compare", "--endpoint", f"tokenmill={live_server}", "--endpoint", f"replica={replica_url}",
        "--tokenizer", str(tiny_llama_dir), "--random-input-len", "16", "--random-output-len", "8",
        "--num-prompts", "8", "--max-concurrency", "4", "--max-duration", "60", "--json", str(out),
        "--no-progress"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Side by side" in res.output and "replica/tokenmill" in res.output
    side_by_side = res.output.split("Side by side", 1)[1]
    row = next(line for line in side_by_side.splitlines() if "Output token throughput" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert len(cells) == 4 and cells[3].endswith("x")  # metric, tokenmill, replica, ratio
    data = json.loads(out.read_text())
    assert data["baseline"] == "tokenmill"
    assert set(data["endpoints"]) == {"tokenmill", "replica"}
    for name in ("tokenmill", "replica"):
        assert data["endpoints"][name]["completed"] == 8
    tm, rp = data["endpoints"]["tokenmill"], data["endpoints"]["replica"]
    assert data["ratios"]["output_throughput"]["replica"] == pytest.approx(
        rp["output_throughput"] / tm["output_throughput"])
    assert data["ratios"]["output_throughput"]["tokenmill"] == 1.0
