"""Typer options shared by `bench serve` and `bench compare`, named as `vllm bench serve` names them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tokenmill.bench.datasets import SampleRequest, build_workload, load_tokenizer
from tokenmill.bench.metrics import (
    METRIC_NAMES,
    parse_goodput,
    parse_list,
    parse_percentiles,
)
from tokenmill.bench.runner import RunConfig
from tokenmill.bench.server_tokenizer import (
    ServedModel,
    ServerTokenizer,
    local_model_path,
)

Model = Annotated[str | None, typer.Option(help="Model name sent in requests; default: the first of GET /v1/models.")]
Tokenizer = Annotated[str | None, typer.Option(
    help="A tokenizer folder (HF format) or a .gguf file, for exact prompt lengths. Default: the served "
         "model's own (its folder or .gguf when on this machine, else through the server's /tokenize).")]
DatasetName = Annotated[str, typer.Option(help="random | custom (JSONL with a 'prompt' field) | sharegpt.")]
DatasetPath = Annotated[str | None, typer.Option(help="File for --dataset-name custom / sharegpt.")]
InputLen = Annotated[int, typer.Option(help="random: prompt tokens per request (vLLM default 1024).")]
OutputLen = Annotated[int, typer.Option(help="random/custom: max_tokens per request (vLLM default 128).")]
RangeRatio = Annotated[float, typer.Option(
    help="random: lengths drawn uniformly from [len*(1-r), len*(1+r)]; 0 gives fixed lengths.")]
SharegptOutputLen = Annotated[int | None, typer.Option(
    help="sharegpt: fixed output length instead of the recorded answer's length.")]
NumPrompts = Annotated[int, typer.Option(help="Number of requests in the run (the count bound).")]
MaxConcurrency = Annotated[int | None, typer.Option(help="At most this many requests in flight.")]
RequestRate = Annotated[float, typer.Option(
    help="Mean arrivals per second (gamma process); inf sends all at once, limited by --max-concurrency.")]
Burstiness = Annotated[float, typer.Option(
    help="Gamma shape of arrival gaps: 1 = Poisson, <1 burstier, >1 more regular.")]
NumWarmups = Annotated[int, typer.Option(help="Warm-up requests (first prompt) sent before timing starts.")]
MaxDuration = Annotated[float, typer.Option(
    help="Time bound in seconds: arrivals stop and in-flight requests are cancelled (counted failed).")]
Goodput = Annotated[list[str] | None, typer.Option(
    help="SLOs in ms for goodput, e.g. --goodput 'ttft:500 tpot:50' (names: ttft, tpot, e2el); repeatable.")]
PercentileMetrics = Annotated[str, typer.Option(
    help=f"Comma list from {','.join(METRIC_NAMES)} (vLLM's default leaves out e2el).")]
MetricPercentiles = Annotated[str, typer.Option(
    help="Comma list of percentiles to report, e.g. 50,90,99 (vLLM's default is 99 alone).")]
Seed = Annotated[int, typer.Option(help="Seed for the workload and the arrival times.")]
IgnoreEos = Annotated[bool, typer.Option(help="Send ignore_eos so every request generates its full length.")]
ApiKey = Annotated[str | None, typer.Option(help="Bearer token; default: env OPENAI_API_KEY.")]
Timeout = Annotated[float, typer.Option(help="Per-request timeout in seconds.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the result JSON here.")]
PlotOut = Annotated[Path | None, typer.Option("--plot", help="Write a PNG of latency CDFs and throughput here.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")]


def resolve_tokenizer(tokenizer: str | None, model: str | None, served: ServedModel | None = None,
                      base_url: str | None = None, api_key: str | None = None,
                      remote: bool = False) -> tuple[Any | None, str | None]:
    """(tokenizer, where it came from): --tokenizer; else --model or the served model's root when it is a
    model on this machine (resolved like `tokenmill serve` does); else, with `remote`, the server's
    /tokenize; else (None, None): prompt lengths then come from the server's usage reports."""
    if tokenizer:
        return load_tokenizer(tokenizer), tokenizer
    for name in (model, served.root if served else None):
        path = local_model_path(name)
        if path is not None:
            return load_tokenizer(path), path
    if remote and served is not None and base_url:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        return ServerTokenizer(base_url, served.id, headers), f"{base_url.rstrip('/')}/tokenize"
    return None, None


def check_fits(served: ServedModel, dataset_name: str, input_len: int, output_len: int, range_ratio: float) -> None:
    """A random workload whose longest request exceeds the server's context fails every request: say so first."""
    if dataset_name != "random" or not served.max_model_len:
        return
    longest = int(input_len * (1 + range_ratio)) + int(output_len * (1 + range_ratio)) + 1
    if longest > served.max_model_len:
        raise ValueError(f"--random-input-len {input_len} + --random-output-len {output_len} (range ratio "
                         f"{range_ratio}) reach {longest} tokens, more than the server's max_model_len "
                         f"{served.max_model_len}; lower them")


def make_workload(*, tokenizer: Any | None, dataset_name: str, dataset_path: str | None, num_prompts: int,
                  random_input_len: int, random_output_len: int, random_range_ratio: float,
                  sharegpt_output_len: int | None, seed: int) -> list[SampleRequest]:
    return build_workload(dataset_name, tokenizer=tokenizer, num_prompts=num_prompts, dataset_path=dataset_path,
                          input_len=random_input_len, output_len=random_output_len,
                          range_ratio=random_range_ratio, seed=seed, output_len_override=sharegpt_output_len)


def make_run_config(*, base_url: str, endpoint: str, model: str | None, max_concurrency: int | None,
                    request_rate: float, burstiness: float, num_warmups: int, max_duration: float,
                    request_timeout: float, ignore_eos: bool, seed: int, api_key: str | None,
                    percentile_metrics: str, metric_percentiles: str, goodput: list[str] | None,
                    show_progress: bool) -> RunConfig:
    cfg = RunConfig(
        base_url=base_url, endpoint=endpoint, model=model, max_concurrency=max_concurrency,
        request_rate=request_rate, burstiness=burstiness, num_warmups=num_warmups, max_duration_s=max_duration,
        request_timeout_s=request_timeout, ignore_eos=ignore_eos, seed=seed,
        api_key=api_key or os.environ.get("OPENAI_API_KEY"),
        percentile_metrics=parse_list(percentile_metrics, "--percentile-metrics", METRIC_NAMES),
        percentiles=parse_percentiles(metric_percentiles), goodput=parse_goodput(goodput),
        show_progress=show_progress)
    cfg.validate()
    return cfg
