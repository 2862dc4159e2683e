"""Prompt logprobs between the runner and the client (torch-free).

The scheduler keeps a PromptLogprobsCollector: a request that asks for prompt logprobs has its sample 0
computed without prefix-cache hits (a cached position has no logits), its chunks' logprobs gathered as
they come, and the whole list sent once with sample 0's first token. The front end turns the wire rows
into vLLM's `list[dict[int, Logprob] | None]`.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.engine.outputs import Logprob, PromptLogprobRow, PromptLogprobs


class PromptLogprobsCollector:
    """Invariant: rows[seq_id][i] is prompt token i's row; rows[seq_id][0] is None (no logits predict it)."""

    def __init__(self) -> None:
        self._rows: dict[str, list[PromptLogprobRow]] = {}

    def expect(self, seq_id: str) -> None:
        self._rows[seq_id] = [None]

    def wants(self, seq_id: str) -> bool:
        """True until the sequence's prompt logprobs have been sent: it must compute every prompt position."""
        return seq_id in self._rows

    def record(self, chunk: PromptLogprobs) -> None:
        rows = self._rows.get(chunk.seq_id)
        if rows is None:
            return
        # A recompute after preemption starts again at position 0: drop what it recomputes.
        del rows[chunk.start_pos + 1:]
        for lp, rank, ids, lps in zip(chunk.logprobs, chunk.ranks, chunk.top_ids, chunk.top_logprobs):
            token_id = -1  # filled by take(): the runner reports positions, the prompt names the tokens
            rows.append([token_id, float(lp), int(rank), [[int(t), float(v)] for t, v in zip(ids, lps)]])

    def take(self, seq_id: str, prompt_token_ids: list[int]) -> list[PromptLogprobRow] | None:
        rows = self._rows.pop(seq_id, None)
        if rows is None:
            return None
        for i, row in enumerate(rows):
            if row is not None:
                row[0] = prompt_token_ids[i]
        return rows

    def drop(self, seq_id: str) -> None:
        self._rows.pop(seq_id, None)


def to_logprob_dicts(rows: list[PromptLogprobRow], k: int,
                     decode: Callable[[int], str | None]) -> list[dict[int, Logprob] | None]:
    """Wire rows -> vLLM's prompt_logprobs: the prompt token (with its true rank) plus the top-k by rank."""
    out: list[dict[int, Logprob] | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        token_id, logprob, rank, top = row
        # vLLM's order: the prompt token first, then the alternatives best first.
        entry = {int(token_id): Logprob(float(logprob), int(rank), decode(int(token_id)))}
        for r, (alt, alt_lp) in enumerate(list(top)[:k], start=1):
            entry.setdefault(int(alt), Logprob(float(alt_lp), r, decode(int(alt))))
        out.append(entry)
    return out
