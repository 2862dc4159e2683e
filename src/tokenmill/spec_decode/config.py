"""`--speculative-config JSON` and `LLM(speculative_config=...)`: vLLM's keys -> config.SpeculativeConfig.

Accepts what vLLM's users write: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
{"model": "[ngram]", ...} (vLLM's older spelling of ngram), {"model": PATH, "num_speculative_tokens": 4}
(a model without a method is a draft model), as a dict or a JSON string. vLLM keys for features this engine
does not have are refused by name, never ignored: a config that silently did less than asked would mislead.
Imports no torch (the engine's argument parsing and the serve CLI use it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from tokenmill.config import SPECULATIVE_METHODS, SpeculativeConfig

SUPPORTED_KEYS = ("method", "num_speculative_tokens", "model", "prompt_lookup_max", "prompt_lookup_min",
                  "disable_by_batch_size")
MAX_SPECULATIVE_TOKENS = 16
# vLLM's defaults when neither prompt_lookup key is given (one given: the other takes its value).
DEFAULT_PROMPT_LOOKUP = 5
_NGRAM_NAMES = ("ngram", "[ngram]")  # "[ngram]": vLLM's older spelling, as method or as model
_NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")
_DEFAULTS = SpeculativeConfig()

# vLLM keys whose only meaningful value is this engine's one behaviour: accepted at that value.
_FIXED = {"draft_tensor_parallel_size": 1, "rejection_sample_method": "standard", "draft_sample_method": "greedy"}
# vLLM keys that tune GPU execution only (CUDA graphs, padding): no effect on what is computed, accepted.
_NO_EFFECT = ("enforce_eager", "disable_padded_drafter_batch", "use_local_argmax_reduction")
# vLLM keys of features not built here: refused with this reason.
_UNSUPPORTED = {
    **dict.fromkeys(("quantization", "revision", "code_revision", "max_model_len", "kv_cache_dtype",
                     "draft_load_config", "hf_overrides"),
                    "the draft model loads like the target (same loader and dtype); give its path in `model`"),
    **dict.fromkeys(("tensor_parallel_size", "moe_backend", "attention_backend"), "one device, no parallelism"),
    **dict.fromkeys(("acceptance_method", "posterior_threshold", "posterior_alpha", "synthetic_acceptance_rates",
                     "synthetic_acceptance_length", "enable_adaptive_verification"),
                    "verification is exact (greedy: identical output; sampling: standard rejection sampling)"),
    **dict.fromkeys(("speculative_token_tree", "parallel_drafting", "num_speculative_tokens_per_batch_size",
                     "use_heterogeneous_vocab", "disable_mqa_scorer", "disable_logprobs", "disable_log_stats",
                     "disable_eagle_block_drop", "index_share_for_mtp_iteration", "dspark_draft_topk",
                     "suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
                     "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob"),
                    "not supported by tokenmill's speculative decoding"),
}
# vLLM's other methods: named so the error says "not supported" rather than "unknown".
_VLLM_METHODS = ("eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "deepseek_mtp", "ernie_mtp", "mimo_mtp",
                 "qwen3_next_mtp", "longcat_flash_mtp", "suffix", "ngram_gpu", "custom_class", "dflash",
                 "extract_hidden_states")


def _fail(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"invalid speculative_config.{key}={value!r}: {why}")


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """A SpeculativeConfig from vLLM's dict or its JSON text (None, "null": speculation off).

    Raises ValueError naming the key, what was wrong and what is allowed.
    """
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):  # checked like a dict (a hand-built one may be out of range)
        d = asdict(value)
        if d["method"] != "ngram":
            d = {k: v for k, v in d.items() if k not in _NGRAM_KEYS}
        return _build(d)
    if isinstance(value, (str, bytes)):
        value = _loads(value)
        if value is None:
            return None
    if not isinstance(value, Mapping):  # a user error, reported like every other one here
        raise ValueError(  # noqa: TRY004
            f"invalid speculative_config of type {type(value).__name__}: must be a JSON object such as "
            '{"method": "ngram", "num_speculative_tokens": 4}')
    return _build(dict(value))


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise ValueError(f"invalid speculative_config: not valid JSON ({e}); expected an object such as "
                         '{"method": "ngram", "num_speculative_tokens": 4}') from None


def _build(cfg: dict[str, Any]) -> SpeculativeConfig:
    for key in list(cfg):
        if not isinstance(key, str):
            raise _fail(str(key), cfg[key], f"keys must be strings; allowed keys: {', '.join(SUPPORTED_KEYS)}")
        _check_extra_key(key, cfg)
    method = _method(cfg.get("method"), cfg.get("model"))
    k = _int(cfg, "num_speculative_tokens", required=True, hi=MAX_SPECULATIVE_TOKENS)
    # Absent: the default of config.py; an explicit null: speculate at every batch size.
    batch = (_int(cfg, "disable_by_batch_size", required=False) if "disable_by_batch_size" in cfg
             else _DEFAULTS.disable_by_batch_size)
    if method == "ngram":
        lo, hi = _lookup_window(cfg)
        return SpeculativeConfig(method=method, num_speculative_tokens=k, prompt_lookup_max=hi,
                                 prompt_lookup_min=lo, model=None, disable_by_batch_size=batch)
    for key in _NGRAM_KEYS:
        if cfg.get(key) is not None:
            raise _fail(key, cfg[key], "applies to method 'ngram' only (this config is a draft model)")
    model = cfg.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _fail("model", model, "method 'draft_model' needs the draft model: a HF folder or a .gguf file "
                    "with the target's vocabulary")
    return SpeculativeConfig(method=method, num_speculative_tokens=k, model=model, disable_by_batch_size=batch)


def _check_extra_key(key: str, cfg: dict[str, Any]) -> None:
    """Keys beyond SUPPORTED_KEYS: accepted when they change nothing here, else refused by name."""
    if key in SUPPORTED_KEYS or key in _NO_EFFECT:
        return
    if key in _FIXED:
        if cfg[key] is not None and cfg[key] != _FIXED[key]:
            raise _fail(key, cfg[key], f"only {_FIXED[key]!r} is supported here")
        return
    if key in _UNSUPPORTED:
        raise _fail(key, cfg[key], f"this vLLM key is not supported here ({_UNSUPPORTED[key]}); allowed keys: "
                    f"{', '.join(SUPPORTED_KEYS)}")
    raise _fail(key, cfg[key], f"unknown key; allowed keys: {', '.join(SUPPORTED_KEYS)}")


def _method(method: Any, model: Any) -> str:
    """vLLM's inference: no method and model "ngram" / "[ngram]" -> ngram; no method and a model -> draft_model."""
    if method is None:
        if model is None:
            raise _fail("method", None, f"give method (one of {', '.join(SPECULATIVE_METHODS)}) or model "
                        "(a draft model path)")
        return "ngram" if model in _NGRAM_NAMES else "draft_model"
    if method in _NGRAM_NAMES:
        if model is not None and model not in _NGRAM_NAMES:
            raise _fail("model", model, "method 'ngram' looks tokens up in the sequence itself and takes no "
                        "model; use method 'draft_model' for a draft model")
        return "ngram"
    if method in SPECULATIVE_METHODS:
        return method
    why = "not supported here" if method in _VLLM_METHODS else "unknown method"
    raise _fail("method", method, f"{why}; supported methods: {', '.join(SPECULATIVE_METHODS)}")


def _lookup_window(cfg: dict[str, Any]) -> tuple[int, int]:
    """(prompt_lookup_min, prompt_lookup_max) with vLLM's defaults."""
    hi = _int(cfg, "prompt_lookup_max", required=False)
    lo = _int(cfg, "prompt_lookup_min", required=False)
    if hi is None and lo is None:
        return DEFAULT_PROMPT_LOOKUP, DEFAULT_PROMPT_LOOKUP
    hi = lo if hi is None else hi
    lo = hi if lo is None else lo
    assert lo is not None and hi is not None
    if lo > hi:
        raise _fail("prompt_lookup_min", lo, f"must be <= prompt_lookup_max ({hi})")
    return lo, hi


def _int(cfg: dict[str, Any], key: str, required: bool, hi: int | None = None) -> int | None:
    value = cfg.get(key)
    if value is None:
        if required:
            raise _fail(key, value, f"required: the number of tokens proposed per step, 1..{hi}")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, "must be an integer")
    if value < 1 or (hi is not None and value > hi):
        raise _fail(key, value, f"must be between 1 and {hi}" if hi is not None else "must be >= 1")
    return value
