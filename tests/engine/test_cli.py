"""`tokenmill generate` (engine/cli.py) end to end on a tiny model."""

import typer
from typer.testing import CliRunner


def test_generate_command_prints_text(tiny_llama_dir, llama_llm):
    from tokenmill import SamplingParams
    from tokenmill.engine.cli import generate_command

    app = typer.Typer()
    app.command()(generate_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the subcommand name
    r = CliRunner().invoke(app, ["generate-command", "Hello world", "--model", str(tiny_llama_dir),
                                 "--max-tokens", "6", "--kv-cache-memory", "0.01"])
    assert r.exit_code == 0, r.output
    expected = llama_llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=6))[0]
    assert "finish_reason=" in r.output and ("Hello world" + expected.outputs[0].text) in r.output
    bad = CliRunner().invoke(app, ["generate-command", "x", "--model", str(tiny_llama_dir), "--temperature", "-1"])
    assert bad.exit_code != 0 and "temperature" in bad.output
