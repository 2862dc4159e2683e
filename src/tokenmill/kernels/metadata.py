"""Per-step attention metadata, one per KV cache group (layers sharing a block table).

Built once per step by the model runner and shared by every layer of the group. The fast path's gather
indices and masks are derived lazily on first use and cached here, so 30 layers pay for them once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class PrefillPlan:
    """One sequence with more than one query token this step."""

    q_lo: int
    q_hi: int
    key_blocks: torch.Tensor  # [nb] block ids holding the visible keys
    mask: torch.Tensor  # [n, nb * block_size] additive float mask (0 / -inf)


# A chunk of at most this many queries that reads earlier context joins the decode batch (speculative
# decoding verifies 1 + k tokens per sequence): one pass over each sequence's K/V for all its queries, where
# the per-chunk prefill path gathers the blocks and runs one SDPA call per sequence.
MAX_DECODE_QUERIES = 16


@dataclass(slots=True)
class FastPlan:
    """Gather indices and masks shared by every layer of a group for one step.

    K/V are gathered whole blocks at a time (block_size contiguous rows per index) rather than per slot.
    The decode batch: B sequences with 1..MAX_DECODE_QUERIES queries each (T rows in all, sequence by
    sequence), every one but a one-token prompt reading earlier context.
    """

    decode_token_idx: torch.Tensor | None  # [T] flat token index of each decode row
    decode_blocks: torch.Tensor | None  # [B, nb] block ids (padding and out-of-window entries masked)
    decode_mask: torch.Tensor | None  # [B, 1, Q, nb * block_size] additive float mask (Q: most queries of a seq)
    decode_is_all: bool  # every token of the step is a decode, in order: skip the scatter
    # For the native decode kernel: blocks[b, 0] starts at position decode_first_pos[b] ([B]); row r sees
    # positions decode_lo[r] <= p < decode_ctx[r] ([T]). Host int64 tensors (None without decodes).
    decode_first_pos: torch.Tensor | None = None
    decode_lo: torch.Tensor | None = None
    decode_ctx: torch.Tensor | None = None
    # Only when some sequence has several queries (else None: one row per sequence, T = B):
    decode_q_start: torch.Tensor | None = None  # host [B + 1]: sequence b owns rows q_start[b] .. q_start[b+1]-1
    decode_pad_rows: torch.Tensor | None = None  # [B * Q] row per padded query slot (short seqs repeat their last)
    decode_unpad: torch.Tensor | None = None  # [T] padded slot (b * Q + j) of each row
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
    qsl = m.query_start_loc
    query_lens = [qsl[s + 1] - qsl[s] for s in range(len(m.seq_lens))]
    decodes = [s for s, n in enumerate(query_lens) if n == 1 or (1 < n <= MAX_DECODE_QUERIES and m.start_pos[s] > 0)]
    prefills: list[PrefillPlan] = []
    fresh: dict[int, list[int]] = {}
    in_decodes = set(decodes)
    for s in range(len(m.seq_lens)):
        q_lo, q_hi = qsl[s], qsl[s + 1]
        n = q_hi - q_lo
        if n == 0 or s in in_decodes:
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
        contiguous = all(b - a == n for a, b in itertools.pairwise(starts))
        groups.append((starts, torch.tensor(starts, dtype=torch.long).to(device), n, contiguous))
    if not decodes:
        return FastPlan(None, None, None, False, prefills=prefills, fresh_groups=groups)
    plan = FastPlan(None, None, None, len(decodes) == len(m.seq_lens), prefills=prefills, fresh_groups=groups)
    _plan_decodes(plan, m, decodes, [query_lens[s] for s in decodes], zero, neg_inf)
    return plan


def _plan_decodes(plan: FastPlan, m: AttentionMetadata, decodes: list[int], nq: list[int], zero: torch.Tensor,
                  neg_inf: torch.Tensor) -> None:
    """Fill the decode-batch fields of plan: sequences `decodes`, nq[i] queries each (the last of the context)."""
    device = m.slot_mapping.device
    bt, bs, window = m.block_tables, m.block_size, m.sliding_window
    rows = torch.tensor(decodes)
    ctx = torch.tensor([m.seq_lens[s] for s in decodes], dtype=torch.long)
    num_q = max(nq)
    n = torch.tensor(nq, dtype=torch.long) if num_q > 1 else None
    first_q = ctx - 1 if n is None else ctx - n  # position of each sequence's first query
    # The first query sees the most of the past: its window start bounds the blocks every query needs.
    lo = (first_q + 1 - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)
    first_block = lo // bs
    num_blocks = int(((ctx - 1) // bs - first_block).max()) + 1
    block_idx = first_block[:, None] + torch.arange(num_blocks)[None, :]  # [B, nb]
    in_table = block_idx < bt.shape[1]
    blocks = torch.where(in_table, bt[rows[:, None], block_idx.clamp(max=bt.shape[1] - 1)], torch.zeros_like(block_idx))
    key_pos = (block_idx[:, :, None] * bs + torch.arange(bs)[None, None, :]).reshape(len(decodes), 1, -1)
    starts = torch.tensor([m.query_start_loc[s] for s in decodes], dtype=torch.long)
    if n is None:
        q_pos = first_q[:, None]  # [B, 1]
        token_idx, row_lo, row_ctx = starts, lo, ctx
    else:
        # Padded slot j of sequence b holds query min(j, n[b] - 1): padding repeats a real query (a fully
        # masked row would make SDPA return NaN) and is dropped again by decode_unpad.
        j = torch.minimum(torch.arange(num_q)[None, :], n[:, None] - 1)  # [B, Q]
        q_pos = first_q[:, None] + j
        q_start = torch.zeros(len(decodes) + 1, dtype=torch.long)
        torch.cumsum(n, 0, out=q_start[1:])
        seq_of_row = torch.repeat_interleave(torch.arange(len(decodes)), n)
        j_row = torch.arange(int(q_start[-1])) - q_start[:-1][seq_of_row]
        row_pos = first_q[seq_of_row] + j_row
        token_idx = starts[seq_of_row] + j_row
        row_ctx = row_pos + 1
        row_lo = (row_ctx - window).clamp(min=0) if window is not None else torch.zeros_like(row_ctx)
        plan.decode_q_start = q_start
        plan.decode_pad_rows = (q_start[:-1, None] + j).reshape(-1).to(device)
        plan.decode_unpad = (seq_of_row * num_q + j_row).to(device)
    visible = key_pos <= q_pos[:, :, None]  # [B, Q, K]
    if window is not None:
        visible &= q_pos[:, :, None] - key_pos < window
    plan.decode_token_idx = token_idx.to(device)
    plan.decode_blocks = blocks.to(device)
    plan.decode_mask = torch.where(visible, zero, neg_inf)[:, None].to(device)
    plan.decode_first_pos, plan.decode_lo, plan.decode_ctx = first_block * bs, row_lo, row_ctx
