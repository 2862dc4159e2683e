"""What every tool-call parser returns, and the registry `--tool-call-parser NAME` picks from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """One call the model wrote: a function name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ExtractedToolCalls:
    """A model's text split into calls and the prose around them. No calls: `content` is the whole text."""

    calls: list[ParsedToolCall] = field(default_factory=list)
    content: str | None = None


class ToolParser(Protocol):
    """Turns a finished model output into tool calls; malformed calls come back as plain content.

    `start_markers`: strings at which a call may begin; a streaming handler holds back text from the first
    one (or a trailing prefix of one) until the output ends, so a call is never sent out as content.
    """

    name: str
    start_markers: tuple[str, ...]

    def extract(self, text: str) -> ExtractedToolCalls: ...


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedToolCall | None:
    """{"name": str, "arguments"|"parameters": object} -> a call; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def text_only(text: str) -> ExtractedToolCalls:
    return ExtractedToolCalls([], text)


def prose(text: str) -> str | None:
    """Text around calls; None when there is none (OpenAI sends content null next to tool calls)."""
    return text if text.strip() else None
