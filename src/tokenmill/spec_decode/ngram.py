"""N-gram (prompt lookup) proposer: the sequence's own earlier tokens predict its next ones.

For the longest suffix of the history (prompt_lookup_max down to prompt_lookup_min tokens) that occurred
before, the tokens that followed its latest earlier occurrence are the drafts. Outputs that copy from the
prompt (edits of code, quoting summaries, RAG answers) find long matches; free text finds few and then
proposes nothing, so a step costs no more than without speculation.
Each sequence's history lives in a growing numpy buffer (appended, never rebuilt), and each lookup is
vectorised over the whole history: no per-token Python loop.
"""

from __future__ import annotations

import numpy as np

from tokenmill.config import SpeculativeConfig
from tokenmill.spec_decode.proposer import ProposalInput


class _History:
    """A sequence's token ids in a numpy buffer that grows by doubling."""

    __slots__ = ("buf", "n")

    def __init__(self, token_ids: list[int]) -> None:
        self.buf = np.asarray(token_ids, dtype=np.int64)
        self.n = len(token_ids)

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """Make the buffer equal token_ids. Verified history only grows, except after rejected drafts, which
        were never added here; a mismatch (preemption, reuse of an id) rebuilds it."""
        n = len(token_ids)
        if n < self.n or (self.n and self.buf[self.n - 1] != token_ids[self.n - 1]):
            self.__init__(token_ids)
        elif n > self.n:
            if n > len(self.buf):
                grown = np.empty(max(n, 2 * len(self.buf)), dtype=np.int64)
                grown[: self.n] = self.buf[: self.n]
                self.buf = grown
            self.buf[self.n : n] = token_ids[self.n :]
            self.n = n
        return self.buf[: self.n]


def find_drafts(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        suffix = tokens[total - n :]
        # candidate starts: an occurrence at i must end before the suffix itself (i + n < total)
        starts = np.flatnonzero(tokens[: total - n] == suffix[0])
        if len(starts) == 0:
            continue
        if n > 1:
            ok = np.ones(len(starts), dtype=bool)
            for j in range(1, n):  # n <= prompt_lookup_max: a short loop over offsets, vectorised over starts
                ok &= tokens[starts + j] == suffix[j]
            starts = starts[ok]
        if len(starts):
            i = int(starts[-1]) + n
            return tokens[i : i + k].tolist()
    return []


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens
        self.min_n = max(1, config.prompt_lookup_min)
        self.max_n = max(self.min_n, config.prompt_lookup_max)
        self._histories: dict[str, _History] = {}

    def propose(self, batch: list[ProposalInput]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for item in batch:
            k = min(self.k, item.max_tokens)
            if k <= 0:
                continue
            hist = self._histories.get(item.seq_id)
            if hist is None:
                hist = self._histories[item.seq_id] = _History(item.token_ids)
                tokens = hist.buf
            else:
                tokens = hist.sync(item.token_ids)
            drafts = find_drafts(tokens, k, self.min_n, self.max_n)
            if drafts:
                out[item.seq_id] = drafts
        return out

    def release(self, seq_id: str) -> None:
        self._histories.pop(seq_id, None)
