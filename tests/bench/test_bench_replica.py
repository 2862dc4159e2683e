"""The load generator against the test replica (known token counts, injected failures, time bound)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from tokenmill.bench.cli import bench_app
from tokenmill.bench.datasets import build_workload, load_tokenizer
from tokenmill.bench.runner import RunConfig, run_benchmark


def _workload(tok_dir: Path, n: int, inp: int = 24, out: int = 12):
    tok = load_tokenizer(str(tok_dir))
    return tok, build_workload("random", tokenizer=tok, num_prompts=n, dataset_path=None, input_len=inp,
                               output_len=out, range_ratio=0.0, seed=0)


def test_counts_match_the_replica_exactly(replica_url: str, bench_tokenizer_dir: Path) -> None:
    tok, reqs = _workload(bench_tokenizer_dir, 12)
    cfg = RunConfig(base_url=replica_url, max_concurrency=4, show_progress=False, max_duration_s=60)
    r = asyncio.run(run_benchmark(cfg, reqs, tok))
    assert r["completed"] == 12 and r["failed"] == 0 and r["num_unsent"] == 0
    assert r["total_input_tokens"] == 12 * 24  # server usage agrees with the local tokenizer
    assert r["total_output_tokens"] == 12 * 12
    assert all(len(itl) == 11 for itl in r["itls"])  # one event per token after the first
    assert r["model_id"] == "replica-a"
    assert 1 <= r["max_concurrent_requests"] <= 4


def test_chat_custom_dataset_and_failures_are_counted(replica_url: str, bench_tokenizer_dir: Path,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    prompts = ["the quick brown fox", "<<fail>> please", "serving models", "tokens stream back", "<<fail>>"]
    path.write_text("".join(json.dumps({"prompt": p, "output_len": 4}) + "\n" for p in prompts))
    tok = load_tokenizer(str(bench_tokenizer_dir))
    reqs = build_workload("custom", tokenizer=tok, num_prompts=10, dataset_path=str(path), input_len=1,
                          output_len=1, range_ratio=0.0, seed=0)
    cfg = RunConfig(base_url=replica_url, endpoint="/v1/chat/completions", max_concurrency=3, num_warmups=0,
                    show_progress=False, max_duration_s=60)
    r = asyncio.run(run_benchmark(cfg, reqs, tok))
    expected_failed = sum("<<fail>>" in q.prompt for q in reqs)
    assert expected_failed == 4  # the 5 prompts cycled twice
    assert r["failed"] == expected_failed and r["completed"] == 10 - expected_failed
    assert all(("HTTP 500" in e) == ("<<fail>>" in q.prompt) for e, q in zip(r["errors"], reqs))
    assert r["total_output_tokens"] == 4 * r["completed"] and r["output_lens"].count(0) == expected_failed
    assert r["backend"] == "openai-chat"


def test_max_duration_bounds_the_run(replica_url: str, bench_tokenizer_dir: Path) -> None:
    tok, reqs = _workload(bench_tokenizer_dir, 50, out=200)
    # 200 tokens at 2 ms each is 0.4 s a request, one at a time: 50 of them cannot finish in 1 s.
    cfg = RunConfig(base_url=replica_url, max_concurrency=1, num_warmups=0, show_progress=False,
                    max_duration_s=1.0)
    r = asyncio.run(run_benchmark(cfg, reqs, tok))
    assert r["duration"] < 10
    assert r["completed"] < 50
    assert r["completed"] + r["failed"] + r["num_unsent"] == 50
    assert any(e.startswith("cancelled: --max-duration") for e in r["errors"])


def test_cli_poisson_rate_json_and_plot(replica_url: str, bench_tokenizer_dir: Path, tmp_path: Path) -> None:
    out, png, saved = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "res"
    res = CliRunner().invoke(bench_app, [
        "serve", "--base-url", replica_url, "--tokenizer", str(bench_tokenizer_dir), "--num-prompts", "10",
        "--random-input-len", "16", "--random-output-len", "8", "--request-rate", "20", "--burstiness", "0.5",
        "--goodput", "ttft:5000 tpot:1000", "--metric-percentiles", "50,90,99", "--json", str(out),
        "--plot", str(png), "--save-result", "--result-dir", str(saved), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "Successful requests" in res.output and "P99 TTFT (ms)" in res.output
    r = json.loads(out.read_text())
    assert r["completed"] == 10 and r["request_goodput"] > 0
    assert r["median_ttft_ms"] == r["p50_ttft_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = list(saved.glob("openai-20.0qps-replica-a-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["completed"] == 10


def test_cli_errors_name_the_flag(replica_url: str, bench_tokenizer_dir: Path) -> None:
    runner = CliRunner()
    # A server without /tokenize (this replica) and a model that is not on this machine: no tokenizer.
    res = runner.invoke(bench_app, ["serve", "--base-url", replica_url, "--dataset-name", "random",
                                    "--num-prompts", "2"])
    assert res.exit_code == 2 and "--tokenizer" in res.output and "/tokenize answered HTTP 404" in res.output
    res = runner.invoke(bench_app, ["serve", "--tokenizer", str(bench_tokenizer_dir), "--max-concurrency", "0"])
    assert res.exit_code == 2 and "--max-concurrency" in res.output
    res = runner.invoke(bench_app, ["compare", "--endpoint", "a=http://x"])
    assert res.exit_code == 2 and "at least two" in res.output
