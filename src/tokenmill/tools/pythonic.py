"""`pythonic`: a Python list of calls, `[get_weather(city="Paris"), add(a=1, b=2)]` (Llama 3.2 / 4, and the
convention Gemma users run). Parsed with `ast`, never evaluated: keyword arguments with literal values only."""

from __future__ import annotations

import ast
import json
import re
from typing import ClassVar

from tokenmill.tools.base import (
    ExtractedToolCalls,
    ParsedToolCall,
    prose,
    text_only,
)

# `[name(` opens a call list; dotted names (module.func) are allowed as vLLM allows them.
_LIST_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_FENCE = re.compile(r"^```(?:tool_code|python)?\s*|\s*```$")


class PythonicToolParser:
    name = "pythonic"
    start_markers = ("[", "```")

    def extract(self, text: str) -> ExtractedToolCalls:
        m = _LIST_START.search(text)
        if m is None:
            return text_only(text)
        body = _FENCE.sub("", text[m.start():].strip())
        calls = _parse_calls(body)
        if calls is None:
            return text_only(text)
        before = _FENCE.sub("", text[:m.start()].rstrip())
        return ExtractedToolCalls(calls, prose(before))


def _parse_calls(source: str) -> list[ParsedToolCall] | None:
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:  # positional arguments have no parameter names
            return None
        name = _dotted(node.func)
        if name is None:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = ast.literal_eval(_JsonNames().visit(kw.value))
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return None
        try:
            calls.append(ParsedToolCall(name, json.dumps(args, ensure_ascii=False)))
        except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes, a complex number)
            return None
    return calls


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class _JsonNames(ast.NodeTransformer):
    """true / false / null as JSON writes them (small models mix the two) become Python constants."""

    _VALUES: ClassVar[dict[str, object]] = {"true": True, "false": False, "null": None}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in self._VALUES:
            return ast.copy_location(ast.Constant(self._VALUES[node.id]), node)
        return node
