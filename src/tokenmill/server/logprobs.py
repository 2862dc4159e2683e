"""Engine logprobs (per token: dict[token_id, Logprob(logprob, rank, decoded_token)]) -> OpenAI's shapes."""

from __future__ import annotations

from typing import Any


def token_text(tokenizer: Any, token_id: int, lp: Any = None) -> str:
    text = getattr(lp, "decoded_token", None)
    if text is None:
        text = tokenizer.decode([token_id])
    return text


def _entries(c: Any, tokenizer: Any, k: int) -> list[tuple[str, float | None, list[tuple[str, float]]]]:
    """(sampled token text, its logprob, top-k alternatives best first) for each new token of `c`."""
    out = []
    for i, tid in enumerate(c.token_ids):
        step = c.logprobs[i] if c.logprobs is not None and i < len(c.logprobs) else None
        if not step:
            out.append((token_text(tokenizer, tid), None, []))
            continue
        chosen = step.get(tid)
        top = sorted(((t, lp) for t, lp in step.items() if getattr(lp, "rank", None) is not None
                      and lp.rank >= 1), key=lambda e: e[1].rank)[:k]
        out.append((token_text(tokenizer, tid, chosen), _finite(chosen.logprob) if chosen else None,
                    [(token_text(tokenizer, t, lp), _finite(lp.logprob)) for t, lp in top]))
    return out


def _finite(logprob: float) -> float:
    # JSON has no -inf; OpenAI and vLLM report -9999.0 for "impossible".
    return max(float(logprob), -9999.0)


def completion_logprobs(acc: dict[str, list], c: Any, tokenizer: Any, k: int, offset: int) -> int:
    """Append the new tokens of `c` to a completions `logprobs` object; returns the next text_offset.

    Offsets are cumulative lengths of the token strings (vLLM's convention), so they stay consistent
    even while the detokenizer holds back an incomplete UTF-8 character."""
    for text, logprob, top in _entries(c, tokenizer, k):
        acc["text_offset"].append(offset)
        offset += len(text)
        acc["tokens"].append(text)
        acc["token_logprobs"].append(logprob)
        best: dict[str, float] = {}
        for t, v in top:  # distinct ids can decode alike (byte tokens -> U+FFFD): keep the likelier one
            best.setdefault(t, v)
        if k > 0 and logprob is not None:
            # OpenAI and vLLM list the sampled token too when it is outside the top k (k + 1 entries).
            best.setdefault(text, logprob)
        acc["top_logprobs"].append(best if k > 0 else None)
    return offset


def chat_logprobs(c: Any, tokenizer: Any, k: int) -> list[dict[str, Any]]:
    """Chat `logprobs.content` entries for the new tokens of `c`.

    Unlike completions, `top_logprobs` holds exactly the k likeliest tokens (OpenAI's definition; vLLM also
    returns k entries): the sampled token's own logprob is already in the entry itself."""
    return [
        # OpenAI reports -9999.0 where a logprob is unavailable; its schema has no null here.
        {"token": text, "logprob": -9999.0 if logprob is None else logprob, "bytes": list(text.encode("utf-8")),
         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top]}
        for text, logprob, top in _entries(c, tokenizer, k)
    ]
