"""Cost calculator arithmetic against hand-computed cases, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer import Typer
from typer.testing import CliRunner

from tokenmill.bench.cost import CostInputs, compute_cost, cost_command


def test_output_only_workload() -> None:
    # 3.6 $/h at 100 out tok/s fully busy: 360k tokens/h -> $10 / 1M output; input weight 1/2 -> $5.
    r = compute_cost(CostInputs(input_tokens_per_s=0, output_tokens_per_s=100, hardware_cost_per_hour=3.6,
                                utilisation=1.0, api_input_per_m=1.0, api_output_per_m=2.0))
    assert r.self_output_per_m == pytest.approx(10.0)
    assert r.self_input_per_m == pytest.approx(5.0)
    assert r.self_blended_per_m == pytest.approx(10.0)
    assert r.api_blended_per_m == pytest.approx(2.0)
    assert r.self_vs_api == pytest.approx(5.0)
    assert r.monthly_machine_cost == pytest.approx(2628.0)  # 3.6 * 730
    assert r.capacity_tokens_per_month == pytest.approx(262.8e6)  # 730 * 3600 * 100
    assert r.break_even_tokens_per_month == pytest.approx(1314e6)  # 2628 / $2 per 1M
    assert r.break_even_utilisation == pytest.approx(5.0)  # never on this machine


def test_mixed_workload_half_utilised_with_fixed_cost() -> None:
    r = compute_cost(CostInputs(input_tokens_per_s=300, output_tokens_per_s=100, hardware_cost_per_hour=1.0,
                                utilisation=0.5, api_input_per_m=0.5, api_output_per_m=1.5,
                                monthly_fixed_cost=270.0))
    # weight 1/3: weighted tokens per hour = 1800 * (100 + 100) = 360k -> output $2.78/1M, input $0.93/1M
    assert r.self_output_per_m == pytest.approx(1e6 / 360000)
    assert r.self_input_per_m == pytest.approx(1e6 / 360000 / 3)
    # blended = $1 per 720k tokens (1800 s busy * 400 tok/s)
    assert r.self_blended_per_m == pytest.approx(1e6 / 720000)
    assert r.api_blended_per_m == pytest.approx(0.75)
    assert r.monthly_machine_cost == pytest.approx(1000.0)
    assert r.capacity_tokens_per_month == pytest.approx(525.6e6)
    assert r.break_even_tokens_per_month == pytest.approx(1000 / 0.75e-6)
    assert r.break_even_utilisation == pytest.approx((1000 / 0.75e-6) / 1051.2e6)


def test_explicit_equal_weight_and_reachable_break_even() -> None:
    r = compute_cost(CostInputs(input_tokens_per_s=100, output_tokens_per_s=100, hardware_cost_per_hour=0.72,
                                utilisation=1.0, api_input_per_m=3.0, api_output_per_m=15.0,
                                input_cost_weight=1.0))
    assert r.self_input_per_m == pytest.approx(1.0) and r.self_output_per_m == pytest.approx(1.0)
    assert r.break_even_utilisation == pytest.approx((0.72 * 730 / 9e-6) / (730 * 3600 * 200))
    assert r.break_even_utilisation < 1


@pytest.mark.parametrize("kw, field", [({"utilisation": 0.0}, "--utilisation"),
                                      ({"output_tokens_per_s": 0.0}, "throughput"),
                                      ({"api_output_per_m": 0.0}, "--api-output-per-m")])
def test_validation_names_the_flag(kw: dict, field: str) -> None:
    args = {"input_tokens_per_s": 0.0, "output_tokens_per_s": 10.0} | kw
    with pytest.raises(ValueError, match=field):
        compute_cost(CostInputs(**args))


def test_command_from_result_json(tmp_path: Path) -> None:
    res = tmp_path / "bench.json"
    res.write_text(json.dumps({"duration": 10.0, "total_input_tokens": 0, "total_output_tokens": 1000}))
    app = Typer()
    app.command()(cost_command)
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    r = CliRunner().invoke(app, ["--result", str(res), "--hardware-cost-per-hour", "3.6", "--utilisation", "1",
                                 "--api-input-per-m", "1", "--api-output-per-m", "2", "--json", str(out),
                                 "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "break-even" in r.output and "NOT reachable" in r.output
    data = json.loads(out.read_text())
    assert data["report"]["self_output_per_m"] == pytest.approx(10.0)
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["--result", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and "--result" in bad.output


# -- batch jobs (tokenmill cost --batch-summary) -------------------------------------------------------------

def _cost_app() -> Typer:
    app = Typer()
    app.command()(cost_command)
    return app


def test_batch_summary_priced_at_the_batch_discount(tmp_path: Path) -> None:
    # run-batch summary: 1000 output tokens in 10 s = 100 tok/s, 3.6 $/h fully busy -> $10 / 1M output.
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"model": "m", "input_lines": 5, "prompt_tokens": 0, "completion_tokens": 1000,
                                   "elapsed_s": 10.0}))
    out = tmp_path / "c.json"
    r = CliRunner().invoke(_cost_app(), ["--batch-summary", str(summary), "--hardware-cost-per-hour", "3.6",
                                         "--utilisation", "1", "--api-input-per-m", "1", "--api-output-per-m", "4",
                                         "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "batch prices" in r.output
    data = json.loads(out.read_text())
    assert data["inputs"]["api_output_per_m"] == pytest.approx(2.0)  # list 4 at OpenAI's 50% batch discount
    assert data["report"]["self_output_per_m"] == pytest.approx(10.0)
    assert data["report"]["self_vs_api"] == pytest.approx(5.0)
    r = CliRunner().invoke(_cost_app(), ["--batch-summary", str(summary), "--api-output-per-m", "4",
                                         "--batch-discount", "0", "--json", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["inputs"]["api_output_per_m"] == pytest.approx(4.0)


def test_batch_object_timestamps_and_output_file_usage(tmp_path: Path) -> None:
    from tokenmill.bench.batch_cost import throughput_from_batch

    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"object": "batch", "status": "completed", "in_progress_at": 100,
                                 "finalizing_at": 120, "completed_at": 121}))
    output = tmp_path / "out.jsonl"
    lines = [{"custom_id": "a", "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": 30,
                                                                                      "completion_tokens": 50}}}},
             {"custom_id": "b", "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": 10,
                                                                                      "completion_tokens": 150}}}},
             {"custom_id": "c", "response": {"status_code": 400, "body": {"error": {"message": "bad"}}}}]
    output.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # 20 s from in_progress_at to finalizing_at; 40 prompt and 200 completion tokens over the 200 lines.
    assert throughput_from_batch(batch, output) == (pytest.approx(2.0), pytest.approx(10.0))
    # A batch object carrying usage needs no output file.
    batch.write_text(json.dumps({"object": "batch", "in_progress_at": 0, "completed_at": 4,
                                 "usage": {"input_tokens": 8, "output_tokens": 40}}))
    assert throughput_from_batch(batch) == (pytest.approx(2.0), pytest.approx(10.0))


@pytest.mark.parametrize("content, args, message", [
    ({"object": "batch", "status": "in_progress", "in_progress_at": 5}, [], "pass a completed batch"),
    ({"object": "batch", "in_progress_at": 0, "completed_at": 4}, [], "--batch-output"),
    ({"prompt_tokens": 1, "completion_tokens": 1, "elapsed_s": 0}, [], "need > 0"),
    ({"hello": 1}, [], "neither a run-batch summary"),
    ({"prompt_tokens": 1, "completion_tokens": 1, "elapsed_s": 1}, ["--batch-discount", "1"], "--batch-discount"),
])
def test_batch_input_errors_name_the_flag(tmp_path: Path, content: dict, args: list[str], message: str) -> None:
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps(content))
    r = CliRunner().invoke(_cost_app(), ["--batch-summary", str(summary), *args])
    assert r.exit_code == 2 and message in r.output, r.output
