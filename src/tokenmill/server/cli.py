"""`tokenmill serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn, engine core in a child process).

Nothing heavy is imported at module level (no torch, no FastAPI): `tokenmill --help` stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from tokenmill.config import (
    QUANTIZATION_METHODS,
    BatchConfig,
    CacheConfig,
    SchedulerConfig,
    ServerConfig,
    check_kv_cache_dtype,
    check_quantization,
)
from tokenmill.engine.stats import DEFAULT_LOG_STATS_INTERVAL_S

_S, _C, _V = SchedulerConfig(), CacheConfig(), ServerConfig()


def serve_command(
    model: Annotated[str | None, typer.Argument(
        help="A Hugging Face model folder (config.json + safetensors + tokenizer), a .gguf file, or a model "
             "name in the local HF cache. Omitted (or gemma-3-270m): the packaged default model.")] = None,
    model_option: Annotated[str | None, typer.Option(
        "--model", help="Same as the MODEL argument (vLLM accepts both forms).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind. 0.0.0.0 exposes the server to the network.")] = _V.host,
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = _V.port,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model name clients send in `model` and see in /v1/models (default: the MODEL argument).")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="TOKENMILL_API_KEY",
        help="Require `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize (env TOKENMILL_API_KEY).")] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Longest prompt + completion in tokens (default: the model's own limit).")] = None,
    kv_cache_memory: Annotated[float | None, typer.Option(
        help="KV cache size in GiB, used whole. Default: what --max-num-seqs sequences of --max-model-len "
             "tokens can use, at most 1.25 GiB (and 25% of free RAM); a model limit that does not fit is "
             "lowered.")] = _C.kv_cache_memory,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences decoded together in one step.")] = _S.max_num_seqs,
    max_num_batched_tokens: Annotated[int, typer.Option(
        help="Token budget per engine step (long prompts are prefilled in chunks of this).")] = _S.max_num_batched_tokens,
    dtype: Annotated[str, typer.Option(
        help="auto | float32 | bfloat16 | float16. auto: bf16 on CPUs that multiply bf16 natively (AMX, "
             "AVX512-BF16) and on CUDA, float32 on other CPUs. float32 matches transformers exactly.")] = "auto",
    kv_cache_dtype: Annotated[str, typer.Option(
        help="auto | float32 | bfloat16. auto: the model dtype. bfloat16 halves KV memory and bandwidth.")] = _C.kv_cache_dtype,
    quantization: Annotated[str, typer.Option(
        "--quantization", "-q",
        help="auto | none | q8_0 | q4_k. auto: a GGUF file keeps its quantized blocks (native 8-bit dot-product "
             "kernels, ~4x fewer bytes per token); none: dequantize everything (the exact path); q8_0 / q4_k: "
             "quantize a dense (safetensors) checkpoint's weights at load.")] = "auto",
    dense_batch_weights: Annotated[bool, typer.Option(
        "--dense-batch-weights/--no-dense-batch-weights",
        help="With quantized weights: also keep them dense for steps of more than 32 rows (16 for an LM head "
             "in a type other than Q8_0 / Q5_0): batched throughput of the dense path, for its memory (Gemma 3 "
             "270M +1.07 GB).")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    num_threads: Annotated[int | None, typer.Option(
        help="Engine compute threads (default: one per core the engine may use, see --cpu-cores).")] = None,
    cpu_cores: Annotated[str | None, typer.Option(
        help="Pin the engine to these cores, e.g. 0-3, 0,2,4 or 0-1,4 (like vLLM's VLLM_CPU_OMP_THREADS_BIND); "
             "give each replica on one machine its own cores. Default: not pinned.")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="Jinja chat template (a file path or the template text) overriding the model's own.")] = None,
    max_queued_requests: Annotated[int | None, typer.Option(
        help="Answer 429 with Retry-After once this many sequences wait for a batch slot (default: no limit).")] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV cache block.")] = _C.block_size,
    enable_prefix_caching: Annotated[bool, typer.Option(
        "--enable-prefix-caching/--no-enable-prefix-caching",
        help="Reuse KV blocks of identical prompt prefixes across requests.")] = _C.enable_prefix_caching,
    prefix_cache_salt: Annotated[str | None, typer.Option(
        envvar="TOKENMILL_PREFIX_CACHE_SALT",
        help="Secret mixed into every prefix-cache block hash (env TOKENMILL_PREFIX_CACHE_SALT, which keeps it "
             "out of the process list): hashes cannot be predicted without it. Requests isolate themselves "
             "from each other with `cache_salt`.")] = _C.prefix_cache_salt,
    speculative_config: Annotated[str | None, typer.Option(
        help="Speculative decoding as JSON, vLLM's keys: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
             "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' or '{\"model\": DRAFT_PATH, "
             "\"num_speculative_tokens\": 4}'; also disable_by_batch_size. Default: off (docs/speculative.md).")] = None,
    scheduling_policy: Annotated[str, typer.Option(
        help="fcfs | priority. Both admit lower `priority` values first, then by arrival (requests default to 0, "
             "Batch API lines run at 1); priority also preempts running lower-priority sequences for a "
             "higher-priority arrival.")] = _S.policy,
    task: Annotated[str, typer.Option(help="generate | embed (embed serves /v1/embeddings).")] = "generate",
    seed: Annotated[int, typer.Option(help="Seed for unseeded sampling.")] = 0,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM: seconds to let in-flight requests finish before exiting.")] = _V.drain_timeout_s,
    max_core_restarts: Annotated[int, typer.Option(
        min=0, help="Restart a dead engine core (backoff 1 s, 2 s, 4 s ...) at most this many times within "
                    "10 minutes; one more death and the server exits 1 for its supervisor to restart it. "
                    "0: exit at the first death.")] = _V.max_core_restarts,
    max_body_bytes: Annotated[int, typer.Option(help="Largest accepted request body (bigger: 413).")] = _V.max_body_bytes,
    max_prompt_chars: Annotated[int | None, typer.Option(
        min=1, help="Longest prompt text in characters (all prompts or messages of a request), refused with 400 "
                    "before tokenization. Default: max-model-len x 32, which no prompt that fits reaches.")] = None,
    metrics_open: Annotated[bool, typer.Option(
        "--metrics-open/--no-metrics-open",
        help="With --api-key: leave /metrics open for Prometheus scrapers (/health and /version are always "
             "open; every other path needs the key).")] = _V.metrics_open,
    trust_request_chat_template: Annotated[bool, typer.Option(
        "--trust-request-chat-template",
        help="Accept a `chat_template` in chat requests (its jinja loops run on the server's CPU).")] = False,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "info",
    log_requests: Annotated[bool, typer.Option(
        "--log-requests",
        help="Also log each request's prompt (truncated) and sampling parameters at INFO. Without it only a "
             "one-line summary per finished request is logged (ids, token counts, times; no prompt text).")] = False,
    log_stats_interval: Annotated[float, typer.Option(
        help="Seconds between the periodic throughput / queue / KV cache log lines (logged while there is "
             "activity); 0 turns them off.")] = DEFAULT_LOG_STATS_INTERVAL_S,
    disable_log_stats: Annotated[bool, typer.Option(
        "--disable-log-stats", help="No periodic stats lines (as vLLM's flag; same as --log-stats-interval 0).")] = False,
    enable_auto_tool_choice: Annotated[bool, typer.Option(
        "--enable-auto-tool-choice",
        help="Allow tool_choice \"auto\": the model writes free text and --tool-call-parser extracts the calls.")] = False,
    tool_call_parser: Annotated[str | None, typer.Option(
        help="hermes | llama3_json | pythonic: how the model writes tool calls (with --enable-auto-tool-choice). "
             "pythonic suits the default Gemma model.")] = None,
    batch_dir: Annotated[str | None, typer.Option(
        help="Where /v1/files and /v1/batches keep their files and job state (SQLite); a restart on the same "
             "directory resumes unfinished batches. One server per directory. Default: <cache>/batches "
             "($TOKENMILL_CACHE or ~/.cache/tokenmill).")] = None,
    max_batch_inflight: Annotated[int | None, typer.Option(
        min=1, help="Batch-API lines in the engine at once (all batches together), queued behind interactive "
                    "requests. Default: half of --max-num-seqs.")] = None,
    max_batch_inflight_shared: Annotated[int, typer.Option(
        min=1, help="Batch-API lines in the engine at once while interactive requests are in flight (each "
                    "running line slows every step); the batch fills up to --max-batch-inflight again when "
                    "interactive traffic stops.")] = _V.batch.max_inflight_shared,
    enable_lora: Annotated[bool, typer.Option(
        "--enable-lora", help="Serve LoRA adapters on the base model: a request picks one by its `model` "
                              "field (docs/lora.md).")] = False,
    lora_modules: Annotated[list[str] | None, typer.Option(
        help="Adapters served from start: name=path [name=path ...], or JSON '{\"name\": .., \"path\": ..}' "
             "(vLLM's forms); each path a PEFT folder. Needs --enable-lora.")] = None,
    max_loras: Annotated[int | None, typer.Option(
        help="Adapters that can run in one step (slots of stacked weights; default 1). Requests for more "
             "adapters wait for a slot without blocking others.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(
        help="Largest adapter rank accepted (default 16); the stacked weights are sized for it.")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(
        help="Adapters kept loaded in memory, least recently used dropped first (default: --max-loras).")] = None,
    allow_runtime_lora_updating: Annotated[bool, typer.Option(
        "--allow-runtime-lora-updating", envvar="TOKENMILL_ALLOW_RUNTIME_LORA_UPDATING",
        help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (env "
             "TOKENMILL_ALLOW_RUNTIME_LORA_UPDATING=True, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING). They read "
             "adapter folders from this server's disk, so they are off by default.")] = False,
) -> None:
    """Serve MODEL behind an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...)."""
    from tokenmill.config import EngineConfig, ModelConfig
    from tokenmill.server.launcher import run_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _model_arg(model, model_option)
    template = _read_template(chat_template)
    try:
        check_kv_cache_dtype(kv_cache_dtype)
    except ValueError:
        raise typer.BadParameter(f"{kv_cache_dtype!r}: must be auto, float32 or bfloat16",
                                 param_hint="--kv-cache-dtype") from None
    try:
        quantization = check_quantization(quantization)
    except ValueError:
        raise typer.BadParameter(f"{quantization!r}: must be one of {', '.join(QUANTIZATION_METHODS)}",
                                 param_hint="--quantization") from None
    placement = _cpu_placement(num_threads, cpu_cores)
    speculative = _speculative(speculative_config)
    lora = _lora(enable_lora, max_loras, max_lora_rank, max_cpu_loras, lora_modules, allow_runtime_lora_updating)
    _check_adapter_names(lora, served_model_name or model)
    engine_config = EngineConfig(
        model=ModelConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len, task=task,
                          served_model_name=served_model_name, chat_template=template, seed=seed,
                          quantization=quantization, dense_batch_weights=dense_batch_weights),
        cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                          enable_prefix_caching=enable_prefix_caching, prefix_cache_salt=prefix_cache_salt or None),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  policy=scheduling_policy),
        num_threads=num_threads, cpu_cores=placement.cores if placement.pinned else None,
        log_stats_interval_s=_stats_interval(log_stats_interval, disable_log_stats), speculative=speculative,
        lora=lora,
    )
    server_config = ServerConfig(host=host, port=port, api_key=api_key or None,
                                 max_queued_requests=max_queued_requests, max_body_bytes=max_body_bytes,
                                 drain_timeout_s=drain_timeout, log_requests=log_requests,
                                 max_core_restarts=max_core_restarts, max_prompt_chars=max_prompt_chars,
                                 metrics_open=metrics_open, trust_request_chat_template=trust_request_chat_template,
                                 tool_call_parser=_tool_parser(enable_auto_tool_choice, tool_call_parser),
                                 batch=BatchConfig(batch_dir=batch_dir, max_inflight=max_batch_inflight,
                                                   max_inflight_shared=max_batch_inflight_shared),
                                 allow_runtime_lora_updating=allow_runtime_lora_updating)
    raise typer.Exit(run_server(engine_config, server_config, template, log_level))


def _tool_parser(enabled: bool, name: str | None) -> str | None:
    """--enable-auto-tool-choice needs --tool-call-parser (and the other way round), as in vLLM."""
    from tokenmill.tools import TOOL_PARSERS

    if name is not None and name not in TOOL_PARSERS:
        raise typer.BadParameter(f"{name!r}: must be one of {', '.join(TOOL_PARSERS)}", param_hint="--tool-call-parser")
    if enabled and name is None:
        raise typer.BadParameter("--enable-auto-tool-choice needs a parser: add --tool-call-parser "
                                 f"({' | '.join(TOOL_PARSERS)})", param_hint="--tool-call-parser")
    if name is not None and not enabled:
        raise typer.BadParameter("a tool-call parser is used only with --enable-auto-tool-choice; add it",
                                 param_hint="--enable-auto-tool-choice")
    return name


def _speculative(text: str | None):
    from tokenmill.spec_decode.config import parse_speculative_config

    try:
        return parse_speculative_config(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--speculative-config") from None


def _lora(enable: bool, max_loras: int | None, max_lora_rank: int | None, max_cpu_loras: int | None,
          modules: list[str] | None, runtime_updating: bool):
    """--enable-lora and friends -> LoRAConfig (None: off), one-line errors under the option's name."""
    from tokenmill.engine.args import lora_config

    if runtime_updating and not enable:
        raise typer.BadParameter("loading adapters at run time needs --enable-lora", param_hint="--enable-lora")
    try:
        return lora_config(enable, max_loras, max_lora_rank, max_cpu_loras, modules)
    except ValueError as e:
        field = str(e).removeprefix("invalid ").split("=")[0].split(":")[0].split(" ")[0]
        raise typer.BadParameter(str(e), param_hint="--" + field.replace("_", "-")) from None


