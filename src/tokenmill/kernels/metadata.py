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
    # [B, 1, Q, nb * block_size] additive float mask (Q: most queries of a seq) for the PyTorch decode path: made
    # on first use from mask_inputs (see `mask`; the native kernel reads decode_lo / decode_ctx instead).
    decode_mask: torch.Tensor | None
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
    mask_inputs: tuple | None = None

    def mask(self) -> torch.Tensor:
        """decode_mask, made on first use."""
        if self.decode_mask is None:
            self.decode_mask = _decode_mask(*self.mask_inputs)
        return self.decode_mask


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
        # Plain lists, then one tensor each: a decode step has a few tokens, and ~20 small tensor ops per group
        # cost more than the whole list work (host side; only slot_mapping goes to the device).
        bt = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long).view(num_seqs, width)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for table, p0, n in zip(block_tables, start_pos, query_lens) for p in range(p0, p0 + n)],
                             dtype=torch.long)
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
    """Fill the decode-batch fields of plan: sequences `decodes`, nq[i] queries each (the last of the context).
    Plain lists, then one tensor per field: decode batches are small, and tensor ops cost ~2 us each."""
    device = m.slot_mapping.device
    bs, window = m.block_size, m.sliding_window
    ctx = [m.seq_lens[s] for s in decodes]
    first_q = [c - n for c, n in zip(ctx, nq)]  # position of each sequence's first query
    # The first query sees the most of the past: its window start bounds the blocks every query needs.
    lo = [max(0, f + 1 - window) if window is not None else 0 for f in first_q]
    first_block = [x // bs for x in lo]
    num_blocks = max((c - 1) // bs - f for c, f in zip(ctx, first_block)) + 1
    tables = [m.block_tables_list[s] for s in decodes]
    blocks = [[t[j] if j < len(t) else 0 for j in range(f, f + num_blocks)] for t, f in zip(tables, first_block)]
    starts = [m.query_start_loc[s] for s in decodes]
    num_q = max(nq)
    # Query slot j of sequence b sits at first_q[b] + min(j, nq[b] - 1): padding repeats a real query (a fully
    # masked row would make SDPA return NaN) and is dropped again by decode_unpad.
    q_pos = [[f + min(j, n - 1) for j in range(num_q)] for f, n in zip(first_q, nq)]
    if num_q == 1:
        token_idx, row_lo, row_ctx = starts, lo, ctx
    else:
        q_start = list(itertools.accumulate(nq, initial=0))
        token_idx = [st + j for st, n in zip(starts, nq) for j in range(n)]
        row_ctx = [f + j + 1 for f, n in zip(first_q, nq) for j in range(n)]
        row_lo = [max(0, c - window) if window is not None else 0 for c in row_ctx]
        plan.decode_q_start = torch.tensor(q_start, dtype=torch.long)
        plan.decode_pad_rows = torch.tensor([q0 + min(j, n - 1) for q0, n in zip(q_start, nq) for j in range(num_q)],
                                            dtype=torch.long).to(device)
        plan.decode_unpad = torch.tensor([b * num_q + j for b, n in enumerate(nq) for j in range(n)],
                                         dtype=torch.long).to(device)
    plan.decode_token_idx = torch.tensor(token_idx, dtype=torch.long).to(device)
    plan.decode_blocks = torch.tensor(blocks, dtype=torch.long).view(len(decodes), num_blocks).to(device)
    plan.decode_first_pos = torch.tensor([f * bs for f in first_block], dtype=torch.long)
    plan.decode_lo = torch.tensor(row_lo, dtype=torch.long)
    plan.decode_ctx = torch.tensor(row_ctx, dtype=torch.long)
    plan.mask_inputs = (first_block, num_blocks, q_pos, bs, window, zero, neg_inf, device)


def _decode_mask(first_block: list[int], num_blocks: int, q_pos: list[list[int]], bs: int, window: int | None,
                 zero: torch.Tensor, neg_inf: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, 1, Q, nb * bs] additive mask over the gathered blocks of each sequence (FastPlan.decode_mask)."""
    fb = torch.tensor(first_block, dtype=torch.long)
    key_pos = ((fb[:, None] + torch.arange(num_blocks)[None, :])[:, :, None] * bs
               + torch.arange(bs)[None, None, :]).reshape(len(first_block), 1, -1)
    qp = torch.tensor(q_pos, dtype=torch.long)[:, :, None]  # [B, Q, 1]
    visible = key_pos <= qp  # [B, Q, K]
    if window is not None:
        visible &= qp - key_pos < window
    return torch.where(visible, zero, neg_inf)[:, None].to(device)
