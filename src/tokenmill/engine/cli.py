"""`tokenmill generate`: offline generation from the command line (no server). Imports torch lazily."""

from __future__ import annotations

from typing import Annotated

import typer


def generate_command(
    prompt: Annotated[list[str], typer.Argument(help="Prompt text; several prompts run as one batch.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or HF-cache name; default (or gemma-3-270m): the packaged Gemma 3 270M.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling probability mass, in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0 disables.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); not included in the output.")] = None,
    n: Annotated[int, typer.Option(help="Samples per prompt.")] = 1,
    max_model_len: Annotated[int | None, typer.Option(help="Context length limit; default: the model's.")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16.")] = "auto",
    kv_cache_memory: Annotated[float | None, typer.Option(help="KV cache size in GiB; default: what the sequences can use, at most 1.25 GiB.")] = None,
) -> None:
    """Generate text offline and print it, one block per prompt and sample."""
    from tokenmill.model.discovery import check_model
    from tokenmill.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop=list(stop or []), n=n)
        if model is not None:
            check_model(model)  # fail in one line before importing torch and loading anything
        from tokenmill.engine.llm import LLM

        llm = LLM(model, max_model_len=max_model_len, dtype=dtype, kv_cache_memory=kv_cache_memory)
        outputs = llm.generate(list(prompt), params)
    except ValueError as e:  # user errors (house style: ValueError naming the field): one line, no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for out in outputs:
        for c in out.outputs:
            header = f"--- prompt {out.request_id}" + (f" sample {c.index}" if len(out.outputs) > 1 else "")
            typer.echo(f"{header} (finish_reason={c.finish_reason})")
            typer.echo((out.prompt or "") + c.text)
