"""`llama3_json`: Llama 3.x JSON calls, `{"name": ..., "parameters": {...}}` (or "arguments"), optionally after
`<|python_tag|>`, several separated by `;` (as vLLM's parser of the same name)."""

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

_PYTHON_TAG = "<|python_tag|>"
_CALL_START = re.compile(r"<\|python_tag\|>|\{\s*\"name\"\s*:")
_SEPARATORS = " \t\r\n;,"


class Llama3JsonToolParser:
    name = "llama3_json"
    start_markers = (_PYTHON_TAG, "{")

    def extract(self, text: str) -> ExtractedToolCalls:
        m = _CALL_START.search(text)
        if m is None:
            return text_only(text)
        pos = m.start() + (len(_PYTHON_TAG) if m.group(0) == _PYTHON_TAG else 0)
        decoder = json.JSONDecoder()
        calls: list[ParsedToolCall] = []
        while True:
            while pos < len(text) and text[pos] in _SEPARATORS:
                pos += 1
            if pos >= len(text):
                break
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return text_only(text)
            call = call_from_object(obj, ("parameters", "arguments"))
            if call is None:
                return text_only(text)
            calls.append(call)
        return ExtractedToolCalls(calls, prose(text[:m.start()])) if calls else text_only(text)
