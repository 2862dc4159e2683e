"""Per-request log lines of the server: one INFO summary per finished request (never the prompt text), and
with `--log-requests` the prompt (truncated) and sampling parameters when a request arrives, like vLLM's
"Received request" lines."""

from __future__ import annotations

import dataclasses
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from tokenmill.sampling_params import SamplingParams

log = logging.getLogger("tokenmill.server.requests")

# Longest prompt text (characters) a --log-requests line shows; the rest is summarised by its length.
MAX_LOGGED_PROMPT_CHARS = 500


@dataclass(slots=True)
class RequestSummary:
    """What one finished request did. Times in seconds; ttft_s None when no token came out."""

    request_id: str
    finish_reason: str  # stop | length | abort | error
    http_status: int | None  # None: unknown (the client left before a status was decided)
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int
    ttft_s: float | None
    total_s: float

    def line(self) -> str:
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s:.3f}s"
        http = "-" if self.http_status is None else str(self.http_status)
        return (f"finished request {self.request_id}: status={self.finish_reason} http={http} "
                f"prompt_tokens={self.num_prompt_tokens} completion_tokens={self.num_completion_tokens} "
                f"cached_tokens={self.num_cached_tokens} ttft={ttft} total={self.total_s:.3f}s")


# Ids summarised during the current HTTP request: a list shared with the handler's task (the middleware
# runs the handler in a child task, whose context changes do not flow back, but a mutated list does).
_summarised: ContextVar[list[str] | None] = ContextVar("tokenmill_summarised_requests", default=None)


def log_finished(summary: RequestSummary) -> None:
    log.info("%s", summary.line())
    ids = _summarised.get()
    if ids is not None:
        ids.append(summary.request_id)


def track_http_request() -> list[str]:
    """Start collecting the ids summarised while this HTTP request is handled (call in a middleware)."""
    ids: list[str] = []
    _summarised.set(ids)
    return ids


def log_rejected(method: str, path: str, status: int, total_s: float) -> None:
    """The line of a request that failed before reaching the engine (bad body, unknown model, 429...)."""
    log.info("rejected request %s %s: http=%d total=%.3fs", method, path, status, total_s)


def log_received(request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Any) -> None:
    """The --log-requests line: prompt text (decoded, truncated) and the sampling parameters that are set."""
    if not log.isEnabledFor(logging.INFO):
        return
    text = tokenizer.decode(prompt_ids) if tokenizer is not None else ""
    shown = text[:MAX_LOGGED_PROMPT_CHARS]
    more = f"... ({len(text)} chars)" if len(text) > MAX_LOGGED_PROMPT_CHARS else ""
    log.info("received request %s: prompt: %r%s, prompt_tokens: %d, params: %s", request_id, shown, more,
             len(prompt_ids), describe_params(params))

_SECRET_PARAMS = frozenset({"cache_salt"})


def describe_params(params: SamplingParams) -> str:
    """The fields that differ from SamplingParams' defaults, as `name=value` pairs (a short, stable line).
    A tenant's cache_salt is a secret (it decides who shares prefix-cache blocks): shown as set, never its value."""
    defaults = SamplingParams()
    changed = [f"{f.name}={'<redacted>' if f.name in _SECRET_PARAMS else repr(getattr(params, f.name))}"
               for f in dataclasses.fields(params) if getattr(params, f.name) != getattr(defaults, f.name)]
    return "SamplingParams(" + ", ".join(changed) + ")"
