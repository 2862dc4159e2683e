"""Running token counts for repetition / frequency / presence penalties.

Rebuilding counts from a sequence's whole history every step made a step cost O(output length), so an
n-token output cost O(n^2). Instead each penalised sequence owns one row of a persistent [rows, vocab] count
tensor (and a row of a [rows, vocab] prompt mask), filled from the history once when the row is taken (a new
sequence, or one re-sent after preemption by recompute) and then advanced by the tokens appended since the
last step (normally one). Rows are taken lazily on the first penalised step and given back by the runner when
the sequence leaves the batch; the tensors are dropped when no row is in use, so idle servers hold nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.layers.sampler import SeqSamplingState


class PenaltyCounts:
    """Invariants: for every state s with s.penalty_row >= 0, counts[s.penalty_row] is the histogram of
    s.output_token_ids[:s.num_counted] and prompt_seen[s.penalty_row] marks the ids of s.prompt_token_ids
    (ids outside the vocabulary ignored); a row is either free or owned by exactly one state."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.counts = torch.zeros((0, vocab_size), device=device)
        self.prompt_seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.free_rows: list[int] = []
        self.owners: list[SeqSamplingState | None] = []  # a row index alone could be another sampler's
        self.num_used = 0

    def owns(self, state: SeqSamplingState) -> bool:
        return 0 <= state.penalty_row < len(self.owners) and self.owners[state.penalty_row] is state

    def release(self, state: SeqSamplingState) -> None:
        """Give back the state's row (no-op when it has none)."""
        if not self.owns(state):
            return
        self.owners[state.penalty_row] = None
        self.free_rows.append(state.penalty_row)
        state.penalty_row = -1
        state.num_counted = 0
        self.num_used -= 1
        if self.num_used == 0:  # idle: give the memory back (a [rows, 262144] tensor is 1 MiB a row)
            self.counts = self.counts[:0].clone()
            self.prompt_seen = self.prompt_seen[:0].clone()
            self.free_rows.clear()
            self.owners.clear()

    def rows_for(self, states: list[SeqSamplingState]) -> tuple[torch.Tensor, torch.Tensor]:
        """The up-to-date (counts, prompt_seen) rows of `states`, in order: [len(states), vocab] each."""
        rows: list[int] = []
        cols: list[int] = []
        for s in states:
            if not self.owns(s) or s.num_counted > len(s.output_token_ids):
                self._take_row(s)  # new, or history rewritten under us: recount from scratch
            for t in s.output_token_ids[s.num_counted:]:
                if 0 <= t < self.vocab_size:
                    rows.append(s.penalty_row)
                    cols.append(t)
            s.num_counted = len(s.output_token_ids)
        if rows:
            idx = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
            self.counts.index_put_(idx, torch.ones(len(rows), device=self.device), accumulate=True)
        which = torch.tensor([s.penalty_row for s in states], device=self.device)
        return self.counts.index_select(0, which), self.prompt_seen.index_select(0, which)

    def _take_row(self, s: SeqSamplingState) -> None:
        if not self.owns(s):
            if not self.free_rows:
                self._grow()
            s.penalty_row = self.free_rows.pop()
            self.owners[s.penalty_row] = s
            self.num_used += 1
        self.counts[s.penalty_row].zero_()
        self.prompt_seen[s.penalty_row].zero_()
        prompt = [t for t in s.prompt_token_ids if 0 <= t < self.vocab_size]
        if prompt:
            self.prompt_seen[s.penalty_row, torch.tensor(prompt, device=self.device)] = True
        s.num_counted = 0  # the caller counts the whole output history next

    def _grow(self) -> None:
        """Double the capacity (amortised O(1) per row taken); existing rows keep their index."""
        old = self.counts.shape[0]
        new = max(4, 2 * old)
        counts = torch.zeros((new, self.vocab_size), device=self.device)
        seen = torch.zeros((new, self.vocab_size), dtype=torch.bool, device=self.device)
        counts[:old] = self.counts
        seen[:old] = self.prompt_seen
        self.counts, self.prompt_seen = counts, seen
        self.owners.extend([None] * (new - old))
        self.free_rows.extend(range(new - 1, old - 1, -1))  # pop() hands out the lowest index first
