"""A request's decoding constraint: OpenAI's `response_format` or vLLM's `structured_outputs` field ->
`StructuredOutputsParams`, checked in the server process so a bad schema, regex or grammar is a 400 naming
the field, never a failure inside the engine core.

Checks, in order: the field's shape; size and nesting bounds (ServerConfig); the JSON schema against its
metaschema (jsonschema); JSON-schema keywords xgrammar would silently ignore (an output could then break
the schema, so they are refused by name, with their path); then the engine's own `validate` (an xgrammar
parse, no tokenizer), so what passes here compiles in the core. Outcomes are cached by the constraint's
text, so a repeated schema costs a dict lookup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from tokenmill.config import ServerConfig
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.server.errors import invalid_param

_VLLM_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")
_SCHEMA_FIELDS = ("name", "description", "schema", "strict")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_ENGINE_PREFIX_RE = re.compile(r"^invalid structured_outputs\.\w+:\s*")  # validate() names its own field

# Keywords xgrammar 0.2 accepts but does not enforce. `unevaluatedProperties: false` is allowed: the engine
# converts schemas in strict mode, where undeclared properties are refused anyway.
_UNSUPPORTED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                "uniqueItems", "contains", "minContains", "maxContains", "propertyNames", "unevaluatedItems",
                "unevaluatedProperties", "additionalItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
                "$recursiveAnchor")
# Where sub-schemas live, so keywords are looked for only at schema positions (not in property names).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("additionalProperties", "items", "propertyNames", "not", "if", "then", "else", "contains",
                  "unevaluatedItems", "unevaluatedProperties", "additionalItems")


def request_structured_outputs(body: Any, config: ServerConfig) -> StructuredOutputsParams | None:
    """The request's constraint, checked; None without one. Raises APIError 400 naming the field."""
    from_rf = _from_response_format(body.response_format) if body.response_format is not None else None
    raw = getattr(body, "structured_outputs", None)
    if raw is None:
        if from_rf is not None:
            check_constraint(from_rf, "response_format", config)
        return from_rf
    if from_rf is not None:
        raise invalid_param("structured_outputs", "invalid structured_outputs: response_format already sets a "
                                                  "constraint; send one of response_format or structured_outputs")
    so = _from_vllm_field(raw)
    check_constraint(so, "structured_outputs", config)
    return so


async def request_structured_outputs_async(body: Any, config: ServerConfig) -> StructuredOutputsParams | None:
    """request_structured_outputs off the event loop when there is a constraint: a new schema's metaschema
    check is pure Python and grows with its size (~10 ms for a small schema, ~1.7 s at the 64 KiB limit), and
    other requests' streams must not stall meanwhile. Repeats are cache hits."""
    if body.response_format is None and getattr(body, "structured_outputs", None) is None:
        return None
    return await asyncio.to_thread(request_structured_outputs, body, config)


def with_constraint(params: SamplingParams, so: StructuredOutputsParams,
                    end_of_turn_ids: Sequence[int] = ()) -> SamplingParams:
    """`params` under `so`; `end_of_turn_ids` become stop tokens so a completed grammar can end the turn."""
    stops = list(params.stop_token_ids) + [t for t in end_of_turn_ids if t not in params.stop_token_ids]
    return dataclasses.replace(params, structured_outputs=so, stop_token_ids=stops)


_PROBE = "tokenmill-end-of-turn-probe"
_MAX_TEMPLATES = 64  # requests may bring their own chat_template: keep the cache bounded
_end_of_turn_cache: dict[tuple[int, str], list[int]] = {}


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """The special token the chat template writes after an assistant reply (Gemma's <end_of_turn>, ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), found by rendering a probe reply once per template; [] if none.

    A constrained chat reply must be able to stop there: the model's EOS list may lack it (HF folders whose
    generation_config names only <eos>), and then a finished JSON object would run on to max_tokens.
    """
    key = (id(tokenizer), template)
    if key not in _end_of_turn_cache:
        if len(_end_of_turn_cache) >= _MAX_TEMPLATES:
            _end_of_turn_cache.clear()
        _end_of_turn_cache[key] = _probe_end_of_turn(tokenizer, template)
    return _end_of_turn_cache[key]


def _probe_end_of_turn(tokenizer: Any, template: str) -> list[int]:
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False, chat_template=template,
                                             add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that refuses this shape simply has no probe answer
        return []
    text = text if isinstance(text, str) else text[0]
    tail = text.split(_PROBE, 1)[1].lstrip() if _PROBE in text else ""
    ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[:1] if ids and ids[0] in special else []


def _from_response_format(rf: dict[str, Any]) -> StructuredOutputsParams | None:
    fields = {"text": ("type",), "json_object": ("type",), "json_schema": ("type", "json_schema")}
    kind = rf.get("type")
    if kind not in fields:
        raise invalid_param("response_format", f"invalid response_format.type={json.dumps(kind)}: must be one of "
                                      "'text', 'json_object', 'json_schema'")
    _no_extra(rf, fields[kind], "response_format", f"response_format with type '{kind}'")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid_param("response_format", "invalid response_format.json_schema: required with type 'json_schema', "
                                      "an object {name, schema, strict, description}")
    _no_extra(spec, _SCHEMA_FIELDS, "response_format", "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise invalid_param("response_format", f"invalid response_format.json_schema.name={json.dumps(name)}: required, "
                                      "1-64 characters from a-z, A-Z, 0-9, '_' and '-'")
    for key, kind_name, ok in (("strict", "a boolean", bool), ("description", "a string", str)):
        if spec.get(key) is not None and not isinstance(spec[key], ok):
            raise invalid_param("response_format", f"invalid response_format.json_schema.{key}: must be {kind_name}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid_param("response_format", "invalid response_format.json_schema.schema: required, a JSON schema "
                                      f"object (got {_json_type(schema)})")
    return StructuredOutputsParams(json=schema)


