"""`tokenmill cost`: what a token costs when you self-host, next to an API's price, and where they cross.

Model (all inputs are flags; defaults are examples with their sources, not truths - pass your own):
- one machine costs `hardware_cost_per_hour` whether busy or idle, and serves at the measured throughput
  for a `utilisation` fraction of the time, so an hour yields 3600 * utilisation * tokens/s tokens;
- that cost is split between input and output tokens with `input_cost_weight` (cost of an input token /
  cost of an output token; default: the API's own price ratio, so the comparison is like for like);
- a month has 730 hours (8760 / 12). Break-even is the monthly token volume (at the measured input/output
  mix) where the API bill equals the machine's monthly bill; it is reachable only if one machine can serve
  it, i.e. break-even utilisation <= 1. Past that, every machine costs more than the API for its tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokenmill.bench.batch_cost import (
    DEFAULT_BATCH_DISCOUNT,
    batch_prices,
    throughput_from_batch,
)

HOURS_PER_MONTH = 730.0
# Sources of the example defaults (list prices, checked 2024; they change - pass current ones):
DEFAULT_HARDWARE_PER_HOUR = 0.089  # AWS EC2 c7i.large (2 vCPU) on-demand, us-east-1: aws.amazon.com/ec2/pricing
DEFAULT_API_INPUT_PER_M = 0.15  # OpenAI gpt-4o-mini input $/1M tokens: openai.com/api/pricing
DEFAULT_API_OUTPUT_PER_M = 0.60  # OpenAI gpt-4o-mini output $/1M tokens: openai.com/api/pricing


@dataclass(frozen=True, slots=True)
class CostInputs:
    input_tokens_per_s: float
    output_tokens_per_s: float
    hardware_cost_per_hour: float = DEFAULT_HARDWARE_PER_HOUR
    utilisation: float = 0.5
    api_input_per_m: float = DEFAULT_API_INPUT_PER_M
    api_output_per_m: float = DEFAULT_API_OUTPUT_PER_M
    input_cost_weight: float | None = None  # None: api_input_per_m / api_output_per_m
    monthly_fixed_cost: float = 0.0  # ops, storage, people: added to the machine's monthly bill

    def validate(self) -> None:
        if self.input_tokens_per_s < 0 or self.output_tokens_per_s < 0:
            raise ValueError("--input-tokens-per-s / --output-tokens-per-s must be >= 0")
        if self.input_tokens_per_s + self.output_tokens_per_s <= 0:
            raise ValueError("throughput: give --result or --output-tokens-per-s > 0")
        if not 0 < self.utilisation <= 1:
            raise ValueError(f"--utilisation must be in (0, 1], got {self.utilisation}")
        if self.hardware_cost_per_hour < 0 or self.monthly_fixed_cost < 0:
            raise ValueError("--hardware-cost-per-hour and --monthly-fixed-cost must be >= 0")
        if self.api_input_per_m < 0 or self.api_output_per_m <= 0:
            raise ValueError("--api-input-per-m must be >= 0 and --api-output-per-m > 0")
        if self.input_cost_weight is not None and self.input_cost_weight < 0:
            raise ValueError(f"--input-cost-weight must be >= 0, got {self.input_cost_weight}")


@dataclass(frozen=True, slots=True)
class CostReport:
    self_input_per_m: float
    self_output_per_m: float
    self_blended_per_m: float  # at the measured input/output mix
    api_blended_per_m: float
    self_vs_api: float  # self-hosted blended cost / API blended cost
    monthly_machine_cost: float
    capacity_tokens_per_month: float  # one machine at the given utilisation
    break_even_tokens_per_month: float
    break_even_utilisation: float  # utilisation needed to break even; > 1: never on this hardware


def compute_cost(c: CostInputs) -> CostReport:
    c.validate()
    weight = c.input_cost_weight if c.input_cost_weight is not None else c.api_input_per_m / c.api_output_per_m
    tin, tout = c.input_tokens_per_s, c.output_tokens_per_s
    hour_tokens_weighted = 3600.0 * c.utilisation * (weight * tin + tout)
    # Cost of one output token solves: cost_out * (weight * N_in + N_out) = cost of the hour.
    out_cost = c.hardware_cost_per_hour / hour_tokens_weighted if hour_tokens_weighted else math.inf
    in_cost = weight * out_cost
    share_in = tin / (tin + tout)
    self_blended = 1e6 * (share_in * in_cost + (1 - share_in) * out_cost)
    api_blended = share_in * c.api_input_per_m + (1 - share_in) * c.api_output_per_m
    monthly = c.hardware_cost_per_hour * HOURS_PER_MONTH + c.monthly_fixed_cost
    capacity = HOURS_PER_MONTH * 3600.0 * c.utilisation * (tin + tout)
    break_even = monthly / (api_blended / 1e6) if api_blended > 0 else math.inf
    full_capacity = HOURS_PER_MONTH * 3600.0 * (tin + tout)
    return CostReport(
        self_input_per_m=1e6 * in_cost, self_output_per_m=1e6 * out_cost, self_blended_per_m=self_blended,
        api_blended_per_m=api_blended, self_vs_api=self_blended / api_blended if api_blended else math.inf,
        monthly_machine_cost=monthly, capacity_tokens_per_month=capacity,
        break_even_tokens_per_month=break_even, break_even_utilisation=break_even / full_capacity)


def throughput_from_result(path: Path) -> tuple[float, float]:
    """(input tok/s, output tok/s) from a `tokenmill bench serve --json` / vLLM `--save-result` file."""
    try:
        r = json.loads(path.read_text())
        duration = float(r["duration"])
        return float(r["total_input_tokens"]) / duration, float(r["total_output_tokens"]) / duration
    except (OSError, ValueError, KeyError, ZeroDivisionError) as exc:
        raise ValueError(f"--result {path}: not a bench result with duration/total_*_tokens ({exc})") from exc


def _money(x: float) -> str:
    return "never" if math.isinf(x) else f"${x:,.4f}" if x < 1 else f"${x:,.2f}"


def _tokens(x: float) -> str:
    return "never" if math.isinf(x) else f"{x / 1e6:,.1f}M"


def print_report(c: CostInputs, r: CostReport, console: Console) -> None:
    t = Table(title="Self-hosting vs API (per 1M tokens)")
    for col in ("", "input", "output", "blended (measured mix)"):
        t.add_column(col, justify="right")
    t.add_row("self-hosted", _money(r.self_input_per_m), _money(r.self_output_per_m), _money(r.self_blended_per_m))
    t.add_row("API", _money(c.api_input_per_m), _money(c.api_output_per_m), _money(r.api_blended_per_m))
    t.add_row("self / API", "", "", f"{r.self_vs_api:.2f}x")
    console.print(t)
    console.print(f"machine: {_money(c.hardware_cost_per_hour)}/h, utilisation {c.utilisation:.0%}, "
                  f"throughput {c.input_tokens_per_s:.1f} in + {c.output_tokens_per_s:.1f} out tok/s")
    console.print(f"monthly machine bill {_money(r.monthly_machine_cost)}; serves "
                  f"{_tokens(r.capacity_tokens_per_month)} tokens/month at this utilisation")
    verdict = ("reachable" if r.break_even_utilisation <= 1 else
               "NOT reachable on this hardware: the API is cheaper at any volume")
    console.print(f"break-even: {_tokens(r.break_even_tokens_per_month)} tokens/month "
                  f"(needs {r.break_even_utilisation:.0%} utilisation; {verdict})")


def plot_cost(c: CostInputs, r: CostReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    top = 2.5 * min(r.break_even_tokens_per_month, 4 * r.capacity_tokens_per_month)
    volume = np.linspace(0, max(top, 1.0), 400)
    api = volume * r.api_blended_per_m / 1e6
    # Self-hosting is a step: one more machine each time the volume passes a machine's capacity.
    machines = np.maximum(1, np.ceil(volume / r.capacity_tokens_per_month))
    self_cost = machines * c.hardware_cost_per_hour * HOURS_PER_MONTH + c.monthly_fixed_cost
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(volume / 1e6, api, label="API")
    ax.plot(volume / 1e6, self_cost, label="self-hosted", drawstyle="steps-post")
    ax.set_xlabel("tokens per month (millions, measured mix)")
    ax.set_ylabel("$ per month")
    ax.set_title("Monthly cost vs volume")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cost_command(
    result: Annotated[Path | None, typer.Option(help="Bench result JSON (tokenmill bench --json or vLLM).")] = None,
    input_tokens_per_s: Annotated[float | None, typer.Option(help="Input throughput (overrides --result).")] = None,
    output_tokens_per_s: Annotated[float | None, typer.Option(help="Output throughput (overrides --result).")] = None,
    hardware_cost_per_hour: Annotated[float, typer.Option(
        help="Machine $/hour. Default: AWS c7i.large on-demand us-east-1 (2 vCPU like this box), 2024 list price; "
             "an H100 rents for roughly $2-4/hour.")] = DEFAULT_HARDWARE_PER_HOUR,
    utilisation: Annotated[float, typer.Option(help="Fraction of hours busy at the measured throughput.")] = 0.5,
    api_input_per_m: Annotated[float, typer.Option(
        help="API $ per 1M input tokens. Default: OpenAI gpt-4o-mini list price (2024).")] = DEFAULT_API_INPUT_PER_M,
    api_output_per_m: Annotated[float, typer.Option(
        help="API $ per 1M output tokens. Default: OpenAI gpt-4o-mini list price (2024).")] = DEFAULT_API_OUTPUT_PER_M,
    input_cost_weight: Annotated[float | None, typer.Option(
        help="Cost of an input token relative to an output token; default: the API's price ratio.")] = None,
    monthly_fixed_cost: Annotated[float, typer.Option(help="Extra $ per month for self-hosting (ops).")] = 0.0,
    batch_summary: Annotated[Path | None, typer.Option(
        help="A measured batch job instead of --result: `run-batch --summary-json` output or a batch object "
             "JSON; the API side then uses batch prices (see --batch-discount).")] = None,
    batch_output: Annotated[Path | None, typer.Option(
        help="The batch's output file, for token counts when the batch object carries no usage.")] = None,
    batch_discount: Annotated[float, typer.Option(
        help="With --batch-summary: API batch price = list price x (1 - this). Default 0.5: OpenAI's Batch API "
             "is half the list price.")] = DEFAULT_BATCH_DISCOUNT,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of monthly cost vs volume here.")] = None,
) -> None:
    """Self-hosting vs API cost per 1M tokens from measured throughput (a bench result or a batch job), and the
    monthly break-even volume."""
    console = Console()
    try:
        tin, tout = throughput_from_result(result) if result else (0.0, 0.0)
        if batch_summary is not None:  # batch work is priced at the API's batch rate
            tin, tout = throughput_from_batch(batch_summary, batch_output)
            api_input_per_m, api_output_per_m = batch_prices(api_input_per_m, api_output_per_m, batch_discount)
        inputs = CostInputs(
            input_tokens_per_s=input_tokens_per_s if input_tokens_per_s is not None else tin,
            output_tokens_per_s=output_tokens_per_s if output_tokens_per_s is not None else tout,
            hardware_cost_per_hour=hardware_cost_per_hour, utilisation=utilisation,
            api_input_per_m=api_input_per_m, api_output_per_m=api_output_per_m,
            input_cost_weight=input_cost_weight, monthly_fixed_cost=monthly_fixed_cost)
        report = compute_cost(inputs)
    except ValueError as exc:  # one line, brackets kept as text
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if batch_summary is not None:
        console.print(f"API prices are batch prices: list x {1 - batch_discount:g} (--batch-discount {batch_discount:g})")
    print_report(inputs, report, console)
    if json_out:
        data = {"inputs": asdict(inputs), "report": asdict(report)}
        json_out.write_text(json.dumps(data, indent=2, default=str).replace("Infinity", '"inf"'))
    if plot:
        plot_cost(inputs, report, str(plot))
