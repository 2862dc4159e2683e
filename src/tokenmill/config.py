"""Frozen configuration dataclasses: the one home of defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp32", "bf16")  # auto: the model dtype


def check_kv_cache_dtype(name: str) -> str:
    """The name itself when it is one of KV_CACHE_DTYPES, else ValueError naming the field and what is allowed."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"invalid kv_cache_dtype={name!r}: must be auto, float32 or bfloat16")
    return name


# auto: a GGUF file keeps its block types (the native quantized kernels), other checkpoints stay dense;
# none: everything dequantized to the model dtype (the exact path); q8_0 / q4_k: dense weights quantized at load.
QUANTIZATION_METHODS = ("auto", "none", "q8_0", "q4_k")
_QUANTIZATION_ALIASES = {None: "auto", "gguf": "auto", "dense": "none"}


def check_quantization(name: str | None) -> str:
    """The canonical method name (None and 'gguf' mean auto), else ValueError naming what is allowed."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = _QUANTIZATION_ALIASES.get(key, key)
    if key not in QUANTIZATION_METHODS:
        raise ValueError(f"invalid quantization={name!r}: must be one of {', '.join(QUANTIZATION_METHODS)} "
                         "(auto keeps a GGUF file's block types, none dequantizes them)")
    return key


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What to load and how. `model` is a HF folder, a .gguf file, a HF-cache name, or None (default model)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # None: from the model config
    task: str = "generate"  # generate | embed
    served_model_name: str | None = None
    chat_template: str | None = None  # path or inline jinja; None: the model's own, else the fallback
    seed: int = 0
    quantization: str = "auto"  # see QUANTIZATION_METHODS
    # Block weights also kept dense (model dtype) for steps of more than 32 rows: batched throughput of the
    # dense path, for its memory (Gemma 3 270M: +1.07 GB in float32).
    dense_batch_weights: bool = False


# With kv_cache_memory=None on CPU, the KV cache is what max_num_seqs x max_model_len can use, capped at this many
# GiB and at this fraction of available memory. 1.25 GiB holds the default model's whole 32k context next to 64
# sequences in its sliding-window layers (float32), and keeps `tokenmill serve` under 2.5 GB resident.
AUTO_KV_CACHE_MEMORY_GIB = 1.25
AUTO_KV_CACHE_MEMORY_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache. `kv_cache_memory` in GiB, used whole; None: what max_num_seqs x max_model_len can use,
    capped by AUTO_KV_CACHE_MEMORY_GIB (executor/kv_sizing.py)."""

    block_size: int = 16
    kv_cache_memory: float | None = None
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | float32 | bfloat16
    enable_prefix_caching: bool = True
    # Explicit block count (tests): overrides kv_cache_memory when set.
    num_gpu_blocks_override: int | None = None
    # Mixed into every prefix-cache block hash: hashes differ across deployments and cannot be predicted
    # without it. None: unsalted (requests' own cache_salt still isolates them). repr=False: a secret.
    prefix_cache_salt: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority
    # Structured output: a request whose grammar is not compiled within this many seconds fails (only it);
    # compiles run on this many threads, off the step loop.
    grammar_compile_timeout_s: float = 30.0
    grammar_compile_threads: int = 2

SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's --speculative-config keys). method "ngram": prompt lookup over each
    sequence's own tokens; "draft_model": a smaller model (`model`, same vocabulary) proposes greedily.
    Proposals are verified in the target's forward pass: greedy output is identical to no speculation, sampled
    output keeps the target distribution (spec_decode/)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4  # ngram: longest suffix of the sequence matched against its earlier tokens
    prompt_lookup_min: int = 2  # ngram: shortest suffix worth a match
    model: str | None = None  # draft_model: HF folder or .gguf
    # No proposals in a step that decodes more than this many sequences: extra draft rows cost more than they
    # save at larger batches (benchmarks/spec_decode.py --sweep on the default model, GGUF blocks, since the fused
    # decode step: 1.49x at 1 sequence, 1.07x at 2, 0.90x at 4, 0.94x at 8). None: speculate at every batch size.
    disable_by_batch_size: int | None = 2


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's names). Up to max_loras adapters run in one step (stacked weights, one
    batched matmul per layer); up to max_cpu_loras stay loaded in memory, least recently used evicted."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    # Adapters served from start: (served name, path) pairs (--lora-modules name=path).
    lora_modules: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None  # torch intra-op threads; None: the cores the engine may use
    # Cores the engine core process is pinned to (sorted ids; see cpu_affinity); None: not pinned. The offline
    # LLM runs its runner in the calling process, so that process is pinned.
    cpu_cores: tuple[int, ...] | None = None
    # Seconds between AsyncLLM's periodic throughput / queue / KV log lines; None: no such lines (vLLM's
    # --disable-log-stats). `tokenmill serve` logs every DEFAULT_LOG_STATS_INTERVAL_S (engine/stats.py).
    log_stats_interval_s: float | None = None
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    lora: LoRAConfig | None = None  # None: LoRA disabled (--enable-lora sets it)


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """Durable batch jobs (/v1/files, /v1/batches). Limits are OpenAI's Batch API limits."""

    batch_dir: str | None = None  # None: <cache root>/batches (model/cache_dir.py)
    # Batch lines in the engine at once, over all jobs; None: half of max_num_seqs, so interactive
    # requests always find free slots.
    max_inflight: int | None = None
    # Batch lines in the engine while interactive requests are in flight: each running batch line adds
    # its decode to every engine step, so it stretches interactive TTFT and ITL even behind the scheduler's
    # priority order. New lines wait until the lines in flight drop below this or interactive traffic stops.
    max_inflight_shared: int = 4
    # Engine priority of batch lines: larger is served later (vLLM's convention); interactive requests are 0.
    priority: int = 1
    max_file_bytes: int = 200 * 1024 * 1024
    max_lines: int = 50_000
    max_listed_errors: int = 100  # validation errors reported per failed batch; counting continues past it


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # repr=False: a logged config never shows the key
    max_queued_requests: int | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout_s: float = 30.0
    # Log each request's prompt (truncated) and sampling params at INFO; off: only the per-request summary.
    log_requests: bool = False
    # tool_choice "auto": the tool-call parser (tokenmill/tools) that extracts calls from model text;
    # None: "auto" is refused (vLLM's --enable-auto-tool-choice --tool-call-parser NAME).
    tool_call_parser: str | None = None
    max_tools: int = 128  # tools per request (OpenAI's limit)
    # Bounds on a request's decoding constraint (JSON schema, regex, grammar, choices), checked before the
    # engine core sees it: compile time and matcher memory grow with size and nesting.
    max_structured_output_bytes: int = 64 * 1024
    max_json_schema_depth: int = 32
    # Hostile-input bounds (docs/reliability.md), each a 400 naming the field and the bound.
    max_json_depth: int = 128  # body nesting; Python's JSON decoder itself overflows its stack near 1000
    max_stop_strings: int = 128  # OpenAI allows 4; vLLM sets no bound. Each is matched on every new token.
    max_stop_chars: int = 8192  # all stop strings together
    max_stop_token_ids: int = 1024
    max_logit_bias: int = 2048  # entries of logit_bias
    max_seqs_per_request: int = 1024  # n times the number of prompts
    # Characters of prompt text (all prompts / messages of a request) checked BEFORE tokenization, so a
    # multi-megabyte string costs nothing. None: max_model_len * prompt_chars_per_token, which no real
    # tokenizer reaches (their longest tokens are runs of ~16-32 spaces or symbols).
    max_prompt_chars: int | None = None
    prompt_chars_per_token: int = 32
    # A chat_template sent in a request is sandboxed jinja, but its loops are unbounded CPU: off unless trusted.
    trust_request_chat_template: bool = False
    # With api_key set, /metrics stays open for Prometheus scrapers unless this is False.
    metrics_open: bool = True
    # Engine core deaths: restart the core after core_restart_backoff_s, doubling per restart still inside
    # the window (capped at core_restart_max_backoff_s); more than max_core_restarts restarts within
    # core_restart_window_s (sliding) and the server exits 1, for the orchestrator to restart it.
    max_core_restarts: int = 3
    core_restart_window_s: float = 600.0
    core_restart_backoff_s: float = 1.0
    core_restart_max_backoff_s: float = 30.0
    batch: BatchConfig = field(default_factory=BatchConfig)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): off,
    # they answer 404 like vLLM's, since they read adapter folders from this server's disk.
    allow_runtime_lora_updating: bool = False
