"""The `tokenmill` CLI as a new user meets it: help readable at 80 columns, one-line user errors, the default
model's served name, `serve --model`, and `bench serve` with no flags against a live `tokenmill serve`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tests.bench.live import free_port
from tests.fixtures.servers import start_server
from tokenmill.bench.cli import SERVE_INPUT_LEN, SERVE_NUM_PROMPTS, SERVE_OUTPUT_LEN
from tokenmill.bench.datasets import load_tokenizer, sample_random
from tokenmill.bench.options import check_fits, resolve_tokenizer
from tokenmill.bench.server_tokenizer import ServedModel, ServerTokenizer
from tokenmill.cli import build_app

TEXT = "serving large language models needs paged attention, continuous batching and careful scheduling."


def _leaf_commands() -> list[tuple[list[str], Any]]:
    def walk(cmd: Any, path: list[str]):
        if hasattr(cmd, "commands"):  # a group (typer carries its own copy of click's classes)
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    return list(walk(get_command(build_app()), []))


def test_help_at_80_columns_shows_every_option_name_whole() -> None:
    commands = _leaf_commands()
    assert {" ".join(p) for p, _ in commands} >= {"serve", "gateway", "bench serve", "bench compare", "cost",
                                                  "generate"}
    app, runner = build_app(), CliRunner()
    for path, cmd in commands:
        res = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert res.exit_code == 0, (path, res.output)
        assert "…" not in res.output, path
        assert not re.search(r"--[a-z][\w-]*-\n", res.output), path  # no flag in a help text split at a hyphen
        for param in cmd.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):  # the whole flag, not a prefix of a longer one
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", res.output), (path, opt)
    bench_help = runner.invoke(app, ["bench", "serve", "--help"], terminal_width=80).output
    assert "[len*(1-r), len*(1+r)]" in bench_help  # square brackets are text, not rich markup


@pytest.mark.parametrize(("args", "wrong", "allowed"), [
    (["generate", "hi", "--model", "/nonexistent"], "model='/nonexistent': no such file or folder", "a .gguf file"),
    (["serve", "--model", "/nonexistent/m.gguf"], "no such file or folder", "gemma-3-270m"),
    (["serve", "./model-a", "--model", "./model-b"], "MODEL is './model-a' but --model is './model-b'",
     "give the model once"),
    (["generate", "hi", "--temperature", "-1"], "temperature", "temperature"),
    (["cost", "--result", "/nonexistent.json"], "--result /nonexistent.json", "duration"),
])
def test_user_errors_are_one_line_without_traceback(args: list[str], wrong: str, allowed: str) -> None:
    res = CliRunner().invoke(build_app(), args, terminal_width=80)
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if wrong in line]
    assert len(lines) == 1 and allowed in lines[0], res.output


def test_bench_serve_without_a_server_says_where_it_looked() -> None:
    port = free_port()  # nothing listens there
    res = CliRunner().invoke(build_app(), ["bench", "serve", "--port", str(port)], terminal_width=80)
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if "cannot reach" in line]
    assert len(lines) == 1 and f"127.0.0.1:{port}/v1/models" in lines[0] and "--base-url" in lines[0]


def test_served_name_of_the_default_model_means_that_model(gguf_cache_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME, default_model_path
    from tokenmill.model.discovery import check_model, resolve_model

    assert DEFAULT_MODEL_NAME == "gemma-3-270m"
    path = default_model_path()
    assert check_model(DEFAULT_MODEL_NAME) == resolve_model(DEFAULT_MODEL_NAME) == path
    assert path.endswith(".gguf") and Path(path).is_file()
    # A folder of that name in the working directory is a path, and paths come first (as for every name).
    (tmp_path / DEFAULT_MODEL_NAME).mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model(DEFAULT_MODEL_NAME) == DEFAULT_MODEL_NAME


def test_serve_model_option_then_bench_serve_with_no_flags(tiny_llama_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`tokenmill serve --model DIR`, then `tokenmill bench serve` with only the server's address: the model
    and its tokenizer come from the server, the defaults run, and a PNG is written and its path printed."""
    server = start_server(None, "--model", str(tiny_llama_dir), "--max-model-len", "512", "--kv-cache-memory",
                          "0.02", "--dtype", "float32", tmp_dir=tmp_path)
    try:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [str(tiny_llama_dir)]
        monkeypatch.chdir(tmp_path)
        res = CliRunner().invoke(build_app(), ["bench", "serve", "--base-url", server.url], terminal_width=200)
    finally:
        server.stop()
    assert res.exit_code == 0, res.output
    assert f"tokenizer: {tiny_llama_dir}" in res.output
    pngs = list(tmp_path.glob("bench-*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot {pngs[0].name}" in res.output
    row = next(line for line in res.output.splitlines() if "Successful requests" in line)
    assert int(row.strip("│ ").split("│")[1]) == SERVE_NUM_PROMPTS
    total_in = next(line for line in res.output.splitlines() if "Total input tokens" in line)
    # Like vLLM, --random-input-len counts the special tokens the server adds (a BOS here).
    assert int(total_in.strip("│ ").split("│")[1]) == SERVE_NUM_PROMPTS * SERVE_INPUT_LEN
    assert SERVE_OUTPUT_LEN <= 128 and SERVE_NUM_PROMPTS <= 64  # CPU-sized


def test_server_tokenizer_counts_like_the_model_tokenizer(live_server: str, tiny_llama_dir: Path) -> None:
    local = load_tokenizer(str(tiny_llama_dir))
    remote = ServerTokenizer(live_server, "tiny")
    try:
        assert remote.encode(TEXT, add_special_tokens=False) == local.encode(TEXT, add_special_tokens=False)
        assert remote.encode(TEXT) == local.encode(TEXT)
        assert remote.decode(local.encode(TEXT, add_special_tokens=False)) == TEXT
        assert remote.num_special_tokens_to_add() == local.num_special_tokens_to_add() == 1
        assert len(remote) == json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
        requests = sample_random(remote, 4, 40, 8, 0.0, seed=3)
    finally:
        remote.close()
    for r in requests:  # exact lengths, as the model's own tokenizer counts them
        assert r.prompt_len == 39 == len(local.encode(r.prompt, add_special_tokens=False))


def test_tokenizer_resolution_order(live_server: str, tiny_llama_dir: Path) -> None:
    served = ServedModel(id="tiny", root=str(tiny_llama_dir), max_model_len=256)
    tok, source = resolve_tokenizer(None, None, served, live_server, remote=True)
    assert source == str(tiny_llama_dir) and not isinstance(tok, ServerTokenizer)
    remote_only = ServedModel(id="tiny", root="not-on-this-machine", max_model_len=256)
    tok, source = resolve_tokenizer(None, None, remote_only, live_server, remote=True)
    assert isinstance(tok, ServerTokenizer) and source == f"{live_server}/tokenize"
    tok.close()
    assert resolve_tokenizer(None, None, remote_only, live_server, remote=False) == (None, None)


def test_tokenizer_from_a_gguf_file(tiny_gguf_sources: dict[str, Path], gguf_cache_dir: Path,
                                    tmp_path: Path) -> None:
    from tests.fixtures.gemma import write_gguf_from_hf

    gguf = write_gguf_from_hf(tiny_gguf_sources["llama"], tmp_path / "llama.gguf", "llama", "F32")
    reference = load_tokenizer(str(tiny_gguf_sources["llama"]))
    for tok, source in [resolve_tokenizer(str(gguf), None), resolve_tokenizer(None, str(gguf))]:
        assert source == str(gguf)
        assert tok.encode(TEXT, add_special_tokens=False) == reference.encode(TEXT, add_special_tokens=False)
    requests = sample_random(tok, 3, 20, 4, 0.0, seed=1)
    assert all(len(reference.encode(r.prompt, add_special_tokens=False)) == r.prompt_len == 19 for r in requests)
    with pytest.raises(ValueError, match=r"--tokenizer: .*a local folder .*or a \.gguf file"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def test_a_workload_longer_than_the_server_context_is_refused_up_front() -> None:
    served = ServedModel(id="m", root=None, max_model_len=100)
    with pytest.raises(ValueError, match=r"--random-input-len 128 \+ --random-output-len 64 .* max_model_len 100"):
        check_fits(served, "random", 128, 64, 0.0)
    check_fits(served, "random", 64, 32, 0.0)
    check_fits(served, "custom", 128, 64, 0.0)  # custom prompts have their own lengths
