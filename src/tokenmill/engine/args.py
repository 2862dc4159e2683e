"""vLLM-named engine arguments -> EngineConfig, and prompt normalisation shared by LLM and AsyncLLM."""

from __future__ import annotations

from typing import Any

from tokenmill.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    check_kv_cache_dtype,
    check_quantization,
)
from tokenmill.cpu_affinity import parse_cpu_list, resolve_placement
from tokenmill.engine.stats import DEFAULT_LOG_STATS_INTERVAL_S
from tokenmill.spec_decode.config import parse_speculative_config

# vLLM arguments that have no meaning here (GPU sharding, CUDA graphs...): accepted so vLLM code runs unchanged.
_IGNORED = {
    "gpu_memory_utilization", "trust_remote_code", "enforce_eager", "tensor_parallel_size", "pipeline_parallel_size",
    "swap_space", "cpu_offload_gb", "revision", "tokenizer_mode",
    "disable_custom_all_reduce", "max_seq_len_to_capture", "compilation_config",
    "tokenizer_revision", "download_dir", "load_format", "distributed_executor_backend",
}


def engine_config(model: str | None = None, **kw: Any) -> EngineConfig:
    """Build an EngineConfig from vLLM's engine-argument names; unknown names raise TypeError naming them."""
    for name in _IGNORED & kw.keys():
        kw.pop(name)
    m = ModelConfig(
        model=model,
        tokenizer=kw.pop("tokenizer", None),
        dtype=kw.pop("dtype", "auto"),
        device=kw.pop("device", "auto"),
        max_model_len=kw.pop("max_model_len", None),
        task=kw.pop("task", "generate"),
        served_model_name=kw.pop("served_model_name", None),
        chat_template=kw.pop("chat_template", None),
        seed=kw.pop("seed", 0) or 0,
        quantization=check_quantization(kw.pop("quantization", None)),
        dense_batch_weights=bool(kw.pop("dense_batch_weights", False)),
    )
    c = CacheConfig(
        block_size=kw.pop("block_size", None) or 16,
        kv_cache_memory=kw.pop("kv_cache_memory", None),
        kv_cache_dtype=kw.pop("kv_cache_dtype", None) or "auto",
        enable_prefix_caching=kw.pop("enable_prefix_caching", True),
        num_gpu_blocks_override=kw.pop("num_gpu_blocks_override", None),
        prefix_cache_salt=kw.pop("prefix_cache_salt", None) or None,
    )
    chunked = kw.pop("enable_chunked_prefill", None)
    s = SchedulerConfig(
        max_num_seqs=kw.pop("max_num_seqs", None) or 64,
        max_num_batched_tokens=kw.pop("max_num_batched_tokens", None) or 2048,
        enable_chunked_prefill=True if chunked is None else bool(chunked),
        policy=kw.pop("scheduling_policy", "fcfs"),
        grammar_compile_timeout_s=kw.pop("grammar_compile_timeout_s", None) or 30.0,
        grammar_compile_threads=kw.pop("grammar_compile_threads", None) or 2,
    )
    # vLLM's LLM() defaults to disable_log_stats=True; disable_log_stats=False logs the periodic stats line.
    log_stats = DEFAULT_LOG_STATS_INTERVAL_S if kw.pop("disable_log_stats", True) is False else None
    speculative = parse_speculative_config(kw.pop("speculative_config", None))  # dict or vLLM's JSON text
    threads = kw.pop("num_threads", None)
    cores = kw.pop("cpu_cores", None)
    lora = lora_config(kw.pop("enable_lora", False), kw.pop("max_loras", None), kw.pop("max_lora_rank", None),
                       kw.pop("max_cpu_loras", None), kw.pop("lora_modules", None))
    if kw:
        raise TypeError(f"unknown engine argument(s): {', '.join(sorted(kw))}")
    if c.block_size < 1:
        raise ValueError(f"invalid block_size={c.block_size}: must be a positive integer")
    check_kv_cache_dtype(c.kv_cache_dtype)
    # Checked here, in the caller's process, so a bad core list fails before any model loads.
    placement = resolve_placement(threads, None if cores is None else parse_cpu_list(cores))
    return EngineConfig(model=m, cache=c, scheduler=s, num_threads=threads,
                        cpu_cores=placement.cores if placement.pinned else None, log_stats_interval_s=log_stats,
                        speculative=speculative, lora=lora)


