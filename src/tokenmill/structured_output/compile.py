"""StructuredOutputsParams -> xgrammar Grammar / CompiledGrammar, and the server-side validate().

xgrammar imports are local to the functions: this module is imported by engine/ (which stays free of
torch and xgrammar until a constrained request actually arrives).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams

# Consecutive whitespace allowed between JSON tokens when any whitespace is allowed: enough for indented
# output, few enough that a small model cannot spend max_tokens printing spaces (a known vLLM/Ollama failure).
DEFAULT_MAX_JSON_WHITESPACE = 8

# JSON Schema keywords xgrammar 0.2.9 silently ignores: a schema using them would be enforced only in part,
# so such a schema is refused instead of giving output that does not validate.
_UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
                         "uniqueItems", "contains", "minContains", "maxContains", "propertyNames",
                         "unevaluatedItems")

_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[19:56:02] /project/cpp/x.cc:94: " of C++ errors


# xgrammar 0.2.9 writes strings with minLength/maxLength as `[^"\\\r\n]{m,n}`, which lets raw control characters
# (U+0000-U+001F) through: invalid JSON. Its unbounded strings exclude them; bounded ones get the same class.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _clean(e: Exception) -> str:
    return _XGR_PREFIX.sub("", str(e).strip()).strip()


def _unsupported(schema: Any, path: str = "#") -> str | None:
    """The first ignored keyword in the schema, as 'keyword at path', or None."""
    if isinstance(schema, dict):
        for k, v in schema.items():
            # keys under "properties" / "$defs" are names, not keywords
            if k in _UNSUPPORTED_KEYWORDS and not path.endswith(("/properties", "/$defs", "/definitions")):
                return f"'{k}' at {path}"
            found = _unsupported(v, f"{path}/{k}")
            if found:
                return found
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            found = _unsupported(v, f"{path}/{i}")
            if found:
                return found
    return None


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are valid EBNF string literals (same escapes), so any text is quoted safely.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _json_args(p: StructuredOutputsParams, max_whitespace: int) -> dict[str, Any]:
    if p.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": max_whitespace}


def _json_source(p: StructuredOutputsParams) -> tuple[str, bool]:
    """(schema text, strict): json_object and `json: true` accept any object / value, so not strict."""
    if p.json_object:
        return '{"type": "object"}', False
    if p.json is True:
        return "{}", False
    return json.dumps(p.json), True


def grammar_of(p: StructuredOutputsParams, max_whitespace: int = DEFAULT_MAX_JSON_WHITESPACE):
    """The xgrammar Grammar for a constraint (parses it; raises ValueError naming the field)."""
    import xgrammar as xgr

    kind = p.kind
    field = "json" if kind == "json_object" else kind
    if kind == "json":
        bad = _unsupported(p.json)
        if bad:
            raise ValueError(f"invalid structured_outputs.json: unsupported JSON schema keyword {bad}; supported: "
                             "type, properties, required, items, enum, const, anyOf/oneOf/allOf, $ref/$defs, "
                             "pattern, format, min/max bounds")
    try:
        if kind in ("json", "json_object"):
            source, strict = _json_source(p)
            grammar = xgr.Grammar.from_json_schema(source, strict_mode=strict, **_json_args(p, max_whitespace))
            ebnf = str(grammar)
            if _LOOSE_STRING_CHAR in ebnf:
                grammar = xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))
            return grammar
        if kind == "regex":
            return xgr.Grammar.from_regex(p.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(p.choice))
        return xgr.Grammar.from_ebnf(p.grammar)
    except (RuntimeError, ValueError) as e:
        what = {"json": "JSON schema", "regex": "regular expression", "choice": "choice list",
                "grammar": "EBNF grammar"}[field]
        raise ValueError(f"invalid structured_outputs.{field}: not a supported {what}: {_clean(e)}") from None


def validate(p: StructuredOutputsParams, max_whitespace: int = DEFAULT_MAX_JSON_WHITESPACE) -> None:
    """Raise ValueError naming the field when the engine could not compile this constraint.

    Cheap (no tokenizer: parsing only, ~1 ms for ordinary schemas); the server calls it before the request
    reaches the engine core."""
    grammar_of(p, max_whitespace)


def compile_params(compiler, p: StructuredOutputsParams, max_whitespace: int = DEFAULT_MAX_JSON_WHITESPACE):
    """CompiledGrammar for the model's tokenizer (the compiler's cache makes a repeated constraint cheap)."""
    kind = p.kind
    try:
        if kind in ("json", "json_object"):
            # grammar_of refuses ignored keywords and tightens bounded strings; the compiler caches by grammar.
            return compiler.compile_grammar(grammar_of(p, max_whitespace))
        if kind == "regex":
            return compiler.compile_regex(p.regex)
        if kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(p.choice))
        return compiler.compile_grammar(p.grammar)
    except RuntimeError as e:
        raise ValueError(f"invalid structured_outputs.{'json' if kind == 'json_object' else kind}: "
                         f"{_clean(e)}") from None
