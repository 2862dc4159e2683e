"""`tokenmill bench serve` and `tokenmill bench compare`: load-test OpenAI-compatible endpoints.

Flags mirror `vllm bench serve` where they overlap, and `--save-result` writes vLLM's key names, so
scripts written for vLLM's benchmark read tokenmill's results unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tokenmill.bench import options as o

# `bench serve` defaults sized for a CPU: about a minute on 2 cores with the default 270M model (vLLM's own
# defaults, 1000 prompts x 1024 tokens, would run for hours there).
SERVE_NUM_PROMPTS, SERVE_INPUT_LEN, SERVE_OUTPUT_LEN = 32, 128, 64

bench_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,  # see tokenmill/cli.py
                        help="Benchmark OpenAI-compatible endpoints (tokenmill, gateway, vLLM, llama.cpp).")


def _fail(message: str) -> None:
    # One line whatever the terminal width (soft_wrap), and brackets in the message are text, not markup.
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def result_path(result: dict[str, Any], result_filename: str | None, result_dir: str | None) -> Path:
    """vLLM's default name: {backend}-{rate}qps[-concurrency{N}]-{model}-{YYYYMMDD-HHMMSS}.json."""
    if result_filename:
        name = result_filename
    else:
        conc = f"-concurrency{result['max_concurrency']}" if result.get("max_concurrency") else ""
        model = str(result.get("model_id", "model")).rstrip("/").split("/")[-1]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{result.get('label') or result['backend']}-{result['request_rate']}qps{conc}-{model}-{stamp}.json"
    return Path(result_dir or ".") / name


# Keys of vLLM's result file that tokenmill's own `--json` leaves out: `--save-result` writes vLLM's full key
# set (so scripts reading vLLM's files read ours); `--json` keeps tokenmill's schema, pinned by the live test,
# where `label` appears only when given.
_VLLM_FILE_ONLY = ("endpoint_type", "queue_times", "rtfx")


def tokenmill_json(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _VLLM_FILE_ONLY and not (k == "label" and v is None)}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_replace_inf(data), indent=2, default=str))


