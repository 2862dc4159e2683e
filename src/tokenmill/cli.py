"""tokenmill: serve LLMs behind an OpenAI-compatible API, route and scale them, measure them.

Each command lives with its part of the package; this file only wires them into one typer app.
Command modules import nothing heavy at module level, so `tokenmill --help` is instant.
"""

from __future__ import annotations

import typer


def build_app() -> typer.Typer:
    from tokenmill.batch.run_batch import run_batch_command
    from tokenmill.bench.cli import bench_app
    from tokenmill.bench.cost import cost_command
    from tokenmill.engine.cli import generate_command
    from tokenmill.gateway.cli import gateway_command
    from tokenmill.server.cli import serve_command

    # Plain click help (rich_markup_mode=None): rich's tables cut flag names at 80 columns ("--random-range-rat…")
    # and read "[len*(1-r), ...]" in help texts as markup; click wraps the help text and keeps names whole.
    _wrap_help_at_spaces()
    app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False,
                      rich_markup_mode=None)
    app.command("serve", help="Serve a model behind an OpenAI-compatible HTTP API.")(serve_command)
    app.command("gateway", help="Run the gateway: load balancing, queueing, model routing, autoscaling.")(gateway_command)
    app.add_typer(bench_app, name="bench", help="Benchmark OpenAI-compatible endpoints.")
    app.command("cost", help="Self-hosting vs API cost from a bench result.")(cost_command)
    app.command("generate", help="Generate offline from a prompt (no server).")(generate_command)
    app.command("run-batch", help="Run an OpenAI batch file through the engine (no server); resumable.")(
        run_batch_command)
    return app


def _wrap_help_at_spaces() -> None:
    """click's help wrapper also breaks at hyphens, so a flag named in a help text comes out as "--max-" /
    "model-len"; wrap at spaces only. typer vendors click: if its module moves, help just wraps as before."""
    try:
        from typer._click._textwrap import TextWrapper
    except ImportError:
        return
    if getattr(TextWrapper, "_no_hyphen_breaks", False):
        return
    init = TextWrapper.__init__

    def __init__(self, *args, **kwargs) -> None:
        kwargs["break_on_hyphens"] = False
        init(self, *args, **kwargs)

    TextWrapper.__init__ = __init__
    TextWrapper._no_hyphen_breaks = True


def main() -> None:
    import sys

    from tokenmill.server.cli import expand_lora_modules

    sys.argv[1:] = expand_lora_modules(sys.argv[1:])  # vLLM's `--lora-modules a=p b=q` form
    build_app()()


if __name__ == "__main__":
    main()
