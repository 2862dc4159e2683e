"""`tokenmill generate`: offline generation from the command line (no server). Imports torch lazily."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def generate_command(
    prompt: Annotated[list[str], typer.Argument(help="Prompt text; several prompts run as one batch.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="HF folder, .gguf file or HF-cache name; default: the packaged Gemma 3 270M.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Maximum new tokens per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling probability mass, in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens; 0 disables.")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable); not included in the output.")] = None,
    n: Annotated[int, typer.Option(help="Samples per prompt.")] = 1,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length limit; default: the model's.")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16.")] = "auto",
    kv_cache_memory: Annotated[Optional[float], typer.Option(help="KV cache size in GiB; default: sized from free memory.")] = None,
) -> None:
    """Generate text offline and print it, one block per prompt and sample."""
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop=list(stop or []), n=n)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    llm = LLM(model, max_model_len=max_model_len, dtype=dtype, kv_cache_memory=kv_cache_memory)
    outputs = llm.generate(list(prompt), params)
    for out in outputs:
        for c in out.outputs:
            header = f"--- prompt {out.request_id}" + (f" sample {c.index}" if len(out.outputs) > 1 else "")
            typer.echo(f"{header} (finish_reason={c.finish_reason})")
            typer.echo((out.prompt or "") + c.text)
