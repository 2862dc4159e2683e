"""Putting tools, earlier tool calls and tool results into the prompt.

A chat template that mentions `tools` renders them itself (Qwen, Llama 3.1+, Hermes ...). Gemma's template
cannot, and Gemma has no tool tokens: a Gemma-style template is swapped for tools/templates/gemma3_tools.jinja
(pythonic calls). Any other template without tool support gets the conversation rewritten into plain turns:
the tool list and the call format in the system message, earlier calls as text in the server parser's
format, tool results as user turns.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

_GEMMA_MARK = "<start_of_turn>"


@cache
def gemma_tools_template() -> str:
    return resources.files("tokenmill.tools").joinpath("templates/gemma3_tools.jinja").read_text()


def with_tools(convo: list[dict[str, Any]], tools: list[dict[str, Any]] | None, template: str,
               parser: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """(conversation, tools to pass to the template, template) ready to render, per the module docstring."""
    convo = [message_dict(m["role"], m.get("content"), m.get("tool_calls"), m.get("tool_call_id"), m.get("name"))
             for m in convo]
    if not needs_tools(convo, tools) or "tools" in template:
        return convo, tools or None, template
    gemma = tools_template(template)
    if gemma is not None:
        return convo, tools or None, gemma
    return plain_turns(convo, tools, parser), None, template


def needs_tools(convo: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in convo)


def tools_template(template: str) -> str | None:
    """The template to use instead of `template` for a conversation with tools; None: keep `template`
    (it renders tools itself, or the conversation must be rewritten for it: see plain_turns)."""
    if "tools" in template:
        return None
    if _GEMMA_MARK in template:
        return gemma_tools_template()
    return None


def plain_turns(convo: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                parser: str | None) -> list[dict[str, Any]]:
    """The conversation for a template that knows only role + content (see the module docstring)."""
    out: list[dict[str, Any]] = []
    for m in convo:
        content = m.get("content") or ""
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Tool result: {content}"})
        elif m.get("tool_calls"):
            calls = format_calls(m["tool_calls"], parser)
            out.append({"role": m["role"], "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        block = tools_instructions(tools, parser)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def tools_instructions(tools: list[dict[str, Any]], parser: str | None) -> str:
    defs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    example = format_calls([{"function": {"name": "func_name", "arguments": {"param": "value"}}}], parser)
    return (f"You can call these functions (JSON definitions):\n{defs}\n\nTo call functions, reply with only "
            f"the calls in this form and nothing else: {example}. Otherwise reply normally.")


def format_calls(calls: list[dict[str, Any]], parser: str | None) -> str:
    """Earlier assistant calls as the text the server's parser reads back (pythonic without a parser)."""
    pairs = [(c["function"]["name"], c["function"].get("arguments") or {}) for c in calls]
    if parser == "hermes":
        return "".join(f'<tool_call>{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}</tool_call>'
                       for n, a in pairs)
    if parser == "llama3_json":
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in pairs)
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={py_literal(v)}' for k, v in a.items())})" for n, a in pairs) + "]"


def py_literal(v: Any) -> str:
    """A JSON value as Python literal text (True / False / None), as the pythonic parser reads it."""
    if v is True:
        return "True"
    if v is False:
        return "False"
    if v is None:
        return "None"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {py_literal(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(py_literal(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def message_dict(role: str, content: str | None, tool_calls: list[Any] | None, tool_call_id: str | None,
                 name: str | None) -> dict[str, Any]:
    """One request message as chat templates expect it: tool call arguments as objects, not JSON text."""
    m: dict[str, Any] = {"role": role, "content": content}
    if name is not None:
        m["name"] = name
    if tool_call_id is not None:
        m["tool_call_id"] = tool_call_id
    if tool_calls:
        m["tool_calls"] = [_template_call(c) for c in tool_calls]
    return m


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass  # left as text: the template shows what the client sent
    return {**call, "function": fn}