def lora_config(enable_lora: bool, max_loras: int | None = None, max_lora_rank: int | None = None,
                max_cpu_loras: int | None = None, lora_modules: Any = None) -> LoRAConfig | None:
    """vLLM's LoRA arguments -> LoRAConfig (None: LoRA off); ValueError naming the argument otherwise.
    lora_modules: "name=path" strings, JSON objects {"name", "path"[, "base_model_name"]} (as text or dicts),
    or (name, path) pairs."""
    modules = tuple(parse_lora_module(m) for m in lora_modules or ())
    if not enable_lora:
        given = [n for n, v in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank),
                                ("max_cpu_loras", max_cpu_loras), ("lora_modules", modules)) if v]
        if given:
            raise ValueError(f"invalid {given[0]}: LoRA options need enable_lora=True (--enable-lora)")
        return None
    default = LoRAConfig()
    cfg = LoRAConfig(max_loras=default.max_loras if max_loras is None else max_loras,
                     max_lora_rank=default.max_lora_rank if max_lora_rank is None else max_lora_rank,
                     max_cpu_loras=max_cpu_loras, lora_modules=modules)
    for name in ("max_loras", "max_lora_rank"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"invalid {name}={value!r}: must be an integer >= 1")
    if cfg.max_cpu_loras is not None and (not isinstance(cfg.max_cpu_loras, int) or cfg.max_cpu_loras < cfg.max_loras):
        raise ValueError(f"invalid max_cpu_loras={cfg.max_cpu_loras!r}: must be an integer >= max_loras "
                         f"({cfg.max_loras}): the adapters of a step are also kept in memory")
    names = [n for n, _ in modules]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"invalid lora_modules: the name {dup!r} is given twice; each adapter needs its own name")
    return cfg


def parse_lora_module(spec: Any) -> tuple[str, str]:
    """One --lora-modules entry -> (served name, path): "name=path", '{"name": .., "path": ..}', a dict with
    those keys, or a (name, path) pair. vLLM's base_model_name is accepted; adapters' parent is always
    the served base model here."""
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        import json

        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid lora_modules entry {spec!r}: not valid JSON ({e.msg})") from None
    if isinstance(spec, str):
        name, sep, path = spec.partition("=")
    elif isinstance(spec, dict):
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"invalid lora_modules entry {spec!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                             "allowed: name, path, base_model_name")
        name, sep, path = spec.get("name"), "=", spec.get("path")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        (name, path), sep = spec, "="
    else:
        name, sep, path = None, "", None
    if not sep or not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
        raise ValueError(f"invalid lora_modules entry {spec!r}: must be name=path or a JSON object "
                         '{"name": ..., "path": ...} with a non-empty name and path')
    return name.strip(), path.strip()


def normalize_prompt(prompt: Any, tokenizer: Any) -> tuple[str | None, list[int]]:
    """A prompt is a str, a list of token ids, {"prompt_token_ids": [...]} or {"prompt": str}."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            return prompt.get("prompt"), _check_ids(ids)
        if "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("invalid prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("invalid prompt: text prompts need a tokenizer; pass prompt_token_ids")
        return prompt, list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, (list, tuple)):
        return None, _check_ids(prompt)
    raise ValueError(f"invalid prompt of type {type(prompt).__name__}: must be a str, a list of token ids, "
                     "or a dict with 'prompt' or 'prompt_token_ids'")


def _check_ids(ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("invalid prompt_token_ids: must be a list of integers")
    if not ids:
        raise ValueError("invalid prompt_token_ids: empty; at least one token is required")
    return list(ids)
