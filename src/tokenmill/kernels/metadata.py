"""Per-step attention metadata, one per KV cache group (layers sharing a block table).

Built once per step by the model runner and shared by every layer of the group. The fast path's gather
indices and masks are derived lazily on first use and cached here, so 30 layers pay for them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillPlan:
    """One sequence with more than one query token this step."""

    q_lo: int
    q_hi: int
    key_slots: torch.Tensor | None  # [L] flat cache slots of visible keys; None: use this step's K/V (causal)
    mask: torch.Tensor | None  # [n, L] bool, True = attend; None with key_slots None means plain causal


@dataclass(slots=True)
class FastPlan:
    decode_token_idx: torch.Tensor | None  # [B] flat token index of each single-token sequence
    decode_slots: torch.Tensor | None  # [B, L] flat cache slots (masked entries point at slot 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True = attend
    decode_is_all: bool  # every token of the step is a decode, in order: skip the scatter
    prefills: list[PrefillPlan] = field(default_factory=list)


@dataclass(slots=True)
class AttentionMetadata:
    """Flattened batch layout for one KV cache group.

    Sequence s owns flat tokens query_start_loc[s] .. query_start_loc[s+1]-1 at positions start_pos[s] + i;
    after this step its context holds seq_lens[s] tokens. slot_mapping[t] is where token t's K/V go.
    """

    slot_mapping: torch.Tensor  # [T] long
    block_tables: torch.Tensor  # [S, max_blocks] long, padded with 0 (the null block)
    block_tables_list: list[list[int]]
    query_start_loc: list[int]
    start_pos: list[int]
    seq_lens: list[int]
    block_size: int
    sliding_window: int | None
    fast_plan: FastPlan | None = None

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_pos: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sliding_window: int | None,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        num_seqs = len(query_lens)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        seq_lens = [p + n for p, n in zip(start_pos, query_lens)]
        width = max((len(t) for t in block_tables), default=1) or 1
        bt = torch.zeros((num_seqs, width), dtype=torch.long)
        for s, table in enumerate(block_tables):
            if table:
                bt[s, : len(table)] = torch.tensor(table, dtype=torch.long)
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(query_lens, dtype=torch.long))
        offsets = torch.arange(qsl[-1]) - torch.tensor(qsl[:-1], dtype=torch.long)[seq_idx]
        positions = torch.tensor(start_pos, dtype=torch.long)[seq_idx] + offsets
        slots = bt[seq_idx, positions // block_size] * block_size + positions % block_size
        return cls(
            slot_mapping=slots.to(device),
            block_tables=bt.to(device),
            block_tables_list=[list(t) for t in block_tables],
            query_start_loc=qsl,
            start_pos=list(start_pos),
            seq_lens=seq_lens,
            block_size=block_size,
            sliding_window=sliding_window,
        )

    def plan(self) -> FastPlan:
        if self.fast_plan is None:
            self.fast_plan = _make_plan(self)
        return self.fast_plan


def _key_slots(bt_row: torch.Tensor, key_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    return bt_row[key_pos // block_size] * block_size + key_pos % block_size


def _make_plan(m: AttentionMetadata) -> FastPlan:
    device = m.slot_mapping.device
    bt = m.block_tables.cpu()
    window = m.sliding_window
    decodes = [s for s in range(len(m.seq_lens)) if m.query_start_loc[s + 1] - m.query_start_loc[s] == 1]
    prefills: list[PrefillPlan] = []
    for s in range(len(m.seq_lens)):
        q_lo, q_hi = m.query_start_loc[s], m.query_start_loc[s + 1]
        n = q_hi - q_lo
        if n <= 1:
            continue
        start, ctx = m.start_pos[s], m.seq_lens[s]
        if start == 0 and (window is None or n <= window):
            prefills.append(PrefillPlan(q_lo, q_hi, None, None))
            continue
        lo = max(0, start - window + 1) if window is not None else 0
        key_pos = torch.arange(lo, ctx)
        q_pos = torch.arange(start, ctx)
        mask = key_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask &= (q_pos[:, None] - key_pos[None, :]) < window
        slots = _key_slots(bt[s], key_pos, m.block_size)
        prefills.append(PrefillPlan(q_lo, q_hi, slots.to(device), mask.to(device)))
    if not decodes:
        return FastPlan(None, None, None, False, prefills)
    ctx = torch.tensor([m.seq_lens[s] for s in decodes], dtype=torch.long)
    lo = (ctx - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)
    length = int((ctx - lo).max())
    key_pos = lo[:, None] + torch.arange(length)[None, :]
    valid = key_pos < ctx[:, None]
    key_pos = torch.where(valid, key_pos, torch.zeros_like(key_pos))
    rows = bt[torch.tensor(decodes)]
    slots = torch.gather(rows, 1, key_pos // m.block_size) * m.block_size + key_pos % m.block_size
    token_idx = torch.tensor([m.query_start_loc[s] for s in decodes], dtype=torch.long)
    is_all = len(decodes) == len(m.seq_lens) and m.query_start_loc[-1] == len(decodes)
    return FastPlan(token_idx.to(device), slots.to(device), valid[:, None, None, :].to(device), is_all, prefills)
