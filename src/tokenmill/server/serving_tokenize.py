"""POST /tokenize and /detokenize (vLLM's extra endpoints), GET /v1/models."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import invalid_param
from tokenmill.server.lora_api import adapter_cards
from tokenmill.server.protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.server.serving_chat import render_and_tokenize
from tokenmill.server.serving_engine import check_model, check_ready, read_body
from tokenmill.server.state import ServerState
from tokenmill.server.tokenizer_pool import check_prompt_chars, run_tokenizer


async def tokenize(state: ServerState, request: Request) -> Response:
    body = await read_body(request, TokenizeRequest, state.server_config.max_body_bytes,
                           state.server_config.max_json_depth)
    check_ready(state)
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_param("prompt", "invalid request: give exactly one of prompt or messages")
    tok = state.engine.tokenizer
    if body.messages is not None:
        check_prompt_chars(sum(len(m.text()) for m in body.messages), state, "messages")
        ids = await run_tokenizer(state, render_and_tokenize, state, body.messages, False,
                                  add_generation_prompt=body.add_generation_prompt)
    else:
        check_prompt_chars(len(body.prompt), state, "prompt")
        ids = await run_tokenizer(state, lambda: list(tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]))
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.engine.model_info.max_model_len})


async def detokenize(state: ServerState, request: Request) -> Response:
    body = await read_body(request, DetokenizeRequest, state.server_config.max_body_bytes,
                           state.server_config.max_json_depth)
    check_ready(state)
    check_model(state, body.model)
    vocab = state.engine.model_info.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise invalid_param("tokens", f"invalid tokens: id {bad[0]} is outside the vocabulary [0, {vocab})")
    return JSONResponse({"prompt": await run_tokenizer(state, state.engine.tokenizer.decode, body.tokens)})


PRECISION_KEYS = ("dtype", "dtype_reason", "quantization", "kv_cache_dtype", "device", "cpu", "cpu_kernels")


def precision(state: ServerState) -> dict:
    """The engine's numeric choices (see executor/precision.py); empty until the model has loaded."""
    extra = state.engine.model_info.extra if state.engine is not None else {}
    return {k: extra[k] for k in PRECISION_KEYS if k in extra}


def list_models(state: ServerState) -> Response:
    max_len = state.engine.model_info.max_model_len if state.engine is not None else None
    meta = precision(state)
    data = [{"id": name, "object": "model", "created": state.created, "owned_by": "tokenmill",
             "root": state.engine_config.model.model or name, "parent": None, "max_model_len": max_len,
             **({"metadata": meta} if meta else {})}
            for name in state.served_model_names]
    data += adapter_cards(state, state.created, max_len)
    return JSONResponse({"object": "list", "data": data})