def _replace_inf(data: Any) -> Any:
    # inf (e.g. --request-rate inf) is not valid JSON; vLLM's files carry it as the string "inf".
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {k: _replace_inf(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_replace_inf(v) for v in data]
    return data


@bench_app.command("serve")
def serve(
    base_url: Annotated[str | None, typer.Option(
        help="Server root, e.g. http://127.0.0.1:8000 (default: http://HOST:PORT).")] = None,
    host: Annotated[str, typer.Option(help="Server host when --base-url is not given.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Server port when --base-url is not given.")] = 8000,
    endpoint: Annotated[str, typer.Option(help="/v1/completions or /v1/chat/completions.")] = "/v1/completions",
    model: o.Model = None,
    tokenizer: o.Tokenizer = None,
    dataset_name: o.DatasetName = "random",
    dataset_path: o.DatasetPath = None,
    random_input_len: o.InputLen = SERVE_INPUT_LEN,
    random_output_len: o.OutputLen = SERVE_OUTPUT_LEN,
    random_range_ratio: o.RangeRatio = 0.0,
    sharegpt_output_len: o.SharegptOutputLen = None,
    num_prompts: o.NumPrompts = SERVE_NUM_PROMPTS,
    max_concurrency: o.MaxConcurrency = None,
    request_rate: o.RequestRate = float("inf"),
    burstiness: o.Burstiness = 1.0,
    num_warmups: o.NumWarmups = 1,
    max_duration: o.MaxDuration = 600.0,
    request_timeout: o.Timeout = 300.0,
    goodput: o.Goodput = None,
    percentile_metrics: o.PercentileMetrics = "ttft,tpot,itl,e2el",
    metric_percentiles: o.MetricPercentiles = "90,99",
    seed: o.Seed = 0,
    ignore_eos: o.IgnoreEos = False,
    api_key: o.ApiKey = None,
    save_result: Annotated[bool, typer.Option(help="Save the result JSON (vLLM's file naming).")] = False,
    label: Annotated[str | None, typer.Option(help="Prefix of the --save-result file name (default: backend).")] = None,
    result_filename: Annotated[str | None, typer.Option(help="File name for --save-result.")] = None,
    result_dir: Annotated[str | None, typer.Option(help="Folder for --save-result.")] = None,
    json_out: o.JsonOut = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="PNG of latency CDFs and throughput (default: bench-MODEL-DATE.png in --result-dir or "
                       "the current folder; its path is printed).")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no PNG.")] = False,
    no_progress: o.NoProgress = False,
) -> None:
    """Load-test one endpoint and print vLLM-style figures (TTFT, TPOT, ITL, E2E, throughput, goodput).

    With no flags it benchmarks `tokenmill serve` at http://127.0.0.1:8000: the model from /v1/models, its
    own tokenizer, and a CPU-sized run (32 prompts of 128 tokens in, 64 out; about a minute on 2 cores with
    the default 270M model). Scale up like vLLM's defaults: --num-prompts 1000 --random-input-len 1024
    --random-output-len 128, and --max-concurrency N for a closed loop.
    """
    from tokenmill.bench.report import print_result
    from tokenmill.bench.runner import run_benchmark
    from tokenmill.bench.server_tokenizer import served_model

    console = Console()
    err = Console(stderr=True, soft_wrap=True)
    url = base_url or f"http://{host}:{port}"
    try:
        cfg = o.make_run_config(
            base_url=url, endpoint=endpoint, model=model, max_concurrency=max_concurrency,
            request_rate=request_rate, burstiness=burstiness, num_warmups=num_warmups, max_duration=max_duration,
            request_timeout=request_timeout, ignore_eos=ignore_eos, seed=seed, api_key=api_key,
            percentile_metrics=percentile_metrics, metric_percentiles=metric_percentiles, goodput=goodput,
            show_progress=not no_progress)
        served = served_model(url, model, _headers(cfg.api_key))
        o.check_fits(served, dataset_name, random_input_len, random_output_len, random_range_ratio)
        cfg = dataclasses.replace(cfg, model=served.id)
        tok, tok_source = o.resolve_tokenizer(tokenizer, model, served, url, cfg.api_key,
                                              remote=dataset_name == "random")
        err.print(f"model {escape(served.id)}; tokenizer: {escape(tok_source or 'none (lengths from usage)')}",
                  highlight=False)
        workload = o.make_workload(
            tokenizer=tok, dataset_name=dataset_name, dataset_path=dataset_path, num_prompts=num_prompts,
            random_input_len=random_input_len, random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, sharegpt_output_len=sharegpt_output_len, seed=seed)
        result = asyncio.run(run_benchmark(cfg, workload, tok))
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
        return
    # Run metadata under the names vLLM's --save-result uses.
    result.update(dataset_name=dataset_name, date=datetime.now().strftime("%Y%m%d-%H%M%S"),
                  tokenizer_id=tok_source, label=label)
    print_result(result, console)
    if save_result or result_filename:
        path = result_path(result, result_filename, result_dir)
        write_json(path, result)
        console.print(f"saved {path}")
    if json_out:
        write_json(json_out, tokenmill_json(result))
    if not no_plot:
        from tokenmill.bench.plot import plot_results

        png = plot or Path(result_dir or ".") / f"bench-{_file_part(result['model_id'])}-{result['date']}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_results({result["model_id"]: result}, str(png))
        console.print(f"plot {png}", highlight=False)


def _headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def _file_part(name: str) -> str:
    # A model id may be a path or hold characters a file name should not.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).rstrip("/").split("/")[-1]) or "model"