def _check_adapter_names(lora, base_name: str | None) -> None:
    """A request's `model` picks the base model or an adapter by name, so the names must differ."""
    from tokenmill.model.default_model import DEFAULT_MODEL_NAME

    base_name = base_name or DEFAULT_MODEL_NAME
    clash = next((n for n, _ in (lora.lora_modules if lora else ()) if n == base_name), None)
    if clash is not None:
        raise typer.BadParameter(f"the adapter name {clash!r} is the served model's name; give it another name",
                                 param_hint="--lora-modules")


def expand_lora_modules(argv: list[str]) -> list[str]:
    """vLLM's `--lora-modules a=p b=q` (several values after one flag) -> `--lora-modules a=p --lora-modules
    b=q`, which click parses. Values are the words after the flag up to the next option, while they look like
    name=path or a JSON object (so a MODEL argument after them stays the model)."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--lora-modules":
            i += 1
            first = True
            while i < len(argv) and (first or _looks_like_lora_module(argv[i])):
                out += ([] if first else ["--lora-modules"]) + [argv[i]]
                first, i = False, i + 1
            continue
        i += 1
    return out


def _looks_like_lora_module(word: str) -> bool:
    return not word.startswith("-") and ("=" in word or word.lstrip().startswith("{"))


def _stats_interval(seconds: float, disabled: bool) -> float | None:
    if seconds < 0:
        raise typer.BadParameter(f"{seconds}: must be >= 0 seconds (0 turns the stats lines off)",
                                 param_hint="--log-stats-interval")
    return None if disabled or seconds == 0 else seconds


def _cpu_placement(num_threads: int | None, cpu_cores: str | None):
    """--num-threads / --cpu-cores checked against the cores this process may use (one-line errors)."""
    from tokenmill.cpu_affinity import parse_cpu_list, resolve_placement

    try:
        cores = None if cpu_cores is None else parse_cpu_list(cpu_cores)
        return resolve_placement(num_threads, cores)
    except ValueError as e:  # "invalid <field>=<value>: <why>" -> "<value>: <why>" under the option's name
        field, _, why = str(e).removeprefix("invalid ").partition("=")
        hint = "--num-threads" if field == "num_threads" else "--cpu-cores"
        raise typer.BadParameter(why, param_hint=hint) from None


def _model_arg(positional: str | None, option: str | None) -> str | None:
    """MODEL or --model (one of them, or both the same), checked before the engine starts."""
    from tokenmill.model.discovery import check_model

    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"MODEL is {positional!r} but --model is {option!r}; give the model once",
                                 param_hint="--model")
    model = positional if positional is not None else option
    if model is not None:
        try:
            check_model(model)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="MODEL / --model") from None
    return model


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    if "{" not in value:  # not template text, so it must name a file
        path = Path(value).expanduser()
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {value} (pass a template file or the template text)",
                                     param_hint="--chat-template")
        return path.read_text()
    return value
