"""Model routing: an alias (e.g. "auto") sends each request to a small or a large pool by complexity.

The default scorer is a transparent heuristic: a weighted sum of features in [0, 1], each explainable
(prompt length, requested max_tokens, code / math / multi-step markers, conversation depth). The
embedding scorer compares the prompt with labelled examples through an embeddings endpoint.

A constrained request (tools, a JSON response_format, vLLM's structured_outputs) goes to the large pool
whatever its score: small models are the ones that break a schema or call tools badly.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Protocol

import httpx

from tokenmill.gateway.config import EmbeddingScorerConfig, RouteConfig

_CODE = re.compile(r"```|\bdef |\bclass |\bfunction\b|\bimport |#include|\breturn\b|=>|\{\s*$|;\s*$|\bSQL\b|"
                   r"\b(python|javascript|typescript|rust|golang|java|c\+\+|regex|api|algorithm|implement|"
                   r"refactor|debug|compile)\b", re.IGNORECASE | re.MULTILINE)
_MATH = re.compile(r"\\frac|\\int|\\sum|\b(prove|proof|theorem|lemma|integral|derivative|equation|matrix|"
                   r"probability|optimi[sz]e|complexity)\b|\d+\s*[\^*/]\s*\d+|[=<>]\s*-?\d", re.IGNORECASE)
_STEPS = re.compile(r"\bstep[- ]by[- ]step\b|\b(first|then|next|finally|afterwards)\b|^\s*\d+[.)]\s|"
                    r"\b(explain|analy[sz]e|compare|design|plan|evaluate|trade-?offs?|why)\b",
                    re.IGNORECASE | re.MULTILINE)

log = logging.getLogger("tokenmill.gateway")

# Weights of each feature in the score; they sum to 1 so the score stays in [0, 1].
WEIGHTS = {"length": 0.25, "max_tokens": 0.15, "code": 0.25, "math": 0.1, "steps": 0.15, "depth": 0.1}


@dataclass(frozen=True, slots=True)
class Score:
    value: float  # 0 (trivial) .. 1 (hard)
    features: dict[str, float]


class Scorer(Protocol):
    async def score(self, body: dict) -> Score: ...


def prompt_text(body: dict) -> str:
    """The request's text: chat message contents joined, or the completion prompt(s), or embedding input."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        parts: list[str] = []
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    p = body.get("prompt", body.get("input"))
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return "\n".join(p)
    if isinstance(p, list):
        return " ".join(str(x) for x in p[:512])
    return ""


def _saturate(count: int, full_at: int) -> float:
    return min(1.0, count / full_at)


# vLLM's older per-request constraint fields, still sent by some clients.
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def constraint_kind(body: dict) -> str | None:
    """Why the request is constrained ("tools", "response_format", "structured_outputs", "guided"), or None.

    Only shapes that constrain decoding count: response_format {"type": "text"} and tool_choice "none"
    leave the model free."""
    tools = body.get("tools")
    if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
        return "tools"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return "response_format"
    so = body.get("structured_outputs")
    if isinstance(so, dict) and any(v not in (None, False) for k, v in so.items() if k != "disable_any_whitespace"):
        return "structured_outputs"
    if any(body.get(k) is not None for k in _GUIDED):
        return "guided"
    return None


class HeuristicScorer:
    """Each feature saturates at a stated level: 2000 prompt chars, 1024 max_tokens, 3 code markers,
    2 math markers, 3 multi-step markers, 6 user turns."""

    async def score(self, body: dict) -> Score:
        return self.score_sync(body)

    def score_sync(self, body: dict) -> Score:
        text = prompt_text(body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        msgs = body.get("messages") if isinstance(body.get("messages"), list) else []
        turns = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "user")
        f = {
            # log scale: going from 50 to 500 chars matters more than from 5000 to 5500
            "length": min(1.0, math.log1p(len(text)) / math.log1p(2000)) if text else 0.0,
            "max_tokens": min(1.0, max_tokens / 1024) if isinstance(max_tokens, int) else 0.0,
            "code": _saturate(len(_CODE.findall(text)), 3),
            "math": _saturate(len(_MATH.findall(text)), 2),
            "steps": _saturate(len(_STEPS.findall(text)), 3),
            "depth": _saturate(max(0, turns - 1), 5),
        }
        return Score(round(sum(WEIGHTS[k] * v for k, v in f.items()), 4), f)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a)) or 1.0
    nb = math.sqrt(sum(y * y for y in b)) or 1.0
    return dot / (na * nb)


class EmbeddingScorer:
    """Mean cosine similarity to the top_k closest "large" examples minus that to the top_k closest
    "small" examples, mapped from [-1, 1] to [0, 1]. Example embeddings are fetched once."""

    def __init__(self, config: EmbeddingScorerConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self._client = client
        self._examples: list[tuple[str, list[float]]] | None = None

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        body: dict = {"input": texts}
        if self.config.model:
            body["model"] = self.config.model
        resp = await self._client.post(f"{self.config.url.rstrip('/')}/v1/embeddings", json=body, timeout=30.0)
        resp.raise_for_status()
        data = sorted(resp.json()["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data]

    async def score(self, body: dict) -> Score:
        if self._examples is None:
            exs = self.config.examples
            vecs = await self._embed([e.text for e in exs])
            self._examples = [(e.label, v) for e, v in zip(exs, vecs)]
        (q,) = await self._embed([prompt_text(body)[:4000] or " "])
        sims: dict[str, list[float]] = {"small": [], "large": []}
        for label, v in self._examples:
            sims[label].append(_cosine(q, v))
        k = self.config.top_k
        top = {lab: (sum(sorted(s, reverse=True)[:k]) / min(k, len(s)) if s else 0.0) for lab, s in sims.items()}
        value = (top["large"] - top["small"] + 1.0) / 2.0
        return Score(round(min(1.0, max(0.0, value)), 4), {"sim_small": top["small"], "sim_large": top["large"]})


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str
    score: Score


class ModelRouter:
    """Resolves the request's `model` to a pool name: a configured alias is scored, anything else is looked
    up by pool name or served model name."""

    def __init__(self, routes: tuple[RouteConfig, ...], client: httpx.AsyncClient,
                 scorers: dict[str, Scorer] | None = None) -> None:
        self.routes = {r.alias: r for r in routes}
        self._scorers: dict[str, Scorer] = dict(scorers or {})
        for r in routes:
            if r.alias not in self._scorers:
                if r.scorer == "embedding" and r.embedding is not None:
                    self._scorers[r.alias] = EmbeddingScorer(r.embedding, client)
                else:
                    self._scorers[r.alias] = HeuristicScorer()

    def is_alias(self, model: str | None) -> bool:
        return model in self.routes

    async def route(self, alias: str, body: dict) -> Decision:
        r = self.routes[alias]
        try:
            s = await self._scorers[alias].score(body)
        # e.g. the embeddings endpoint is down: routing must not fail the request
        except Exception as e:  # noqa: BLE001
            log.warning("route %s: scorer failed (%r); using the heuristic", alias, e)
            h = HeuristicScorer().score_sync(body)
            s = Score(h.value, {**h.features, "fallback": 1.0})
        if constraint_kind(body) is not None:
            return Decision(r.large, Score(s.value, {**s.features, "constrained": 1.0}))
        return Decision(r.large if s.value >= r.threshold else r.small, s)