def _from_vllm_field(raw: Any) -> StructuredOutputsParams:
    if not isinstance(raw, dict):
        raise invalid_param("structured_outputs", f"invalid structured_outputs: must be an object with one of json, regex, "
                                         f"choice, grammar, json_object (got {_json_type(raw)})")
    _no_extra(raw, _VLLM_FIELDS, "structured_outputs", "structured_outputs")
    types = {"json": (dict, str), "regex": (str,), "choice": (list,), "grammar": (str,), "json_object": (bool,),
             "disable_any_whitespace": (bool,)}
    for key, ok in types.items():
        value = raw.get(key)
        if value is not None and (not isinstance(value, ok) or (bool not in ok and isinstance(value, bool))):
            wanted = {"json": "a JSON schema (object or JSON text)", "choice": "a list of strings"}.get(
                key, "a string" if ok == (str,) else "a boolean")
            raise invalid_param("structured_outputs", f"invalid structured_outputs.{key}: must be {wanted} "
                                             f"(got {_json_type(value)})")
    args = {k: v for k, v in raw.items() if v is not None}
    args["disable_any_whitespace"] = bool(args.get("disable_any_whitespace", False))
    try:
        so = StructuredOutputsParams(**args)
    except ValueError as exc:
        raise invalid_param("structured_outputs", str(exc)) from None
    if so.kind == "json" and not isinstance(so.json, dict):
        raise invalid_param("structured_outputs", "invalid structured_outputs.json: must be a JSON schema object "
                                                  f"(got {_json_type(so.json)})")
    return so


def check_constraint(so: StructuredOutputsParams, param: str, config: ServerConfig) -> None:
    """400 naming `param` unless `so` is within bounds and compiles; the cached part runs once per text."""
    where = {"response_format": "response_format.json_schema.schema"}.get(param, f"{param}.{so.kind}")
    limit = config.max_structured_output_bytes
    if so.kind == "json_object":
        return
    if so.kind == "choice":
        text = json.dumps(so.choice, ensure_ascii=False)
        size = sum(len(c.encode()) + 1 for c in so.choice)
    elif so.kind == "json":
        text = json.dumps(so.json, separators=(",", ":"), sort_keys=True)
        size = len(text.encode())
    else:
        text = getattr(so, so.kind)
        size = len(text.encode())
    if size > limit:
        raise invalid_param(param, f"invalid {where}: {size} bytes, more than the limit of {limit} bytes")
    if so.kind == "json":
        depth = _depth(so.json)
        if depth > config.max_json_schema_depth:
            raise invalid_param(param, f"invalid {where}: nested {depth} levels deep, more than the limit of "
                                       f"{config.max_json_schema_depth}")
    error = _check_text(so.kind, text, so.disable_any_whitespace)
    if error is not None:
        raise invalid_param(param, f"invalid {where}: {error}")


@lru_cache(maxsize=512)
def _check_text(kind: str, text: str, disable_any_whitespace: bool) -> str | None:
    """The error for a schema / regex / grammar / choices text, or None when the engine can compile it."""
    from tokenmill.structured_output import validate

    value: Any = json.loads(text) if kind in ("json", "choice") else text
    if kind == "json":
        error = _metaschema_error(value) or _unsupported_error(value)
        if error is not None:
            return error
    try:  # the engine's own parse: what passes here compiles in the core
        validate(StructuredOutputsParams(**{kind: value}, disable_any_whitespace=disable_any_whitespace))
    except ValueError as exc:
        return _ENGINE_PREFIX_RE.sub("", str(exc))
    return None


def _metaschema_error(schema: dict[str, Any]) -> str | None:
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON schema: {exc.message} at {exc.json_path}"
    return None


def _unsupported_error(schema: dict[str, Any]) -> str | None:
    """The first keyword that would be ignored (see _UNSUPPORTED), with its JSON path."""
    stack: list[tuple[Any, str]] = [(schema, "$")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        for key in _UNSUPPORTED:
            if key in node and not (key == "unevaluatedProperties" and node[key] is False):
                return (f"unsupported JSON schema feature '{key}' at {path} (constrained decoding cannot enforce "
                        f"it); remove it. Not supported: {', '.join(_UNSUPPORTED)}")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return f"unsupported JSON schema feature: remote $ref {ref!r} at {path}; only local refs ('#/$defs/...')"
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((v, f"{path}.{key}.{k}") for k, v in node[key].items())
        for key in _SCHEMA_LISTS + _SCHEMA_VALUES:
            value = node.get(key)
            if isinstance(value, list):
                stack.extend((v, f"{path}.{key}[{i}]") for i, v in enumerate(value))
            elif isinstance(value, dict):
                stack.append((value, f"{path}.{key}"))
    return None


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0, {} is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d + 1)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _no_extra(obj: dict[str, Any], allowed: tuple[str, ...], param: str, what: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise invalid_param(param, f"invalid {what}: unexpected field {', '.join(map(repr, extra))}; allowed: "
                          f"{', '.join(allowed)}")


def _json_type(v: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)