@bench_app.command("compare")
def compare(
    endpoint: Annotated[list[str], typer.Option(
        "--endpoint", help="NAME=URL of a server root; repeat for each endpoint (run one after another).")],
    api_endpoint: Annotated[str, typer.Option(help="/v1/completions or /v1/chat/completions.")] = "/v1/completions",
    model: o.Model = None,
    tokenizer: o.Tokenizer = None,
    dataset_name: o.DatasetName = "random",
    dataset_path: o.DatasetPath = None,
    random_input_len: o.InputLen = 128,
    random_output_len: o.OutputLen = 64,
    random_range_ratio: o.RangeRatio = 0.0,
    sharegpt_output_len: o.SharegptOutputLen = None,
    num_prompts: o.NumPrompts = 32,
    max_concurrency: o.MaxConcurrency = 4,
    request_rate: o.RequestRate = float("inf"),
    burstiness: o.Burstiness = 1.0,
    num_warmups: o.NumWarmups = 1,
    max_duration: o.MaxDuration = 600.0,
    request_timeout: o.Timeout = 300.0,
    goodput: o.Goodput = None,
    percentile_metrics: o.PercentileMetrics = "ttft,tpot,itl,e2el",
    metric_percentiles: o.MetricPercentiles = "90,99",
    seed: o.Seed = 0,
    ignore_eos: o.IgnoreEos = True,
    api_key: o.ApiKey = None,
    json_out: o.JsonOut = None,
    plot: o.PlotOut = None,
    no_progress: o.NoProgress = False,
) -> None:
    """Run the same workload against several endpoints, one after another, and print them side by side."""
    from tokenmill.bench.report import print_comparison, print_result, ratio_table
    from tokenmill.bench.runner import run_benchmark

    console = Console()
    targets: dict[str, str] = {}
    for item in endpoint:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            _fail(f"--endpoint: expected NAME=URL, got {item!r}")
        if name in targets:
            _fail(f"--endpoint: name {name!r} given twice")
        targets[name] = url
    if len(targets) < 2:
        _fail("--endpoint: give at least two NAME=URL endpoints to compare")
    results: dict[str, dict[str, Any]] = {}
    try:
        from tokenmill.bench.server_tokenizer import served_model

        # The tokenizer of the first endpoint's model (all endpoints are meant to serve the same model).
        first = next(iter(targets.values()))
        key = api_key or os.environ.get("OPENAI_API_KEY")
        served = served_model(first, model, _headers(key), flag="--endpoint")
        o.check_fits(served, dataset_name, random_input_len, random_output_len, random_range_ratio)
        tok, _ = o.resolve_tokenizer(tokenizer, model, served, first, key, remote=dataset_name == "random")
        # One workload for all endpoints: identical prompts, lengths and arrival times.
        workload = o.make_workload(
            tokenizer=tok, dataset_name=dataset_name, dataset_path=dataset_path, num_prompts=num_prompts,
            random_input_len=random_input_len, random_output_len=random_output_len,
            random_range_ratio=random_range_ratio, sharegpt_output_len=sharegpt_output_len, seed=seed)
        for name, url in targets.items():
            console.print(f"[bold]== {name}[/] {url}")
            cfg = o.make_run_config(
                base_url=url, endpoint=api_endpoint, model=model, max_concurrency=max_concurrency,
                request_rate=request_rate, burstiness=burstiness, num_warmups=num_warmups,
                max_duration=max_duration, request_timeout=request_timeout, ignore_eos=ignore_eos, seed=seed,
                api_key=api_key, percentile_metrics=percentile_metrics, metric_percentiles=metric_percentiles,
                goodput=goodput, show_progress=not no_progress)
            results[name] = asyncio.run(run_benchmark(cfg, workload, tok))
            print_result(results[name], console, title=name)
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))
        return
    print_comparison(results, console)
    if json_out:
        from tokenmill.bench.metrics import summary_keys

        write_json(json_out, {"baseline": next(iter(results)),
                              "endpoints": {n: summary_keys(r) for n, r in results.items()},
                              "ratios": {k: row["ratios"] for k, row in ratio_table(results).items()}})
    if plot:
        from tokenmill.bench.plot import plot_results

        plot_results(results, str(plot))
