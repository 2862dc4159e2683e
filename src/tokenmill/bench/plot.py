"""PNG of a benchmark result: latency CDFs (TTFT, TPOT, ITL, E2E) and output throughput over time."""

from __future__ import annotations

from typing import Any

import numpy as np


def _tpots(result: dict[str, Any]) -> list[float]:
    out = []
    for ttft, lat, n, err in zip(result["ttfts"], result["latencies"], result["output_lens"], result["errors"]):
        if not err and n > 1:
            out.append((lat - ttft) / (n - 1))
    return out


def _timeline(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges in s since the first request, output tokens/s per bin) from token arrival times.

    About 40 bins over the run (0.05 s to 5 s each), so short and long runs both show a shape.
    """
    times = []
    for start, ttft, itl, err in zip(result["start_times"], result["ttfts"], result["itls"], result["errors"]):
        if err:
            continue
        t = start + ttft
        times.append(t)
        for gap in itl:
            t += gap
            times.append(t)
    if not times:
        return np.zeros(0), np.zeros(0)
    t = np.asarray(times) - min(s for s, e in zip(result["start_times"], result["errors"]) if not e)
    span = max(float(t.max()), 1e-3)
    width = min(5.0, max(0.05, span / 40))
    edges = np.arange(0.0, span + width, width)
    counts, _ = np.histogram(t, bins=edges)
    return edges, counts / width


def plot_results(results: dict[str, dict[str, Any]], path: str) -> None:
    """Write one figure; `results` maps a label (endpoint name) to its result dict."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("TTFT", lambda r: [t for t, e in zip(r["ttfts"], r["errors"]) if not e]),
              ("TPOT", _tpots),
              ("ITL", lambda r: [x for row, e in zip(r["itls"], r["errors"]) if not e for x in row]),
              ("E2E latency", lambda r: [t for t, e in zip(r["latencies"], r["errors"]) if not e])]
    for ax, (title, getter) in zip(axes.flat[:4], panels):
        for label, result in results.items():
            values = np.sort(np.asarray(getter(result), dtype=float) * 1000.0)
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[4]
    for label, result in results.items():
        edges, tps = _timeline(result)
        if tps.size:
            ax.stairs(tps, edges, label=label)
    ax.set_title("Output throughput over time")
    ax.set_xlabel("s since first request")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    ax.axis("off")
    lines = []
    for label, r in results.items():
        lines.append(f"{label}: {r['completed']} ok / {r['failed']} failed in {r['duration']:.1f}s")
        lines.append(f"  out {r['output_throughput']:.1f} tok/s, {r['request_throughput']:.2f} req/s")
        if "median_ttft_ms" in r:
            lines.append(f"  TTFT median {r['median_ttft_ms']:.1f} ms")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
