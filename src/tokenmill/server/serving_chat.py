"""POST /v1/chat/completions: messages -> chat template -> tokens -> chat.completion(.chunk)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import APIError, invalid_param
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.prompt_logprobs import prompt_logprobs_json
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage
from tokenmill.server.serving_engine import (
    admit,
    check_generate,
    check_model,
    check_ready,
    generate,
    new_request_id,
    read_body,
    sampling_params,
)
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import sse_response, until_disconnect


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, request_template: str | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """Apply the chat template: the request's, else --chat-template, else the tokenizer's, else the model's."""
    engine = state.engine
    tok = engine.tokenizer
    template = request_template or state.chat_template or getattr(tok, "chat_template", None) \
        or engine.model_info.chat_template
    if not template:
        raise APIError(400, "This model has no chat template; start the server with --chat-template or use "
                       "/v1/completions.", param="messages", code="chat_template_missing")
    convo = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tok.apply_chat_template(
            convo,
            tokenize=False,
            chat_template=template,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception() and friends: the user's messages
        raise invalid_param("messages", f"invalid messages for this model's chat template: {exc}") from None
    if not isinstance(text, str):  # some tokenizer versions return a list when batched
        text = text[0]
    return text


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    body = await read_body(request, ChatCompletionRequest, state.server_config.max_body_bytes)
    check_ready(state)
    model = check_model(state, body.model)
    check_generate(state, model)
    engine = state.engine
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_param("top_logprobs", "invalid top_logprobs: requires logprobs=true")
    if body.prompt_logprobs is not None and body.stream:  # vLLM refuses this combination too
        raise invalid_param("prompt_logprobs", "invalid prompt_logprobs with stream=true: chat returns prompt "
                                               "logprobs only without streaming")
    text = render_chat(state, body.messages, body.add_generation_prompt, body.continue_final_message,
                       body.chat_template, body.chat_template_kwargs)
    ids = list(engine.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"])
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise invalid_param(field, f"invalid {field}={max_tokens}: must be an integer >= 1")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = sampling_params(body, max_tokens, logprobs, len(ids), engine.model_info.max_model_len, "messages",
                                 body.prompt_logprobs)
    except APIError as exc:
        if exc.param == "max_tokens":  # name the field the client actually sent
            exc.param = field
            exc.message = exc.message.replace("max_tokens", field)
        raise
    [slot] = admit(state, body.n)
    rid = new_request_id("chatcmpl")
    echo = body.messages[-1].text() if body.echo and body.messages[-1].role == "assistant" else ""
    ctx = _Ctx(rid, int(time.time()), model, body, len(ids), engine.tokenizer, echo)
    stream = generate(state, ids, params, rid, body.priority, slot)
    if body.stream:
        return sse_response(_stream(ctx, stream))
    return JSONResponse(await until_disconnect(request, _full(ctx, stream)))


class _Ctx:
    __slots__ = ("body", "created", "echo", "id", "model", "num_prompt", "tokenizer")

    def __init__(self, rid: str, created: int, model: str, body: ChatCompletionRequest, num_prompt: int,
                 tokenizer: Any, echo: str) -> None:
        self.id, self.created, self.model, self.body = rid, created, model, body
        self.num_prompt, self.tokenizer, self.echo = num_prompt, tokenizer, echo

    def usage(self, completion_tokens: int, cached: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.num_prompt, "completion_tokens": completion_tokens,
                                 "total_tokens": self.num_prompt + completion_tokens}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        c: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "system_fingerprint": None, "choices": choices}
        if include_usage:
            c["usage"] = None
        return c


async def _full(ctx: _Ctx, stream: AsyncIterator[Any]) -> dict[str, Any]:
    texts: dict[int, list[str]] = {i: [ctx.echo] for i in range(ctx.body.n)}
    lps: dict[int, list[dict[str, Any]]] = {i: [] for i in range(ctx.body.n)}
    reasons: dict[int, tuple[str | None, Any]] = {}
    completion_tokens = cached = 0
    k = ctx.body.top_logprobs or 0
    prompt_lps = None
    async for out in stream:
        cached = getattr(out, "num_cached_tokens", 0) or 0
        prompt_lps = getattr(out, "prompt_logprobs", None) or prompt_lps
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            texts[c.index].append(c.text)
            if ctx.body.logprobs:
                lps[c.index].extend(chat_logprobs(c, ctx.tokenizer, k))
            if c.finish_reason is not None:
                reasons[c.index] = (c.finish_reason, c.stop_reason)
    choices = []
    for i in range(ctx.body.n):
        reason, stop_reason = reasons.get(i, (None, None))
        choices.append({"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                        "logprobs": {"content": lps[i]} if ctx.body.logprobs else None,
                        "finish_reason": reason, "stop_reason": stop_reason})
    return {"id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": ctx.usage(completion_tokens, cached), "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(prompt_lps)}  # vLLM's extra, at the response level


async def _stream(ctx: _Ctx, stream: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
    opts = ctx.body.stream_options
    include_usage = bool(opts and opts.include_usage)
    k = ctx.body.top_logprobs or 0
    # OpenAI opens every choice with a role-only delta before any content.
    for i in range(ctx.body.n):
        delta = {"role": "assistant", "content": ctx.echo}
        yield ctx.chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], include_usage)
    completion_tokens = cached = 0
    async for out in stream:
        cached = getattr(out, "num_cached_tokens", 0) or 0
        for c in out.outputs:
            if not c.text and not c.token_ids and c.finish_reason is None:
                continue
            completion_tokens += len(c.token_ids)
            delta = {"content": c.text} if c.text or c.finish_reason is None else {}
            lp = {"content": chat_logprobs(c, ctx.tokenizer, k)} if ctx.body.logprobs else None
            yield ctx.chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}], include_usage)
    if include_usage:
        final = ctx.chunk([], False)
        final["usage"] = ctx.usage(completion_tokens, cached)
        yield final
