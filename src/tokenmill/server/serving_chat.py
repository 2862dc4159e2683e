"""POST /v1/chat/completions: messages -> chat template -> tokens -> chat.completion(.chunk)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import APIError, invalid_param
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.lora_api import lora_for
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
from tokenmill.server.structured_outputs import (
    check_constraint,
    end_of_turn_ids,
    request_structured_outputs_async,
    with_constraint,
)
from tokenmill.server.tokenizer_pool import check_prompt_chars, run_tokenizer
from tokenmill.server.tool_calls import (
    ToolPlan,
    new_tool_call_id,
    plan_tools,
    tool_call_json,
)
from tokenmill.server.tool_stream import ToolCallStream
from tokenmill.tools.prompt import with_tools


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False, request_template: str | None = None,
                template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
                tool_parser: str | None = None) -> str:
    """Apply the chat template: the request's, else --chat-template, else the tokenizer's, else the model's.
    With tools, a template that cannot render them is swapped or fed plain turns (tools/prompt.py)."""
    tok = state.engine.tokenizer
    template = chat_template(state, request_template)
    if not template:
        raise APIError(400, "This model has no chat template; start the server with --chat-template or use "
                       "/v1/completions.", param="messages", code="chat_template_missing")
    convo = [{"role": m.role, "content": m.text(), "name": m.name, "tool_call_id": m.tool_call_id,
              "tool_calls": [c.model_dump() for c in m.tool_calls or []]} for m in messages]
    try:
        convo, tools, template = with_tools(convo, tools, template, tool_parser)
    except (AttributeError, TypeError, ValueError) as exc:  # fuzz: tool_calls arguments that are not a JSON object
        raise invalid_param("messages", f"invalid messages: a tool call this template is fed as plain text could "
                            f"not be formatted ({type(exc).__name__}: {exc}); send each tool call's arguments as "
                            "JSON text of an object") from None
    if tools:
        template_kwargs = {**(template_kwargs or {}), "tools": tools}
    try:
        text = tok.apply_chat_template(
            convo,
            tokenize=False,
            chat_template=template,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception(), SecurityError from the sandbox and friends
        if request_template:  # the request's own template is the likelier culprit
            raise invalid_param("chat_template", f"invalid chat_template (or messages for it): {exc}") from None
        param = "chat_template_kwargs" if "multiple values for keyword" in str(exc) else "messages"
        raise invalid_param(param, f"invalid {param} for this model's chat template: {exc}") from None
    if not isinstance(text, str):  # some tokenizer versions return a list when batched
        text = text[0]
    return text


def chat_template(state: ServerState, request_template: str | None = None) -> str | None:
    """The request's template, else --chat-template, else the tokenizer's, else the model's.
    A request's own template runs arbitrary (sandboxed, but unbounded) jinja loops on the tokenizer thread,
    so it needs --trust-request-chat-template, as in vLLM."""
    if request_template and not state.server_config.trust_request_chat_template:
        raise invalid_param("chat_template", "invalid chat_template: this server does not accept a chat template "
                            "in the request; start it with --trust-request-chat-template, or use --chat-template")
    engine = state.engine
    return request_template or state.chat_template or getattr(engine.tokenizer, "chat_template", None) \
        or engine.model_info.chat_template


def render_and_tokenize(state: ServerState, messages: list[ChatMessage], add_special_tokens: bool,
                        param: str = "messages", **render_kw: Any) -> list[int]:
    """The tokenizer thread's work for a chat prompt: render, bound the rendered text, tokenize."""
    text = render_chat(state, messages, **render_kw)
    check_prompt_chars(len(text), state, param)  # a template can expand its input (loops, tool schemas)
    return list(state.engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    body = await read_body(request, ChatCompletionRequest, state.server_config.max_body_bytes,
                           state.server_config.max_json_depth)
    check_ready(state)
    model = check_model(state, body.model)
    check_generate(state, model)
    engine = state.engine
    constraint = await request_structured_outputs_async(body, state.server_config)
    parser = state.server_config.tool_call_parser
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, auto_parser=parser,
                      max_tools=state.server_config.max_tools)
    constraint = _tools_constraint(plan, constraint, state)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_param("top_logprobs", "invalid top_logprobs: requires logprobs=true")
    if body.prompt_logprobs is not None and body.stream:  # vLLM refuses this combination too
        raise invalid_param("prompt_logprobs", "invalid prompt_logprobs with stream=true: chat returns prompt "
                                               "logprobs only without streaming")
    check_prompt_chars(sum(len(m.text()) for m in body.messages), state, "messages")
    ids = await run_tokenizer(state, render_and_tokenize, state, body.messages, body.add_special_tokens,
                              add_generation_prompt=body.add_generation_prompt,
                              continue_final_message=body.continue_final_message,
                              request_template=body.chat_template, template_kwargs=body.chat_template_kwargs,
                              tools=plan.tools, tool_parser=parser)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise invalid_param(field, f"invalid {field}={max_tokens}: must be an integer >= 1")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    try:
        params = sampling_params(body, max_tokens, logprobs, len(ids), engine.model_info.max_model_len, "messages",
                                 body.prompt_logprobs, vocab_size=engine.model_info.vocab_size,
                                 limits=state.server_config)
    except APIError as exc:
        if exc.param == "max_tokens":  # name the field the client actually sent
            exc.param = field
            exc.message = exc.message.replace("max_tokens", field)
        raise
    if constraint is not None:  # a completed grammar must be able to end the turn, not only the text
        turn = [t for t in end_of_turn_ids(engine.tokenizer, chat_template(state, body.chat_template) or "")
                if t not in engine.model_info.eos_token_ids]
        params = with_constraint(params, constraint, turn)
    [slot] = admit(state, body.n)
    rid = new_request_id("chatcmpl")
    echo = body.messages[-1].text() if body.echo and body.messages[-1].role == "assistant" else ""
    ctx = _Ctx(rid, int(time.time()), model, body, len(ids), engine.tokenizer, echo, plan)
    stream = generate(state, ids, params, rid, body.priority, slot, "tools" if plan.constrained else None,
                      lora_request=lora_for(state, model))
    if body.stream:
        return sse_response(_stream(ctx, stream))
    return JSONResponse(await until_disconnect(request, _full(ctx, stream)))


