"""Human-readable tables of benchmark results: one run, or several side by side with ratios."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tokenmill.bench.metrics import METRIC_NAMES

_HEADLINE = [
    ("completed", "Successful requests", "{:d}"),
    ("failed", "Failed requests", "{:d}"),
    ("duration", "Benchmark duration (s)", "{:.2f}"),
    ("total_input_tokens", "Total input tokens", "{:d}"),
    ("total_output_tokens", "Total generated tokens", "{:d}"),
    ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
    ("request_goodput", "Request goodput (req/s)", "{:.2f}"),
    ("output_throughput", "Output token throughput (tok/s)", "{:.2f}"),
    ("max_output_tokens_per_s", "Peak output token throughput (tok/s)", "{:.2f}"),
    ("total_token_throughput", "Total token throughput (tok/s)", "{:.2f}"),
]
_UPPER = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL", "client_queue_time": "Client Queue Time",
          "e2el_including_client_queue": "E2EL incl. Client Queue"}
# Higher is better for throughputs; for latencies lower is better. Ratios are shown as other / first.
_HIGHER_BETTER = {"completed", "request_throughput", "request_goodput", "output_throughput",
                  "total_token_throughput", "max_output_tokens_per_s"}


def metric_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) for every figure in a result, in display order."""
    rows = [(k, label) for k, label, _ in _HEADLINE if result.get(k) is not None]
    for name in METRIC_NAMES:
        for key in sorted((k for k in result if k.endswith(f"_{name}_ms")), key=_stat_order):
            stat = key[: -len(f"_{name}_ms")]
            rows.append((key, f"{stat.capitalize() if not stat.startswith('p') else stat.upper()} "
                              f"{_UPPER[name]} (ms)"))
    return rows


def _stat_order(key: str) -> tuple[int, float]:
    stat = key.split("_", 1)[0]
    order = {"mean": 0, "median": 1, "std": 2}
    if stat in order:
        return order[stat], 0.0
    return 3, float(stat[1:])


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.2f}"


def print_result(result: dict[str, Any], console: Console, title: str = "Serving Benchmark Result") -> None:
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in metric_rows(result):
        table.add_row(label, _fmt(key, result[key]))
    console.print(table)


def ratio_table(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each figure: the value per endpoint and the ratio of each endpoint to the first one."""
    names = list(results)
    base = results[names[0]]
    table: dict[str, dict[str, Any]] = {}
    for key, label in metric_rows(base):
        row: dict[str, Any] = {"label": label, "values": {}, "ratios": {}}
        for name in names:
            value = results[name].get(key)
            row["values"][name] = value
            b = base.get(key)
            row["ratios"][name] = (value / b) if isinstance(value, (int, float)) and b else None
        table[key] = row
    return table


def print_comparison(results: dict[str, dict[str, Any]], console: Console) -> None:
    names = list(results)
    table = Table(title=f"Side by side (ratio = endpoint / {names[0]})")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for name in names[1:]:
        table.add_column(f"{name}/{names[0]}", justify="right")
    for key, row in ratio_table(results).items():
        cells = [_fmt(key, row["values"][n]) for n in names]
        for n in names[1:]:
            r = row["ratios"][n]
            better = r is not None and ((r > 1) == (key in _HIGHER_BETTER)) and r != 1
            cells.append("-" if r is None else f"[{'green' if better else 'red'}]{r:.2f}x[/]")
        table.add_row(row["label"], *cells)
    console.print(table)
