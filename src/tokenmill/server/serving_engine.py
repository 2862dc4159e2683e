"""What every generation endpoint shares: parsing bodies, checking the model, building SamplingParams,
admission (429), and running one engine request while recording metrics and aborting on exit."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.config import ServerConfig
from tokenmill.engine.errors import EngineDeadError, RequestError
from tokenmill.lora.request import LoRARequest
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.body import read_body  # noqa: F401 - re-exported: handlers and batch/ import it here
from tokenmill.server.errors import (
    APIError,
    context_length_exceeded,
    engine_dead,
    invalid_param,
    model_not_found,
    unavailable,
)
from tokenmill.server.metrics import RequestTiming
from tokenmill.server.request_log import RequestSummary, log_finished, log_received
from tokenmill.server.state import ServerState

_FIELD_RE = re.compile(r"invalid (\w+)=")


def check_ready(state: ServerState) -> None:
    if state.draining:
        raise unavailable("The server is shutting down and accepts no new requests.")
    if state.engine is None:
        if state.load_error:
            raise engine_dead(state.load_error)
        raise unavailable("The model is still loading; retry shortly (GET /health turns 200 when ready).")
    if state.engine.errored:
        raise engine_dead(state.load_error or state.engine.dead_reason)


def check_generate(state: ServerState, model: str) -> None:
    if state.engine.model_info.task != "generate":
        raise APIError(400, f"The model `{model}` is an embedding model; use /v1/embeddings.", param="model",
                       code="wrong_task")


def check_model(state: ServerState, model: str | None) -> str:
    """The served name to report (the base model or a LoRA adapter's name, server/lora_api.py); 404 for a
    name this server does not serve. None means the default."""
    if model is None or model in state.served_model_names:
        return model or state.served_model_names[0]
    adapters = list(state.loras.adapters) if state.loras is not None else []
    if model in adapters:
        return model
    raise model_not_found(model, state.served_model_names + adapters)


def sampling_params(body: Any, max_tokens: int | None, logprobs: int | None, num_prompt_tokens: int,
                    max_model_len: int, prompt_param: str, prompt_logprobs: int | None = None, *,
                    vocab_size: int | None = None, limits: ServerConfig | None = None) -> SamplingParams:
    """SamplingParams from a request body; ValueError -> 400 naming the field; 400 when too long.
    With vocab_size / limits: token ids checked against the vocabulary, list sizes against the limits."""
    if max_tokens is not None and max_tokens < 1:
        raise invalid_param("max_tokens", f"invalid max_tokens={max_tokens}: must be an integer >= 1")
    if num_prompt_tokens == 0:
        raise invalid_param(prompt_param, f"invalid {prompt_param}: the prompt is empty (0 tokens)")
    if max_tokens is None:
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise context_length_exceeded(num_prompt_tokens, None, max_model_len, prompt_param)
        max_tokens = room
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise context_length_exceeded(num_prompt_tokens, max_tokens, max_model_len, prompt_param)
    if body.best_of is not None and body.best_of != body.n:
        raise invalid_param("best_of", f"invalid best_of={body.best_of}: only best_of == n (or unset) is supported")
    bias = None
    if body.logit_bias:
        bias = {}
        for k, v in body.logit_bias.items():
            if not k.lstrip("-").isdigit():
                raise invalid_param("logit_bias", f"invalid logit_bias key {k!r}: keys must be token ids")
            bias[int(k)] = v
    check_sizes(body, bias, vocab_size, limits or ServerConfig())
    kwargs: dict[str, Any] = {
        "n": body.n,
        "max_tokens": max_tokens,
        "min_tokens": body.min_tokens,
        "seed": body.seed,
        "stop": body.stop or [],
        "stop_token_ids": body.stop_token_ids or [],
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "logit_bias": bias,
        "skip_special_tokens": body.skip_special_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "cache_salt": body.cache_salt,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        m = _FIELD_RE.search(str(exc))
        raise invalid_param(m.group(1) if m else "body", str(exc)) from None


def check_sizes(body: Any, bias: dict[int, float] | None, vocab_size: int | None, limits: ServerConfig) -> None:
    """Token ids inside the vocabulary and lists within the server's bounds (each checked on every step)."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > limits.max_stop_strings or sum(map(len, stop)) > limits.max_stop_chars:
        raise invalid_param("stop", f"invalid stop: {len(stop)} strings of {sum(map(len, stop))} characters; at "
                            f"most {limits.max_stop_strings} strings of {limits.max_stop_chars} characters in all "
                            "are accepted (OpenAI accepts 4)")
    ids = body.stop_token_ids or []
    if len(ids) > limits.max_stop_token_ids:
        raise invalid_param("stop_token_ids", f"invalid stop_token_ids: {len(ids)} ids; at most "
                            f"{limits.max_stop_token_ids} are accepted")
    if bias and len(bias) > limits.max_logit_bias:
        raise invalid_param("logit_bias", f"invalid logit_bias: {len(bias)} entries; at most "
                            f"{limits.max_logit_bias} are accepted")
    if vocab_size is None:
        return
    for name, tokens in (("stop_token_ids", ids), ("logit_bias", bias or ())):
        bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid_param(name, f"invalid {name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


class Reservation:
    """Sequences admitted but not yet finished, counted in `state.in_flight_seqs` from admission on.

    Counting at admission (not when generation starts) keeps concurrent admissions honest. release() is
    idempotent; __del__ releases a reservation whose generator was never started (e.g. the client left
    before the stream began), so the count cannot leak.
    """

    def __init__(self, state: ServerState, num_seqs: int) -> None:
        self.state = state
        self.num_seqs = num_seqs
        state.in_flight_seqs += num_seqs

    def release(self) -> None:
        if self.num_seqs:
            self.state.in_flight_seqs -= self.num_seqs
            self.num_seqs = 0

    def __del__(self) -> None:
        self.release()


def admit(state: ServerState, num_seqs_per_prompt: int, num_prompts: int = 1) -> list[Reservation]:
    """Reserve batch slots for a request's prompts, or 429 when too many sequences would wait.

    Waiting = in-flight sequences beyond max_num_seqs, or the core's own waiting count when KV space (not
    the batch size) is what holds them back, whichever is larger.
    """
    num_seqs = num_seqs_per_prompt * num_prompts
    limit = state.server_config.max_queued_requests
    if limit is not None:
        if state.engine is not None:
            state.last_num_waiting = state.engine.stats().num_waiting
        max_seqs = state.engine_config.scheduler.max_num_seqs
        queued = max(0, state.in_flight_seqs - max_seqs, state.last_num_waiting)
        must_wait = state.in_flight_seqs + num_seqs > max_seqs or state.last_num_waiting > 0
        if must_wait and queued + num_seqs > limit:
            raise APIError(429, f"Too many requests waiting ({queued} sequences queued, limit {limit}); retry later.",
                           "rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"})
    return [Reservation(state, num_seqs_per_prompt) for _ in range(num_prompts)]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def generate(state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str,
                   priority: int, reservation: Reservation, constraint_kind: str | None = None,
                   lora_request: LoRARequest | None = None) -> AsyncIterator[Any]:
    """One engine request as an async iterator of RequestOutput deltas.

    Records metrics as tokens arrive; a constrained request is counted by kind (`constraint_kind` names a
    source the params cannot tell, e.g. "tools"; else the kind of params.structured_outputs). If the
    consumer stops early (disconnect, cancel, error) the engine generator is closed at once, which aborts
    the request in the core and frees its blocks.
    """
    engine = state.engine
    assert engine is not None
    timing = RequestTiming(arrival=time.monotonic())
    arrival_wall = time.time()
    prev: float | None = None
    finished: dict[int, str] = {}
    num_out, num_cached, http_status = 0, 0, None  # for the per-request log line
    if state.server_config.log_requests:
        log_received(request_id, prompt_ids, params, engine.tokenizer)
    if params.structured_outputs is not None:
        state.metrics.observe_constrained(constraint_kind or params.structured_outputs.kind)
    # lora_request only when set: engines without LoRA (test doubles, embedding servers) need not accept it
    stream = engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, priority=priority,
                             **({"lora_request": lora_request} if lora_request is not None else {}))
    try:
        try:
            async for out in stream:
                now = time.monotonic()
                new = sum(len(c.token_ids) for c in out.outputs)
                if new:
                    if timing.first_token is None:
                        timing.first_token = now
                        timing.scheduled = _scheduled_time(engine, request_id, timing, arrival_wall)
                    state.metrics.observe_token(now, prev, new, timing)
                    prev = timing.last_token = now
                for c in out.outputs:
                    if c.finish_reason is not None:
                        finished[c.index] = c.finish_reason
                num_out, num_cached = num_out + new, max(num_cached, out.num_cached_tokens)
                if len(finished) == params.n:
                    http_status = 200  # the consumer may stop right after the last delta
                yield out
            http_status = 200
        except APIError as exc:
            http_status = exc.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except EngineDeadError as exc:
            http_status = 503
            raise engine_dead(str(exc)) from exc
        except RequestError as exc:
            finished.update({i: "error" for i in range(params.n) if i not in finished})
            err = request_failed(exc)
            http_status = err.status
            raise err from exc
        except ValueError as exc:
            http_status = 400
            raise invalid_param("prompt", str(exc)) from exc
        except Exception as exc:
            http_status = 500
            if engine.errored:
                raise engine_dead(str(exc)) from exc
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "internal_error",
                           code="engine_error") from exc
    finally:
        # Bookkeeping first: under cancellation the await below may be interrupted.
        reservation.release()
        pop = getattr(getattr(engine, "client", None), "pop_first_scheduled", None)
        if pop is not None:
            pop(request_id)
        now, reason = time.monotonic(), _overall_reason(finished, params.n)
        state.metrics.observe_finished(timing, reason, len(prompt_ids), now)
        ttft = None if timing.first_token is None else timing.first_token - timing.arrival
        log_finished(RequestSummary(request_id, reason, http_status, len(prompt_ids), num_out, num_cached, ttft,
                                    now - timing.arrival))
        await stream.aclose()  # aborts the request in the core if it is still running


