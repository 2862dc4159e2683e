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
    key_blocks: torch.Tensor  # [nb] block ids holding the visible keys
    mask: torch.Tensor  # [n, nb * block_size] additive float mask (0 / -inf)


@dataclass(slots=True)
class FastPlan:
    """Gather indices and masks shared by every layer of a group for one step.

    K/V are gathered whole blocks at a time (block_size contiguous rows per index) rather than per slot.
    """

    decode_token_idx: torch.Tensor | None  # [B] flat token index of each single-token sequence
    decode_blocks: torch.Tensor | None  # [B, nb] block ids (padding and out-of-window entries masked)
    decode_mask: torch.Tensor | None  # [B, 1, 1, nb * block_size] additive float mask
    decode_is_all: bool  # every token of the step is a decode, in order: skip the scatter
    # For the native decode kernel: blocks[b, 0] starts at position decode_first_pos[b]; sequence b sees
    # positions decode_lo[b] <= p < decode_ctx[b]. Host int64 tensors [B] (None without decodes).
    decode_first_pos: torch.Tensor | None = None
    decode_lo: torch.Tensor | None = None
    decode_ctx: torch.Tensor | None = None
    prefills: list[PrefillPlan] = field(default_factory=list)  # chunks that read earlier context
    # Chunks starting at position 0 (no window cut), grouped by length: one batched causal SDPA per group
    # (one call per sequence is several times slower on CPU). Each entry: (first token indices [S], n).
    fresh_groups: list[tuple[list[int], torch.Tensor, int, bool]] = field(default_factory=list)  # (starts, starts on device, n, contiguous)


@dataclass(slots=True)
class AttentionMetadata:
    """Flattened batch layout for one KV cache group.

    Sequence s owns flat tokens query_start_loc[s] .. query_start_loc[s+1]-1 at positions start_pos[s] + i;
    after this step its context holds seq_lens[s] tokens. slot_mapping[t] is where token t's K/V go.
    """

    slot_mapping: torch.Tensor  # [T] long
    block_tables: torch.Tensor  # [S, max_blocks] long, padded with 0 (the null block), on the host
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
            block_tables=bt,
            block_tables_list=[list(t) for t in block_tables],
            query_start_loc=qsl,
            start_pos=list(start_pos),
            seq_lens=seq_lens,
            block_size=block_size,
            sliding_window=sliding_window,
        )

    def plan(self, dtype: torch.dtype) -> FastPlan:
        if self.fast_plan is None:
            self.fast_plan = _make_plan(self, dtype)
        return self.fast_plan


def _make_plan(m: AttentionMetadata, dtype: torch.dtype) -> FastPlan:
    device = m.slot_mapping.device
    bt = m.block_tables  # host copy: planning never waits on the device
    bs = m.block_size
    window = m.sliding_window
    neg_inf = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    decodes = [s for s in range(len(m.seq_lens)) if m.query_start_loc[s + 1] - m.query_start_loc[s] == 1]
    prefills: list[PrefillPlan] = []
    fresh: dict[int, list[int]] = {}
    for s in range(len(m.seq_lens)):
        q_lo, q_hi = m.query_start_loc[s], m.query_start_loc[s + 1]
        n = q_hi - q_lo
        if n <= 1:
            continue
        start, ctx = m.start_pos[s], m.seq_lens[s]
        if start == 0 and (window is None or n <= window):
            fresh.setdefault(n, []).append(q_lo)
            continue
        first_block = (max(0, start - window + 1) if window is not None else 0) // bs
        last_block = (ctx - 1) // bs
        key_pos = torch.arange(first_block * bs, (last_block + 1) * bs)
        q_pos = torch.arange(start, ctx)
        visible = key_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= (q_pos[:, None] - key_pos[None, :]) < window
        blocks = bt[s, first_block : last_block + 1]
        prefills.append(PrefillPlan(q_lo, q_hi, blocks.to(device), torch.where(visible, zero, neg_inf).to(device)))
    groups = []
    for n, starts in fresh.items():
        contiguous = all(b - a == n for a, b in zip(starts, starts[1:]))
        groups.append((starts, torch.tensor(starts, dtype=torch.long).to(device), n, contiguous))
    if not decodes:
        return FastPlan(None, None, None, False, prefills=prefills, fresh_groups=groups)
    rows = torch.tensor(decodes)
    ctx = torch.tensor([m.seq_lens[s] for s in decodes], dtype=torch.long)
    lo = (ctx - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)
    first_block = lo // bs
    num_blocks = int(((ctx - 1) // bs - first_block).max()) + 1
    block_idx = first_block[:, None] + torch.arange(num_blocks)[None, :]  # [B, nb]
    in_table = block_idx < bt.shape[1]
    blocks = torch.where(in_table, bt[rows[:, None], block_idx.clamp(max=bt.shape[1] - 1)], torch.zeros_like(block_idx))
    key_pos = (block_idx[:, :, None] * bs + torch.arange(bs)[None, None, :]).reshape(len(decodes), -1)
    visible = (key_pos < ctx[:, None]) & (key_pos >= lo[:, None])
    mask = torch.where(visible, zero, neg_inf)[:, None, None, :]
    token_idx = torch.tensor([m.query_start_loc[s] for s in decodes], dtype=torch.long)
    is_all = len(decodes) == len(m.seq_lens) and m.query_start_loc[-1] == len(decodes)
    return FastPlan(token_idx.to(device), blocks.to(device), mask.to(device), is_all, first_block * bs, lo, ctx,
                    prefills=prefills, fresh_groups=groups)
