"""`hermes`: Hermes / Qwen style, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call."""

from __future__ import annotations

import json
import re

from tokenmill.tools.base import (
    ExtractedToolCalls,
    ParsedToolCall,
    call_from_object,
    prose,
    text_only,
)

_START, _END = "<tool_call>", "</tool_call>"
# A closed block, or an unclosed last one (the model hit a stop token right after the JSON).
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


class HermesToolParser:
    name = "hermes"
    start_markers = (_START,)

    def extract(self, text: str) -> ExtractedToolCalls:
        start = text.find(_START)
        if start < 0:
            return text_only(text)
        calls: list[ParsedToolCall] = []
        for m in _BLOCK.finditer(text, start):
            try:
                call = call_from_object(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text_only(text)  # never half a set of calls: the client sees what the model wrote
            calls.append(call)
        return ExtractedToolCalls(calls, prose(text[:start]))
