"""Throughput of a measured batch job, and API batch prices, for `tokenmill cost --batch-summary`.

A batch run is compared against an API's *batch* price, not its interactive one: OpenAI's Batch API
charges 50% of the list price ("50% cost discount compared to synchronous APIs",
platform.openai.com/docs/guides/batch, checked 2025), hence DEFAULT_BATCH_DISCOUNT.

Two kinds of measurement are read:
- the summary `tokenmill run-batch --summary-json` writes (prompt/completion tokens, elapsed_s of the run);
- a batch object (`client.batches.retrieve(id).model_dump_json()` or GET /v1/batches/{id}): seconds from
  in_progress_at to finalizing_at (else completed_at); tokens from its `usage` when present, else summed
  over the `usage` of the 200 lines of its output file (--batch-output).
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_BATCH_DISCOUNT = 0.5  # OpenAI Batch API: 50% off list price (see the module docstring)


def batch_prices(list_input_per_m: float, list_output_per_m: float, discount: float) -> tuple[float, float]:
    """API $ per 1M input / output tokens for batch work: list price less the batch discount."""
    if not 0 <= discount < 1:
        raise ValueError(f"--batch-discount must be in [0, 1) (a fraction of the list price), got {discount}")
    return list_input_per_m * (1 - discount), list_output_per_m * (1 - discount)


def throughput_from_batch(summary: Path, output: Path | None = None) -> tuple[float, float]:
    """(input tok/s, output tok/s) of a batch job from a run-batch summary or a batch object."""
    try:
        obj = json.loads(summary.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--batch-summary {summary}: cannot read JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"--batch-summary {summary}: must be a JSON object")  # noqa: TRY004 - a user error
    if "elapsed_s" in obj:  # tokenmill run-batch --summary-json
        seconds, tin, tout = obj["elapsed_s"], obj.get("prompt_tokens"), obj.get("completion_tokens")
    elif obj.get("object") == "batch":
        start, end = obj.get("in_progress_at"), obj.get("finalizing_at") or obj.get("completed_at")
        if not isinstance(start, int | float) or not isinstance(end, int | float):
            raise ValueError(f"--batch-summary {summary}: the batch has no in_progress_at and finalizing_at / "
                             f"completed_at (status {obj.get('status')!r}); pass a completed batch")
        seconds = end - start
        tin, tout = _batch_usage(obj, output, summary)
    else:
        raise ValueError(f"--batch-summary {summary}: neither a run-batch summary (elapsed_s) nor a batch object "
                         "(object: 'batch')")
    if not isinstance(seconds, int | float) or seconds <= 0:
        raise ValueError(f"--batch-summary {summary}: the run took {seconds!r} s; need > 0")
    if not isinstance(tin, int) or not isinstance(tout, int):
        raise ValueError(f"--batch-summary {summary}: token counts missing")  # noqa: TRY004 - a user error
    return tin / seconds, tout / seconds


def _batch_usage(obj: dict, output: Path | None, summary: Path) -> tuple[int, int]:
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
        return int(usage.get("input_tokens") or 0), usage["output_tokens"]
    if output is None:
        raise ValueError(f"--batch-summary {summary}: the batch object carries no usage; also pass its output "
                         "file with --batch-output")
    tin = tout = 0
    try:
        lines = output.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--batch-output {output}: {exc}") from None
    for no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            resp = json.loads(text)["response"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--batch-output {output}:{no}: not a batch output line") from None
        body = resp.get("body") if isinstance(resp, dict) else None
        u = body.get("usage") if isinstance(body, dict) and resp.get("status_code") == 200 else None
        if isinstance(u, dict):
            tin += int(u.get("prompt_tokens") or 0)
            tout += int(u.get("completion_tokens") or 0)
    return tin, tout
