"""Prompt logprobs in the HTTP answers: vLLM's `prompt_logprobs` field and the echoed prompt of legacy
completions (`echo: true` with `logprobs: N`, what lm-eval's log-likelihood scoring reads)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tokenmill.server.logprobs import completion_logprobs, token_text

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to this value too


def prompt_logprobs_json(plps: list[Any] | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's shape: null for the first prompt token, then {token_id: {logprob, rank, decoded_token}}."""
    if plps is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": max(float(lp.logprob), _MIN_LOGPROB), "rank": lp.rank,
                        "decoded_token": lp.decoded_token} for tid, lp in entry.items()}
            for entry in plps]


def echo_prompt_logprobs(acc: dict[str, list], prompt_ids: list[int], plps: list[Any], tokenizer: Any,
                         k: int) -> int:
    """Append the prompt's tokens to a completions `logprobs` object (null logprob and top_logprobs for the
    first token, as OpenAI's legacy API); returns the text_offset where the completion's tokens continue."""
    first = token_text(tokenizer, prompt_ids[0])
    acc["text_offset"].append(0)
    acc["tokens"].append(first)
    acc["token_logprobs"].append(None)
    acc["top_logprobs"].append(None)
    rest = SimpleNamespace(token_ids=prompt_ids[1:], logprobs=plps[1:])
    return completion_logprobs(acc, rest, tokenizer, k, len(first))

