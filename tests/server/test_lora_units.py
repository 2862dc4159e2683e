"""LoRA on the server without a model: the runtime-update switch, the metrics collector, the serve flags."""

from __future__ import annotations

import asyncio
import re

import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from tokenmill.config import EngineConfig, LoRAConfig, ModelConfig, ServerConfig
from tokenmill.engine.stats import SchedulerStats
from tokenmill.server.cli import expand_lora_modules, serve_command
from tokenmill.server.lora_metrics import LoRAMetrics
from tokenmill.server.metrics import CoreCounts

from .test_live import metric


async def _never_ready(_config):  # the engine is still loading for the whole test
    await asyncio.Event().wait()


def _app(runtime: bool, lora: bool = True):
    from tokenmill.server.app import create_app

    cfg = EngineConfig(model=ModelConfig(served_model_name="base"),
                       lora=LoRAConfig(lora_modules=(("sql", "/adapters/sql"),)) if lora else None)
    return create_app(cfg, ServerConfig(allow_runtime_lora_updating=runtime), engine_factory=_never_ready)


def test_runtime_updating_off_answers_404_naming_the_switch():
    from fastapi.testclient import TestClient

    with TestClient(_app(runtime=False)) as http:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/p"}),
                           ("/v1/unload_lora_adapter", {"lora_name": "sql"})):
            r = http.post(path, json=body)
            assert r.status_code == 404, r.text
            assert "--allow-runtime-lora-updating" in r.json()["error"]["message"]


def test_runtime_updating_without_lora_is_400_and_bodies_are_checked():
    from fastapi.testclient import TestClient

    with TestClient(_app(runtime=True, lora=False)) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/p"})
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
    with TestClient(_app(runtime=True)) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/p"})  # before the engine
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/p"})
        assert r.status_code == 503  # a new adapter is validated by the engine, which is still loading
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404


def test_lora_metrics_follow_the_core_and_survive_a_core_restart():
    reg = CollectorRegistry()
    counts = CoreCounts()
    m = LoRAMetrics(reg, "base", max_loras=2, counts=counts)
    m.update(SchedulerStats(lora_running=["a", "b"], lora_waiting=["c"], lora_requests={"a": 3, "c": 1},
                            lora_num_swaps=4, lora_num_loaded=3), num_served=5)
    text = generate_latest(reg).decode()
    info = [ln for ln in text.splitlines() if ln.startswith("tokenmill_lora_requests_info{")]
    assert len(info) == 1
    assert 'max_lora="2"' in info[0] and 'running_lora_adapters="a,b"' in info[0]
    assert 'waiting_lora_adapters="c"' in info[0]
    assert metric(text, "tokenmill_lora_requests_total", lora_name="a") == 3
    assert metric(text, "tokenmill_lora_swaps_total") == 4
    assert metric(text, "tokenmill_lora_adapters_loaded") == 3 and metric(text, "tokenmill_lora_adapters_served") == 5
    # a restarted core counts from zero: the server's counters keep what the dead one counted
    counts.reset()  # what ServerMetrics.engine_restarted does
    m.update(SchedulerStats(lora_requests={"a": 1}, lora_num_swaps=1), num_served=5)
    text = generate_latest(reg).decode()
    assert metric(text, "tokenmill_lora_requests_total", lora_name="a") == 4
    assert metric(text, "tokenmill_lora_swaps_total") == 5
    assert 'running_lora_adapters=""' in text  # the idle snapshot replaces the old one


def test_expand_lora_modules_accepts_vllms_several_values_form():
    argv = ["serve", "--lora-modules", "a=/p/a", "b=/p/b", '{"name": "c", "path": "/p/c"}', "--max-loras", "2"]
    assert expand_lora_modules(argv) == ["serve", "--lora-modules", "a=/p/a", "--lora-modules", "b=/p/b",
                                         "--lora-modules", '{"name": "c", "path": "/p/c"}', "--max-loras", "2"]
    # a MODEL after the values stays the model (no '='), a single value is left alone
    assert expand_lora_modules(["--lora-modules", "a=/p", "model-dir"]) == ["--lora-modules", "a=/p", "model-dir"]


def _serve(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(serve_command)
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


@pytest.mark.parametrize(("args", "message"), [
    (("--max-loras", "2"), "Invalid value for --max-loras: invalid max_loras: LoRA options need enable_lora=True"),
    (("--enable-lora", "--max-loras", "0"), "Invalid value for --max-loras: invalid max_loras=0"),
    (("--enable-lora", "--lora-modules", "nopath"), "Invalid value for --lora-modules: invalid lora_modules entry"),
    (("--allow-runtime-lora-updating",), "Invalid value for --enable-lora: loading adapters at run time needs"),
    (("--enable-lora", "--served-model-name", "m", "--lora-modules", "m=/p"),
     "Invalid value for --lora-modules: the adapter name 'm' is the served model's name"),
])
def test_serve_lora_flags_fail_in_one_line(args, message):
    code, out = _serve(*args)
    assert code == 2 and "Traceback" not in out
    assert message in out
