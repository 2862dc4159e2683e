"""Verification of draft tokens in the target model's forward pass.

A sequence with k drafts d1..dk is scored at its last k+1 input positions: row j holds the target's
distribution for output index n+j given the drafts before it. Each row is sampled exactly as a row without
speculation would be (same processors; a seeded row draws from a generator seeded by its output index), and
the drafts are accepted while they equal the row's token. The first row whose token differs supplies the
replacement; if all k match, row k supplies one more token.

That is exact: under greedy decoding the output equals decoding without drafts. For sampling it is the
standard speculative rejection sampling specialised to deterministic proposals (the draft distribution q is
one-hot at d): accepting d with probability min(1, p(d) / q(d)) = p(d) is what "a sample x ~ p equals d" does,
and on rejection x is distributed as p restricted to tokens other than d, renormalised, which is the residual
max(0, p - q) / Z. Both proposers propose deterministically (n-gram lookup, greedy draft model).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tokenmill.engine.outputs import ScheduledSeq
from tokenmill.layers.sampler import SampledRow, SeqSamplingState


def row_states(sampling: list[ScheduledSeq], states: list[SeqSamplingState]) -> list[SeqSamplingState]:
    """One sampling state per logits row: row j of a sequence with drafts sees the drafts before it as output
    (min_tokens counts them; a seeded row gets its own generator, seeded by its output index by the caller).
    Sequences with drafts never use penalties (the runner proposes nothing for them), so rows j > 0 take no
    penalty row."""
    rows: list[SeqSamplingState] = []
    for seq, st in zip(sampling, states):
        rows.append(st)
        drafts = seq.draft_ids
        for j in range(1, len(drafts) + 1):
            gen = None if st.generator is None else torch.Generator(device=st.generator.device)
            rows.append(replace(st, output_token_ids=st.output_token_ids + drafts[:j], generator=gen,
                                penalty_row=-1, num_counted=0))
    return rows


def accept(sampling: list[ScheduledSeq], rows: list[SampledRow]) -> list[list[SampledRow]]:
    """Per sequence, the rows it emits: the accepted drafts' rows, then the first differing (or bonus) row."""
    out: list[list[SampledRow]] = []
    r = 0
    for seq in sampling:
        drafts = seq.draft_ids
        emitted = []
        for j in range(len(drafts) + 1):
            row = rows[r + j]
            emitted.append(row)
            if j == len(drafts) or row.token_id != drafts[j]:
                break
        out.append(emitted)
        r += len(drafts) + 1
    return out
