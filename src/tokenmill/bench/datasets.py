"""Benchmark workloads: `random` (exact token lengths), `custom` (JSONL prompts), `sharegpt` (conversations).

Mirrors `vllm bench serve`'s dataset semantics so the same flags give the same workload shape:
`--random-input-len` counts the tokens the server sees, so the special tokens the tokenizer adds (a BOS)
are taken off the text's length first (as vLLM does; 128 gives 127 text tokens + BOS with Gemma); random
lengths are drawn uniformly from [len*(1-ratio), len*(1+ratio)] of that text length, and every prompt is
re-tokenized until it encodes to exactly its target length with the real tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASET_NAMES = ("random", "custom", "sharegpt")


@dataclass(slots=True)
class SampleRequest:
    """One request of a workload. `prompt_len` counts prompt tokens as the benchmark tokenizer sees them
    (without the special tokens the server adds; the server's usage report replaces it when it sends one)."""

    prompt: str
    prompt_len: int
    expected_output_len: int


def load_tokenizer(name_or_path: str) -> Any:
    """A HF tokenizer from a local folder. Never reaches the hub: benchmarks must be reproducible offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        if name_or_path.endswith(".gguf"):
            # The tokenizer tokenmill itself serves a GGUF with (converted once, cached by file hash).
            from tokenmill.model.cache_dir import file_hash
            from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer

            return load_gguf_tokenizer(name_or_path, file_hash(name_or_path))
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception as exc:  # transformers raises several types for "not found"
        raise ValueError(
            f"--tokenizer: cannot load a tokenizer from {name_or_path!r} ({exc}); "
            "pass a local folder holding tokenizer.json / tokenizer_config.json, or a .gguf file"
        ) from exc


def _length_bounds(length: int, ratio: float, field: str) -> tuple[int, int]:
    if length < 1:
        raise ValueError(f"{field} must be >= 1, got {length}")
    low = max(1, int(np.floor(length * (1.0 - ratio))))
    high = int(np.ceil(length * (1.0 + ratio)))
    return low, high


class _CleanTokens:
    """Draws vocabulary ids that are safe building blocks for text prompts.

    A token is clean when it is not special (no EOS/BOS/pad in prompts) and decodes to text that
    re-encodes to exactly itself: byte-fragment tokens would decode to U+FFFD and break exact lengths.
    Checked lazily, so huge vocabularies cost nothing up front.
    """

    def __init__(self, tokenizer: Any, rng: np.random.Generator) -> None:
        self._tok = tokenizer
        self._rng = rng
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._vocab_size = len(tokenizer)
        self._ok: dict[int, bool] = {}
        # A tokenizer behind HTTP (bench/server_tokenizer.py) checks a pool of ids in batches up front:
        # one request pair per candidate id would take thousands of requests per prompt.
        pool = getattr(tokenizer, "clean_token_pool", None)
        self._pool = pool(rng) if pool else None

    def _clean(self, token_id: int) -> bool:
        if token_id not in self._ok:
            text = self._tok.decode([token_id])
            self._ok[token_id] = (token_id not in self._special and bool(text.strip()) and "\ufffd" not in text
                                  and self._tok.encode(text, add_special_tokens=False) == [token_id])
        return self._ok[token_id]

    def draw(self, n: int) -> list[int]:
        if self._pool is not None:
            return [self._pool[int(i)] for i in self._rng.integers(0, len(self._pool), size=n)]
        out: list[int] = []
        for _ in range(200 * max(n, 1)):
            if len(out) == n:
                return out
            token_id = int(self._rng.integers(0, self._vocab_size))
            if self._clean(token_id):
                out.append(token_id)
        raise ValueError("--tokenizer: too few plain-text tokens in the vocabulary to build random prompts")


def _prompt_of_exact_length(tokenizer: Any, target: int, clean: _CleanTokens) -> tuple[str, int]:
    """Random text that encodes to `target` tokens (fewer only if the tokenizer makes it impossible).

    Joining tokens and re-encoding merges some of them, so the text is grown token by token when short
    and trimmed character by character when long (trimming text never re-splits into more tokens).
    """

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    text = tokenizer.decode(clean.draw(target))
    length = count(text)
    for _ in range(4 * target + 20):
        if length == target:
            break
        if length < target:
            text += tokenizer.decode(clean.draw(target - length))
        else:
            # Cut about half the excess at once (then single characters near the target): fast on long prompts.
            text = text[: -max(1, (length - target) * len(text) // length // 2)]
        length = count(text)
    return text, length


def sample_random(tokenizer: Any, num_prompts: int, input_len: int, output_len: int,
                  range_ratio: float, seed: int) -> list[SampleRequest]:
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    # Like vLLM: the special tokens the server adds to every prompt (BOS) count towards --random-input-len.
    num_special = int(getattr(tokenizer, "num_special_tokens_to_add", lambda: 0)())
    if input_len - num_special < 1:
        raise ValueError(f"--random-input-len must be > {num_special} (the tokenizer adds {num_special} "
                         f"special tokens), got {input_len}")
    in_low, in_high = _length_bounds(input_len - num_special, range_ratio, "--random-input-len")
    out_low, out_high = _length_bounds(output_len, range_ratio, "--random-output-len")
    input_lens = rng.integers(in_low, in_high + 1, size=num_prompts)
    output_lens = rng.integers(out_low, out_high + 1, size=num_prompts)
    clean = _CleanTokens(tokenizer, rng)
    requests = []
    for i in range(num_prompts):
        text, length = _prompt_of_exact_length(tokenizer, int(input_lens[i]), clean)
        requests.append(SampleRequest(prompt=text, prompt_len=length, expected_output_len=int(output_lens[i])))
    return requests


def _count(tokenizer: Any | None, text: str) -> int:
    # Without a tokenizer the server's usage report fills the counts in later; 0 marks "unknown".
    if tokenizer is None:
        return 0
    return len(tokenizer.encode(text, add_special_tokens=False))


def sample_custom(path: str, tokenizer: Any | None, num_prompts: int, output_len: int,
                  seed: int) -> list[SampleRequest]:
    """JSONL, one object a line with a `prompt` string and optionally `output_len` / `max_tokens`."""
    requests = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--dataset-path {path}:{line_no}: not JSON ({exc.msg})") from exc
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                # A user's file, not a caller's type mistake: ValueError, like every other bad flag.
                msg = f"--dataset-path {path}:{line_no}: each line needs a string field 'prompt'"
                raise ValueError(msg)  # noqa: TRY004
            out = int(row.get("output_len", row.get("max_tokens", output_len)))
            requests.append(SampleRequest(prompt, _count(tokenizer, prompt), out))
    return _take(requests, num_prompts, seed, path)


def sample_sharegpt(path: str, tokenizer: Any | None, num_prompts: int, output_len: int | None,
                    seed: int) -> list[SampleRequest]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}.

    Like vLLM: the first turn is the prompt; the second turn's token length is the output length unless
    --random-output-len / --sharegpt-output-len fixes it.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    requests = []
    for row in rows:
        turns = row.get("conversations") or row.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt = str(turns[0].get("value", turns[0].get("content", "")))
        completion = str(turns[1].get("value", turns[1].get("content", "")))
        out = output_len if output_len is not None else max(1, _count(tokenizer, completion))
        requests.append(SampleRequest(prompt, _count(tokenizer, prompt), out))
    if not requests:
        raise ValueError(f"--dataset-path {path}: no conversation with at least two turns")
    return _take(requests, num_prompts, seed, path)


def _take(requests: list[SampleRequest], num_prompts: int, seed: int, path: str) -> list[SampleRequest]:
    if not requests:
        raise ValueError(f"--dataset-path {path}: no prompts found")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(requests))
    # Cycle when the file has fewer prompts than asked for, so --num-prompts is always honoured.
    return [requests[int(order[i % len(order)])] for i in range(num_prompts)]


def build_workload(name: str, *, tokenizer: Any | None, num_prompts: int, dataset_path: str | None,
                   input_len: int, output_len: int, range_ratio: float, seed: int,
                   output_len_override: int | None = None) -> list[SampleRequest]:
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if name == "random":
        if tokenizer is None:
            raise ValueError("--dataset-name random needs --tokenizer (a tokenizer folder or a .gguf file) "
                             "for exact lengths")
        return sample_random(tokenizer, num_prompts, input_len, output_len, range_ratio, seed)
    if name in ("custom", "sharegpt"):
        if not dataset_path:
            raise ValueError(f"--dataset-path is required for --dataset-name {name}")
        if name == "custom":
            return sample_custom(dataset_path, tokenizer, num_prompts, output_len, seed)
        return sample_sharegpt(dataset_path, tokenizer, num_prompts, output_len_override, seed)
    raise ValueError(f"--dataset-name must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
