"""Tool calling on /v1/chat/completions: request checks, the constraint for `required` / a named function,
and turning model text into OpenAI `tool_calls` (whole responses here; streaming in tool_stream.py).

tool_choice    how calls are produced                              finish_reason when calls come back
"none"         not at all (tools may still be shown to the model)   as generated
"auto"         free text; the server's --tool-call-parser extracts  "tool_calls"
"required"     JSON schema: [{"name", "arguments"}, ...] (1 or more) "tool_calls"
{function}     JSON schema: that function's `parameters`             "stop" (as OpenAI)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.server.errors import invalid_param
from tokenmill.tools import (
    ExtractedToolCalls,
    ParsedToolCall,
    ToolParser,
    get_tool_parser,
)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function-name rule (plus dots, as vLLM accepts)
_MODES = ("none", "auto", "required")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request asks of tools, checked. mode: none | auto | required | named."""

    mode: str
    tools: list[dict[str, Any]]  # OpenAI tool definitions as sent (rendered into the prompt)
    named: str | None = None  # mode "named": the function the model must call
    parallel: bool = True
    parser: ToolParser | None = None  # mode "auto"

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The decoding constraint that makes `required` / named calls well-formed; None for none / auto."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.named))
        if self.mode == "required":
            return StructuredOutputsParams(json=self.required_schema())
        return None

    def required_schema(self) -> dict[str, Any]:
        """An array of one or more {"name", "arguments"} objects, each arguments object under its tool's schema."""
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                    "arguments": self._parameters(t["function"]["name"])},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _parameters(self, name: str | None) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or _ANY_OBJECT
        raise AssertionError(f"{name} was checked against tools")

    def extract(self, text: str) -> ExtractedToolCalls:
        """The calls in one finished choice's text; malformed or absent calls leave the text as content."""
        if self.mode == "auto":
            assert self.parser is not None
            return self.parser.extract(text)
        if self.mode == "named":
            try:
                args = json.loads(text)
            except ValueError:
                return ExtractedToolCalls([], text)
            if not isinstance(args, dict):
                return ExtractedToolCalls([], text)
            return ExtractedToolCalls([ParsedToolCall(self.named or "", json.dumps(args, ensure_ascii=False))])
        if self.mode == "required":
            return _required_calls(text)
        return ExtractedToolCalls([], text)

    def finish_reason(self, reason: str | None, has_calls: bool) -> str | None:
        """OpenAI's rule: "tool_calls" for auto / required calls, "stop" for a named function."""
        if has_calls and reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason


def _required_calls(text: str) -> ExtractedToolCalls:
    try:
        data = json.loads(text)
    except ValueError:
        return ExtractedToolCalls([], text)
    if not isinstance(data, list) or not data:
        return ExtractedToolCalls([], text)
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("arguments"), dict):
            return ExtractedToolCalls([], text)
        calls.append(ParsedToolCall(item["name"], json.dumps(item["arguments"], ensure_ascii=False)))
    return ExtractedToolCalls(calls)


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call_json(call: ParsedToolCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None, *,
               auto_parser: str | None, max_tools: int) -> ToolPlan:
    """Check `tools` / `tool_choice` (400 naming the field) and decide how calls are produced.

    tool_choice left out means "auto" when the server runs a tool-call parser, else "none" (the model still
    sees the tools; no calls are extracted), so plain OpenAI clients work against either kind of server.
    """
    checked = check_tools(tools, max_tools)
    parallel = parallel_tool_calls is not False
    if tool_choice is None:
        tool_choice = "auto" if checked and auto_parser else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise invalid_param("tool_choice", f"invalid tool_choice={tool_choice!r}: must be \"none\", \"auto\", "
                                "\"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        if tool_choice != "none" and not checked:
            raise invalid_param("tool_choice", f"invalid tool_choice={tool_choice!r}: requires `tools` with at "
                                               "least one function")
        if tool_choice == "auto":
            if not auto_parser:
                raise invalid_param("tool_choice", '"auto" tool choice requires the server to be started with '
                                    "--enable-auto-tool-choice and --tool-call-parser NAME; use \"required\", "
                                    "a named function or \"none\"")
            return ToolPlan("auto", checked, parallel=parallel, parser=get_tool_parser(auto_parser))
        return ToolPlan(tool_choice, checked, parallel=parallel)
    return ToolPlan("named", checked, named=_named_choice(tool_choice, checked), parallel=parallel)


def _named_choice(choice: Any, tools: list[dict[str, Any]]) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid_param("tool_choice", "invalid tool_choice: an object must be {\"type\": \"function\", "
                                           "\"function\": {\"name\": \"<a function in tools>\"}}")
    names = [t["function"]["name"] for t in tools]
    if not names:
        raise invalid_param("tool_choice", f"invalid tool_choice: names function {name!r} but the request has no "
                                           "`tools`")
    if name not in names:
        raise invalid_param("tool_choice", f"invalid tool_choice: function {name!r} is not in tools (tools "
                                           f"define: {', '.join(names)})")
    return name


def check_tools(tools: list[Any] | None, max_tools: int) -> list[dict[str, Any]]:
    """The tool definitions, each checked: {"type": "function", "function": {"name", "description"?,
    "parameters"? (an object schema), "strict"?}}; unique names; at most `max_tools`."""
    if not tools:
        return []
    if len(tools) > max_tools:
        raise invalid_param("tools", f"invalid tools: {len(tools)} tools given, at most {max_tools} are allowed")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid_param("tools", f"invalid {where}: must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if set(tool) - {"type", "function"}:
            raise invalid_param("tools", f"invalid {where}: unknown keys {sorted(set(tool) - {'type', 'function'})}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise invalid_param("tools", f"invalid {where}.function: must be an object with a name")
        _check_function(fn, where, seen)
    return tools


def _check_function(fn: dict[str, Any], where: str, seen: set[str]) -> None:
    extra = set(fn) - {"name", "description", "parameters", "strict"}
    if extra:
        raise invalid_param("tools", f"invalid {where}.function: unknown keys {sorted(extra)} (allowed: name, "
                                     "description, parameters, strict)")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid_param("tools", f"invalid {where}.function.name={name!r}: must be 1-64 letters, digits, "
                                     "'_', '-' or '.'")
    if name in seen:
        raise invalid_param("tools", f"invalid {where}.function.name={name!r}: two tools have this name")
    seen.add(name)
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise invalid_param("tools", f"invalid {where}.function.description: must be a string")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise invalid_param("tools", f"invalid {where}.function.strict: must be true or false")
    params = fn.get("parameters")
    if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
        raise invalid_param("tools", f"invalid {where}.function.parameters: must be a JSON schema of type "
                                     "\"object\" (the named arguments), e.g. {\"type\": \"object\", "
                                     "\"properties\": {...}}")
