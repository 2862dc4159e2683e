"""Tool calling without a server: the tool-call parsers for `tool_choice: "auto"` (`--enable-auto-tool-choice
--tool-call-parser NAME`), one module per model family's convention, and prompt.py, which puts tools into a
chat template (used by the server and by the offline LLM.chat). No torch, no pydantic.
"""

from __future__ import annotations

from tokenmill.tools.base import (
    ExtractedToolCalls,
    ParsedToolCall,
    ToolParser,
)
from tokenmill.tools.hermes import HermesToolParser
from tokenmill.tools.llama3_json import Llama3JsonToolParser
from tokenmill.tools.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as `name`, else ValueError naming the field and the choices."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"invalid tool_call_parser={name!r}: must be one of {', '.join(TOOL_PARSERS)}")
    return cls()


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "ParsedToolCall", "ToolParser", "get_tool_parser"]