def _tools_constraint(plan: ToolPlan, constraint: Any, state: ServerState) -> Any:
    """required / named tool_choice: decode under the calls' JSON schema (one constraint per request)."""
    tools_so = plan.structured_outputs()
    if tools_so is None:
        return constraint
    if constraint is not None:
        raise invalid_param("tool_choice", f"invalid tool_choice: {plan.mode!r} tool choice constrains the output "
                            "to tool calls and cannot be combined with response_format / structured_outputs; "
                            "send one of them")
    try:
        check_constraint(tools_so, "tools", state.server_config)
    except APIError as exc:  # the schema is built from the tools' parameters: say so
        exc.message = exc.message.replace("invalid tools.json:", "invalid tools (a function's parameters "
                                          "schema, as tool_choice enforces it):", 1)
        raise
    return tools_so


class _Ctx:
    __slots__ = ("body", "created", "echo", "id", "model", "num_prompt", "tokenizer", "tools")

    def __init__(self, rid: str, created: int, model: str, body: ChatCompletionRequest, num_prompt: int,
                 tokenizer: Any, echo: str, tools: ToolPlan) -> None:
        self.id, self.created, self.model, self.body = rid, created, model, body
        self.num_prompt, self.tokenizer, self.echo, self.tools = num_prompt, tokenizer, echo, tools

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
        message, reason = _message("".join(texts[i]), reason, ctx.tools)
        choices.append({"index": i, "message": message,
                        "logprobs": {"content": lps[i]} if ctx.body.logprobs else None,
                        "finish_reason": reason, "stop_reason": stop_reason})
    return {"id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": ctx.usage(completion_tokens, cached), "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(prompt_lps)}  # vLLM's extra, at the response level


def _message(text: str, reason: str | None, plan: ToolPlan) -> tuple[dict[str, Any], str | None]:
    """The assistant message of one finished choice (tool calls extracted) and its finish_reason."""
    if plan.mode == "none":
        return {"role": "assistant", "content": text}, reason
    extracted = plan.extract(text)
    if not extracted.calls:
        return {"role": "assistant", "content": text}, reason
    calls = [tool_call_json(c, new_tool_call_id()) for c in extracted.calls]
    return ({"role": "assistant", "content": extracted.content, "tool_calls": calls},
            plan.finish_reason(reason, True))


async def _stream(ctx: _Ctx, stream: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
    opts = ctx.body.stream_options
    include_usage = bool(opts and opts.include_usage)
    k = ctx.body.top_logprobs or 0
    # OpenAI opens every choice with a role-only delta before any content.
    for i in range(ctx.body.n):
        delta = {"role": "assistant", "content": ctx.echo}
        yield ctx.chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}], include_usage)
    completion_tokens = cached = 0
    tools = None if ctx.tools.mode == "none" else [ToolCallStream(ctx.tools) for _ in range(ctx.body.n)]
    async for out in stream:
        cached = getattr(out, "num_cached_tokens", 0) or 0
        for c in out.outputs:
            if not c.text and not c.token_ids and c.finish_reason is None:
                continue
            completion_tokens += len(c.token_ids)
            lp = {"content": chat_logprobs(c, ctx.tokenizer, k)} if ctx.body.logprobs else None
            if tools is not None:
                for chunk in _tool_chunks(ctx, tools[c.index], c, lp, include_usage):
                    yield chunk
                continue
            delta = {"content": c.text} if c.text or c.finish_reason is None else {}
            yield ctx.chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}], include_usage)
    if include_usage:
        final = ctx.chunk([], False)
        final["usage"] = ctx.usage(completion_tokens, cached)
        yield final


def _tool_chunks(ctx: _Ctx, tools: ToolCallStream, c: Any, lp: dict[str, Any] | None,
                 include_usage: bool) -> list[dict[str, Any]]:
    """One output delta of a choice under tools: content / tool_calls deltas, the last carrying finish_reason."""
    deltas = tools.feed(c.text)
    reason = None
    if c.finish_reason is not None:
        more, reason = tools.finish(c.finish_reason)
        deltas += more or [{}]
    if not deltas and lp is None:
        return []
    deltas = deltas or [{}]
    chunks = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        chunks.append(ctx.chunk([{"index": c.index, "delta": delta, "logprobs": lp if i == 0 else None,
                                  "finish_reason": reason if last else None,
                                  "stop_reason": c.stop_reason if last else None}], include_usage))
    return chunks
