"""POST /v1/embeddings (when serving an embedding model, task "embed")."""

from __future__ import annotations

import base64
import struct

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.errors import EngineDeadError
from tokenmill.server.errors import (
    APIError,
    context_length_exceeded,
    engine_dead,
    invalid_param,
)
from tokenmill.server.protocol import EmbeddingRequest
from tokenmill.server.serving_completions import prompt_token_ids
from tokenmill.server.serving_engine import check_model, check_ready, read_body
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import until_disconnect
from tokenmill.server.tokenizer_pool import (
    check_prompt_chars,
    run_tokenizer,
    text_chars,
)


async def create_embedding(state: ServerState, request: Request) -> Response:
    body = await read_body(request, EmbeddingRequest, state.server_config.max_body_bytes)
    check_ready(state)
    model = check_model(state, body.model)
    engine = state.engine
    info = engine.model_info
    if info.task != "embed":
        raise APIError(400, f"The model `{model}` is a generation model; /v1/embeddings needs an embedding "
                       "model (serve one, e.g. an all-MiniLM-L6-v2 folder).", param="model", code="wrong_task")
    # each input is one sequence (a batch may hold many short ones): the text bound applies per input
    for text in body.input if isinstance(body.input, list) else [body.input]:
        check_prompt_chars(text_chars(text), state, "input")
    inputs = await run_tokenizer(state, prompt_token_ids, body.input, engine.tokenizer, info.vocab_size, True,
                                 param="input")
    for _, ids in inputs:
        if len(ids) > info.max_model_len:
            raise context_length_exceeded(len(ids), None, info.max_model_len, "input")
    try:
        vectors = await until_disconnect(request, engine.embed([ids for _, ids in inputs]))
    except EngineDeadError as exc:
        raise engine_dead(str(exc)) from exc
    except ValueError as exc:
        raise invalid_param("input", str(exc)) from exc
    if body.dimensions is not None:
        if not 1 <= body.dimensions <= len(vectors[0]):
            raise invalid_param("dimensions", f"invalid dimensions={body.dimensions}: must be in [1, {len(vectors[0])}]")
        vectors = [v[: body.dimensions] for v in vectors]
    data = []
    for i, vec in enumerate(vectors):
        emb: list[float] | str = list(vec)
        if body.encoding_format == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    num = sum(len(ids) for _, ids in inputs)
    return JSONResponse({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": num, "total_tokens": num}})
