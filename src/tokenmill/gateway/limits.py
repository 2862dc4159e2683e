"""API keys and per-key request/min and token/min limits (sliding 60 s window)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tokenmill.gateway.config import ApiKeyConfig

WINDOW_S = 60.0


class AuthError(Exception):
    """Missing or unknown API key while keys are configured (-> 401)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: `name` identifies the key for fairness and limits ("" when keys are off)."""

    name: str
    priority: int = 0
    config: ApiKeyConfig | None = None


class KeyRing:
    def __init__(self, keys: tuple[ApiKeyConfig, ...]) -> None:
        self._by_key = {k.key: k for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_key)

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Caller:
        if not self.enabled:
            return Caller(name="")
        token = x_api_key
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        if not token:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        cfg = self._by_key.get(token)
        if cfg is None:
            raise AuthError("invalid API key")
        return Caller(name=cfg.name or f"key-{list(self._by_key).index(token)}", priority=cfg.priority, config=cfg)


def estimate_tokens(body: dict) -> int:
    """Tokens a request may cost, for token/min limits: prompt chars/4 plus max_tokens (default 16)."""
    chars = 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        for p in prompt:
            chars += len(p) * 4 if isinstance(p, list) else (4 if isinstance(p, int) else len(str(p)))
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else []:  # fuzzing: "messages": 1.5 was a 500
        if isinstance(m, dict):
            chars += len(str(m.get("content", "")))
    inp = body.get("input")
    if isinstance(inp, str):
        chars += len(inp)
    elif isinstance(inp, list):
        chars += sum(len(str(x)) for x in inp)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    n = body.get("n") or 1
    if not isinstance(max_tokens, int) or not isinstance(n, int):
        max_tokens, n = 16, 1
    # Never below the prompt's share: a negative max_tokens or n (the replica rejects it) must not refund
    # tokens to the caller's window.
    return math.ceil(chars / 4) + max(0, max_tokens) * max(1, n)


class RateLimiter:
    """Per key: at most requests_per_minute requests and tokens_per_minute estimated tokens in any 60 s."""

    def __init__(self) -> None:
        self._events: dict[str, deque[tuple[float, int]]] = {}

    def check(self, caller: Caller, tokens: int, now: float) -> float | None:
        """Record the request and return None, or return seconds until it would fit (not recorded)."""
        cfg = caller.config
        if cfg is None or (cfg.requests_per_minute is None and cfg.tokens_per_minute is None):
            return None
        ev = self._events.setdefault(caller.name, deque())
        while ev and ev[0][0] <= now - WINDOW_S:
            ev.popleft()
        waits: list[float] = []
        if cfg.requests_per_minute is not None and len(ev) >= cfg.requests_per_minute:
            waits.append(ev[len(ev) - cfg.requests_per_minute][0] + WINDOW_S - now)
        if cfg.tokens_per_minute is not None:
            used = sum(t for _, t in ev)
            if used + tokens > cfg.tokens_per_minute:
                # Free enough of the oldest events that this request fits; never fits if it alone is too big.
                if tokens > cfg.tokens_per_minute:
                    waits.append(WINDOW_S)
                else:
                    acc = used
                    for t_ev, tok in ev:
                        acc -= tok
                        if acc + tokens <= cfg.tokens_per_minute:
                            waits.append(t_ev + WINDOW_S - now)
                            break
        if waits:
            return max(0.001, max(waits))
        ev.append((now, tokens))
        return None
