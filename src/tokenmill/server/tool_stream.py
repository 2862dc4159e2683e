"""Streaming tool calls: text deltas of one choice in, OpenAI `delta` dicts out.

- named function: the whole output is the arguments object (JSON-constrained), so it streams as it comes:
  the first delta carries id / type / name, each later one an argument fragment;
- required: the output is a JSON array of calls, parsed when the choice ends (not incrementally);
- auto: content streams until a parser's start marker (or the beginning of one) appears; from there text is
  held back and parsed when the choice ends: calls if it holds well-formed calls, else the held text as content.
Each call arrives as a delta with id / type / name and empty arguments, then one with all its arguments.
"""

from __future__ import annotations

from typing import Any

from tokenmill.server.tool_calls import ToolPlan, new_tool_call_id


class ToolCallStream:
    """One choice's stream. Invariant: `sent` + `held` is all text fed so far (auto), and text once sent as
    content is never part of a call."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.sent = ""
        self.num_calls = 0
        self._named_id: str | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas to send now for this piece of model text (may be none)."""
        if not text:
            return []
        if self.plan.mode == "named":
            return self._named(text)
        if self.plan.mode == "required":
            self.held += text
            return []
        self.held += text
        cut = _safe_prefix(self.held, self.plan.parser.start_markers if self.plan.parser else ())
        if cut == 0:
            return []
        out, self.held = self.held[:cut], self.held[cut:]
        self.sent += out
        return [{"content": out}]

    def finish(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Deltas for whatever was held back, and the choice's finish_reason."""
        if self.plan.mode == "named":
            return [], self.plan.finish_reason(reason, self._named_id is not None)
        extracted = self.plan.extract(self.held)
        if not extracted.calls:
            out = [{"content": self.held}] if self.held else []
            self.held = ""
            return out, reason
        deltas: list[dict[str, Any]] = []
        if extracted.content:
            deltas.append({"content": extracted.content})
        for call in extracted.calls:
            head = {"index": self.num_calls, "id": new_tool_call_id(), "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            deltas.append({"tool_calls": [head]})
            deltas.append({"tool_calls": [{"index": self.num_calls, "function": {"arguments": call.arguments}}]})
            self.num_calls += 1
        self.held = ""
        return deltas, self.plan.finish_reason(reason, True)

    def _named(self, text: str) -> list[dict[str, Any]]:
        if self._named_id is None:
            self._named_id = new_tool_call_id()
            self.num_calls = 1
            head = {"index": 0, "id": self._named_id, "type": "function",
                    "function": {"name": self.plan.named, "arguments": text}}
            return [{"content": None, "tool_calls": [head]}]
        return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]


def _safe_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the prefix of `text` that cannot be part of a tool call: up to the first marker, or up to
    a tail that could still grow into one."""
    cut = len(text)
    for marker in markers:
        i = text.find(marker)
        if i >= 0:
            cut = min(cut, i)
        for k in range(min(len(marker) - 1, len(text)), 0, -1):  # the text ends with the start of a marker
            if text.endswith(marker[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut
