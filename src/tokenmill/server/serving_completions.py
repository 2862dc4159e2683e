"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) -> text_completion."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import APIError, invalid_param
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.lora_api import lora_for
from tokenmill.server.prompt_logprobs import echo_prompt_logprobs, prompt_logprobs_json
from tokenmill.server.protocol import CompletionRequest
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
from tokenmill.server.streaming import merge, sse_response, until_disconnect
from tokenmill.server.structured_outputs import (
    request_structured_outputs_async,
    with_constraint,
)
from tokenmill.server.tokenizer_pool import (
    check_prompt_chars,
    run_tokenizer,
    text_chars,
)


def prompt_token_ids(prompt: Any, tokenizer: Any, vocab_size: int, add_special_tokens: bool,
                     param: str = "prompt") -> list[tuple[str | None, list[int]]]:
    """Normalise OpenAI's four prompt forms into (text or None, token ids) pairs."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise invalid_param(param, f"invalid {param}: must not be empty")
    out: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            ids = list(tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"])
            out.append((item, ids))
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise invalid_param(param, f"invalid {param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            out.append((None, list(item)))
    return out


def num_prompts(prompt: Any) -> int:
    """How many prompts a `prompt` field holds (a string or one token-id list is one)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return 1
    return len(prompt)


def _tokenize_prompts(body: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """The tokenizer thread's work: token ids, and the text of id prompts when echo returns it."""
    prompts = prompt_token_ids(body.prompt, tokenizer, vocab_size, body.add_special_tokens)
    if body.echo:
        prompts = [(t if t is not None else tokenizer.decode(ids), ids) for t, ids in prompts]
    return prompts


async def create_completion(state: ServerState, request: Request) -> Response:
    cfg = state.server_config
    body = await read_body(request, CompletionRequest, cfg.max_body_bytes, cfg.max_json_depth)
    check_ready(state)
    model = check_model(state, body.model)
    check_generate(state, model)
    engine = state.engine
    constraint = await request_structured_outputs_async(body, state.server_config)
    if body.suffix:
        raise invalid_param("suffix", "invalid suffix: insertion (suffix) is not supported")
    info = engine.model_info
    if body.n * num_prompts(body.prompt) > cfg.max_seqs_per_request:
        raise APIError(400, f"invalid prompt: {num_prompts(body.prompt)} prompts x n={body.n} is more than the "
                       f"{cfg.max_seqs_per_request} sequences one request may start", param="prompt",
                       code="invalid_parameter")
    check_prompt_chars(text_chars(body.prompt), state, "prompt")
    prompts = await run_tokenizer(state, _tokenize_prompts, body, engine.tokenizer, info.vocab_size)
    if not body.echo and body.max_tokens == 0:
        raise invalid_param("max_tokens", "invalid max_tokens=0: must be an integer >= 1 (0 only with echo=true, "
                                          "which returns the prompt alone, e.g. to score it with logprobs)")
    # vLLM's rules: echo with logprobs scores the prompt too; max_tokens 0 with echo generates one token that
    # the answer leaves out (finish_reason "length").
    num_prompt_lps = body.prompt_logprobs
    if num_prompt_lps is None and body.echo:
        num_prompt_lps = body.logprobs
    max_tokens = 1 if body.echo and body.max_tokens == 0 else body.max_tokens
    params = [sampling_params(body, max_tokens, body.logprobs, len(ids), info.max_model_len, "prompt", num_prompt_lps,
                              vocab_size=info.vocab_size, limits=cfg)
              for _, ids in prompts]
    if constraint is not None:
        params = [with_constraint(p, constraint) for p in params]
    slots = admit(state, body.n, len(prompts))
    rid = new_request_id("cmpl")
    created = int(time.time())
    lora = lora_for(state, model)
    streams = [generate(state, ids, p, f"{rid}-{i}", body.priority, slot, lora_request=lora)
               for i, ((_, ids), p, slot) in enumerate(zip(prompts, params, slots))]
    ctx = _Ctx(rid, created, model, body, prompts, engine.tokenizer)
    if body.stream:
        return sse_response(_stream(ctx, streams))
    return JSONResponse(await until_disconnect(request, _full(ctx, streams)))


class _Ctx:
    __slots__ = ("body", "created", "echo_only", "id", "model", "prompt_lps", "prompts", "tokenizer")

    def __init__(self, rid: str, created: int, model: str, body: CompletionRequest,
                 prompts: list[tuple[str | None, list[int]]], tokenizer: Any) -> None:
        self.id, self.created, self.model, self.body, self.prompts, self.tokenizer = rid, created, model, body, prompts, tokenizer
        self.echo_only = body.echo and body.max_tokens == 0  # the prompt alone: the generated token is dropped
        self.prompt_lps: dict[int, list[Any]] = {}  # prompt index -> engine prompt logprobs, once they arrive

    def note_prompt_logprobs(self, p: int, out: Any) -> None:
        plps = getattr(out, "prompt_logprobs", None)
        if plps is not None:
            self.prompt_lps[p] = plps

    def start_logprobs(self, p: int) -> tuple[dict[str, list], int]:
        """A choice's `logprobs` object with the echoed prompt's tokens when known, and the next text_offset."""
        acc: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        if not self.body.echo:
            return acc, 0
        plps = self.prompt_lps.get(p)
        if plps is None:
            return acc, len(self.prompts[p][0] or "")
        return acc, echo_prompt_logprobs(acc, self.prompts[p][1], plps, self.tokenizer, self.body.logprobs or 0)

    def usage(self, completion_tokens: int, cached: int) -> dict[str, Any]:
        prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage


async def _full(ctx: _Ctx, streams: list[AsyncIterator[Any]]) -> dict[str, Any]:
    n = ctx.body.n
    want_lp = ctx.body.logprobs is not None
    texts: dict[int, list[str]] = {}
    offsets: dict[int, int] = {}
    lps: dict[int, dict[str, list]] = {}
    reasons: dict[int, tuple[str | None, Any]] = {}
    completion_tokens = 0
    cached: dict[int, int] = {}
    samples: dict[int, list[Any]] = {}  # choice index -> its CompletionOutput deltas
    async for p, out in merge(streams):
        cached[p] = getattr(out, "num_cached_tokens", 0) or 0
        ctx.note_prompt_logprobs(p, out)
        for c in out.outputs:
            idx = p * n + c.index
            if idx not in texts:
                texts[idx] = [ctx.prompts[p][0] or ""] if ctx.body.echo else []
                samples[idx] = []
            if c.finish_reason is not None:
                reasons[idx] = (c.finish_reason, c.stop_reason)
            if ctx.echo_only:
                continue
            completion_tokens += len(c.token_ids)
            samples[idx].append(c)
            texts[idx].append(c.text)
    choices = []
    for idx in sorted(texts):
        p = idx // n
        if want_lp:  # formatted once all is in: the echoed prompt's logprobs come first
            lps[idx], offsets[idx] = ctx.start_logprobs(p)
            for c in samples[idx]:
                offsets[idx] = completion_logprobs(lps[idx], c, ctx.tokenizer, ctx.body.logprobs, offsets[idx])
        reason, stop_reason = reasons.get(idx, (None, None))
        choices.append({"index": idx, "text": "".join(texts[idx]), "logprobs": lps[idx] if want_lp else None,
                        "finish_reason": reason, "stop_reason": stop_reason,
                        "prompt_logprobs": prompt_logprobs_json(ctx.prompt_lps.get(p))})
    return {"id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": choices, "usage": ctx.usage(completion_tokens, sum(cached.values())),
            "system_fingerprint": None}


async def _stream(ctx: _Ctx, streams: list[AsyncIterator[Any]]) -> AsyncIterator[dict[str, Any]]:
    n = ctx.body.n
    include_usage = bool(ctx.body.stream_options and ctx.body.stream_options.include_usage)
    offsets: dict[int, int] = {}
    completion_tokens = 0
    cached: dict[int, int] = {}
    async for p, out in merge(streams):
        cached[p] = getattr(out, "num_cached_tokens", 0) or 0
        ctx.note_prompt_logprobs(p, out)
        for c in out.outputs:
            idx = p * n + c.index
            first = idx not in offsets
            text, token_ids = ("", []) if ctx.echo_only else (c.text, c.token_ids)
            lp = None
            if first:
                # The first chunk carries the echoed prompt (and its logprobs: they arrive with the first output).
                lp, offsets[idx] = ctx.start_logprobs(p)
                if ctx.body.echo:
                    text = (ctx.prompts[p][0] or "") + text
            if not text and not token_ids and c.finish_reason is None:
                continue
            completion_tokens += len(token_ids)
            if ctx.body.logprobs is None:
                lp = None
            else:
                lp = lp if lp is not None else {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
                if not ctx.echo_only:
                    offsets[idx] = completion_logprobs(lp, c, ctx.tokenizer, ctx.body.logprobs, offsets[idx])
            choice = {"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason}
            if first and p in ctx.prompt_lps and ctx.body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(ctx.prompt_lps[p])
            chunk: dict[str, Any] = {
                "id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                "choices": [choice],
            }
            if include_usage:
                chunk["usage"] = None
            yield chunk
    if include_usage:
        yield {"id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
               "choices": [], "usage": ctx.usage(completion_tokens, sum(cached.values()))}

