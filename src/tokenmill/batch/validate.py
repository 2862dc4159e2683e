"""Up-front validation of a batch input file (JSONL), before any line runs.

A file either passes whole (every line a POST to the batch's endpoint with a unique custom_id and an object
body) or the batch fails with OpenAI's `errors` object: `{"object": "list", "data": [{code, message, param,
line}, ...]}`, line numbers 1-based as an editor shows them. A half-valid file is never half run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.config import BatchConfig

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int  # 1-based line number in the input file
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineError:
    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class BatchValidationError(Exception):
    """The input file is not a valid batch for this endpoint; `errors` lists why (first N, line-numbered)."""

    def __init__(self, errors: list[LineError]) -> None:
        super().__init__("; ".join(e.message for e in errors[:3]))
        self.errors = errors

    def to_json(self) -> dict[str, Any]:
        return {"object": "list", "data": [e.to_json() for e in self.errors]}


def _check_line(num: int, raw: bytes, endpoint: str, seen: dict[str, int]) -> BatchLine | LineError:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LineError("invalid_json_line", f"Line {num} is not valid JSON: {exc}.", None, num)
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", f"Line {num} must be a JSON object, got {type(obj).__name__}.",
                         None, num)
    for key, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if key not in obj:
            return LineError("missing_required_parameter", f"Line {num} has no `{key}`; every line needs "
                             "custom_id, method, url and body.", key, num)
        if not isinstance(obj[key], kind):
            want = "a string" if kind is str else "a JSON object"
            return LineError("invalid_parameter", f"Line {num}: `{key}` must be {want}.", key, num)
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        return LineError("invalid_parameter", f"Line {num}: unrecognized field `{extra[0]}`; a line holds "
                         "custom_id, method, url and body.", extra[0], num)
    cid = obj["custom_id"]
    if not cid:
        return LineError("invalid_parameter", f"Line {num}: `custom_id` must not be empty.", "custom_id", num)
    if obj["method"] != "POST":
        return LineError("invalid_parameter", f"Line {num}: method {obj['method']!r} is not supported; it must "
                         "be POST.", "method", num)
    if obj["url"] != endpoint:
        return LineError("invalid_url", f"Line {num}: url {obj['url']!r} does not match the batch's endpoint "
                         f"{endpoint!r}; all lines of a batch go to its endpoint.", "url", num)
    if obj["body"].get("stream"):
        return LineError("invalid_parameter", f"Line {num}: `body.stream` must be false or absent; batch "
                         "requests do not stream.", "body.stream", num)
    if cid in seen:
        return LineError("duplicate_custom_id", f"Line {num}: custom_id {cid!r} is a duplicate of line "
                         f"{seen[cid]}; custom_id must be unique within a batch.", "custom_id", num)
    seen[cid] = num
    return BatchLine(num, cid, obj["body"])


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) of each non-blank line; blank lines are skipped but keep their numbers."""
    with open(path, "rb") as f:
        for num, raw in enumerate(f, start=1):
            if raw.strip():
                yield num, raw


def validate_file(path: Path, endpoint: str, config: BatchConfig) -> list[BatchLine]:
    """Every line of a valid batch file, in file order; else BatchValidationError listing what is wrong."""
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise BatchValidationError([LineError("invalid_endpoint", f"Endpoint {endpoint!r} is not supported; "
                                              f"use one of {', '.join(SUPPORTED_ENDPOINTS)}.", "endpoint")])
    size = path.stat().st_size
    if size > config.max_file_bytes:
        raise BatchValidationError([LineError("file_too_large", f"The input file has {size} bytes, more than "
                                              f"the limit of {config.max_file_bytes} bytes.", "input_file_id")])
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    num_errors = 0
    for num, raw in _raw_lines(path):
        if len(lines) + num_errors >= config.max_lines:
            errors.append(LineError("too_many_requests", f"The input file has more than {config.max_lines} "
                                    "requests, the most one batch may hold; split it.", "input_file_id", num))
            break
        checked = _check_line(num, raw, endpoint, seen)
        if isinstance(checked, BatchLine):
            lines.append(checked)
            continue
        num_errors += 1
        if len(errors) < config.max_listed_errors:
            errors.append(checked)
    if not errors and not lines:
        errors.append(LineError("empty_file", "The input file has no requests.", "input_file_id"))
    if errors:
        raise BatchValidationError(errors)
    return lines


def read_lines(path: Path) -> list[BatchLine]:
    """The lines of an already validated file (a resumed job): parsed again, not checked again."""
    out = []
    for num, raw in _raw_lines(path):
        obj = json.loads(raw)
        out.append(BatchLine(num, obj["custom_id"], obj["body"]))
    return out
