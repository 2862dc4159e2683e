"""SamplingParams: per-request generation parameters, vLLM-compatible names."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

_MAX_N = 128
_MAX_LOGPROBS = 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what crosses to the engine core (msgpack int64)
_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class StructuredOutputsParams:
    """One decoding constraint per request (vLLM's shape): a JSON schema (dict or JSON text), a regex, a list
    of choices, an EBNF grammar (GBNF as llama.cpp writes it), or any JSON object. Exactly one kind is set.
    `disable_any_whitespace`: JSON without optional whitespace runs (xgrammar, like vLLM, still writes one space
    after ":" and ","); otherwise whitespace runs are bounded.
    Plain values only, so it crosses the engine-core boundary through msgpack."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"invalid structured_outputs.json: not valid JSON ({e})") from None
        kinds = self.kinds
        if len(kinds) != 1:
            got = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"invalid structured_outputs: exactly one of {', '.join(_KINDS)} must be set; got {got}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("invalid structured_outputs.json: must be a JSON schema (an object)")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("invalid structured_outputs.choice: must be a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"invalid structured_outputs.{name}: must be a non-empty string")

    @property
    def kinds(self) -> list[str]:
        return [k for k in _KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds[0]


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives; 0 = sampled token only
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # Prefix-cache isolation (vLLM's cache_salt): only requests with the same salt share cached KV blocks.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):  # from the wire (msgpack) or a plain dict
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ValueError naming the field, what was wrong and what is allowed."""
        _check(isinstance(self.n, int) and 1 <= self.n <= _MAX_N, "n", self.n, f"an integer in [1, {_MAX_N}]")
        for name in _FLOATS:  # NaN passes no range test below by accident; Infinity would pass some
            v = getattr(self, name)
            _check(isinstance(v, int | float) and math.isfinite(v), name, v, "a finite number")
        _check(self.temperature >= 0.0, "temperature", self.temperature, ">= 0 (0 means greedy)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "0 or -1 (disabled) or a positive integer")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check(isinstance(v, int) and 0 <= v <= _MAX_LOGPROBS, name, v, f"an integer in [0, {_MAX_LOGPROBS}]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "non-negative token ids")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                _check(k >= 0, "logit_bias", k, "non-negative token ids as keys")
                _check(-100.0 <= v <= 100.0, "logit_bias", v, "values in [-100, 100]")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and _INT64_MIN <= self.seed <= _INT64_MAX, "seed", self.seed,
                   "an integer in [-2^63, 2^63-1]")
        if self.cache_salt is not None:
            _check(isinstance(self.cache_salt, str) and self.cache_salt != "", "cache_salt", self.cache_salt,
                   "a non-empty string (or unset)")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: must be {allowed}")