# A 5xx that only this request caused carries this header, so a gateway does not count it against the
# replica (tokenmill.gateway.proxy.ERROR_SCOPE_HEADER: the same name, the gateway imports no server code).
ERROR_SCOPE_HEADER = "x-tokenmill-error-scope"


def request_failed(exc: RequestError) -> APIError:
    """The engine failed one request (others continue): 400 when the request itself can never be served,
    else a 500 marked as this request's alone. A model runner error stays an unmarked 500: it failed a
    whole batch and may be the replica's fault (a gateway counts it and may eject the replica)."""
    msg = str(exc)
    if "more than the cache holds" in msg:  # scheduler: prompt + output can never fit in the KV cache
        return APIError(400, f"prompt: the prompt plus max_tokens needs more KV cache than this server holds; "
                        f"send a shorter prompt or fewer max_tokens ({msg})",
                        "invalid_request_error", param="prompt", code="context_length_exceeded")
    if msg.startswith("model runner error"):
        return APIError(500, f"the engine failed this request: {msg}", "internal_error", code="request_failed")
    return APIError(500, f"the engine failed this request: {msg}", "internal_error", code="request_failed",
                    headers={ERROR_SCOPE_HEADER: "request"})


def _scheduled_time(engine: Any, request_id: str, timing: RequestTiming, arrival_wall: float) -> float:
    """Monotonic time the core first scheduled the request. The multiprocess client reports it; without
    it (in-process client) queueing is folded into prefill time."""
    pop = getattr(getattr(engine, "client", None), "pop_first_scheduled", None)
    wall = pop(request_id) if pop is not None else None
    if wall is None:
        return timing.arrival
    return timing.arrival + max(0.0, wall - arrival_wall)


def _overall_reason(finished: dict[int, str], n: int) -> str:
    if len(finished) < n:
        return "abort"
    reasons = set(finished.values())
    for r in ("error", "abort", "length", "stop"):
        if r in reasons:
            return r
    return next(iter(reasons))
