"""The batched LoRA apply: stacked adapter weights per linear layer, one low-rank product per active slot.

Design (measured in benchmarks/lora_apply.py on Gemma 3 270M shapes, 8 adapters of rank 16, against BGMV
and a masked dense product): each slot s holds A[s] [in, W] and B[s] [W, out] (W = shards * max_rank: a
fused qkv / gate_up layer gives each shard its own rank block, so B[s] is block-diagonal and each shard
keeps its own A/B). Two routes, chosen once per step (LoRABatch):
- grouped (several adapters, balanced: e.g. 32 decodes over 8 adapters): the tokens of the slots in use are
  gathered into [slots, per_slot, in] (padded), then one bmm with A[lo:hi] and per shard one bmm with the
  nonzero block of B[lo:hi] and one scatter-add: 2 + 2 * shards ops a layer for any mix (SGMV's shape in
  plain PyTorch; B's off-diagonal zeros are never read: at 8 adapters they were a third of the bytes);
- per slot (one adapter, or a long prefill beside short decodes, where padding would waste work): a loop
  over the ACTIVE slots only (<= max_loras, never over requests): out[rows] += (x[rows] @ A[s]) @ B[s],
  rows a slice when the slot's tokens are contiguous (a single stream, a prefill chunk: one addmm over the
  whole B, zeros included, which costs less than an op per shard), else an index.
Only useful FLOPs (and padding) are done: the masked dense product computes every slot for every token
(8x the work at 8 adapters), BGMV copies each token's B. A step with no adapter skips the layer.
The scatter-add is index_put_(accumulate=True), not index_add_: with 2 threads on a busy CPU, index_add_ of
[30, 256] rows measured ~120 ms (median) against ~0.01 ms for index_put_ (torch 2.13, 2-core host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from tokenmill.lora.adapter import LoRAModuleWeights


@dataclass(slots=True)
class LoRABatch:
    """Per-step routing shared by every wrapped layer of one model: for each slot in use, the rows of its
    tokens (a slice when contiguous, else a long index tensor). Empty segments: no adapter this step."""

    num_tokens: int = 0
    segments: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    # Grouped route (several slots, balanced): slots lo..hi-1 each padded to `per_slot` rows; `gather` lists
    # each padded row's token (padding reads and adds to token 0), `valid` [hi-lo, per_slot, 1] zeroes the
    # padding rows (None: no padding).
    group: tuple[int, int, int, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def active(self) -> bool:
        return bool(self.segments)

    def set(self, seq_slots: Sequence[int], seq_tokens: Sequence[int], device: torch.device) -> None:
        """seq_slots[i]: the slot of sequence i (-1: base model), seq_tokens[i]: its tokens this step."""
        spans: dict[int, list[tuple[int, int]]] = {}
        pos = 0
        for slot, n in zip(seq_slots, seq_tokens):
            if slot >= 0:
                spans.setdefault(slot, []).append((pos, pos + n))
            pos += n
        self.num_tokens = pos
        self.segments = []
        for slot, runs in sorted(spans.items()):
            if all(a[1] == b[0] for a, b in pairwise(runs)):
                self.segments.append((slot, slice(runs[0][0], runs[-1][1])))
            else:
                rows = [t for start, end in runs for t in range(start, end)]
                self.segments.append((slot, torch.tensor(rows, dtype=torch.long, device=device)))
        self.group = self._grouped(spans, device) if len(spans) > 1 else None

    @staticmethod
    def _grouped(spans: dict[int, list[tuple[int, int]]], device: torch.device):
        """The padded [slots, per_slot] layout when padding at most doubles the rows (e.g. 32 decodes over 8
        adapters), else None (a long prefill next to short decodes: the per-slot loop wastes nothing)."""
        rows = {slot: [t for start, end in runs for t in range(start, end)] for slot, runs in spans.items()}
        lo, hi = min(rows), max(rows) + 1
        per_slot = max(len(r) for r in rows.values())
        if (hi - lo) * per_slot > 2 * sum(len(r) for r in rows.values()):
            return None
        gather, valid = [], []
        for slot in range(lo, hi):
            r = rows.get(slot, [])
            gather += r + [0] * (per_slot - len(r))
            valid += [1.0] * len(r) + [0.0] * (per_slot - len(r))
        pad = None if all(valid) else torch.tensor(valid, device=device).view(hi - lo, per_slot, 1)
        return lo, hi, per_slot, torch.tensor(gather, dtype=torch.long, device=device), pad

    def clear(self) -> None:
        self.num_tokens, self.segments, self.group = 0, [], None


@dataclass(frozen=True, slots=True)
class Shard:
    """One HF projection inside a (possibly fused) layer: output rows [offset, offset + size)."""

    target: str
    offset: int
    size: int


class LoRALinear:
    """Wraps a linear layer's prepared forward (dense packed, bf16 panels, quantized blocks: whatever
    prepare_linears_for_cpu installed): output = base(x) + the LoRA delta of each token's slot.
    Invariant: shard j of slot s occupies A[s][:, j*R : j*R + R] and B[s][j*R : j*R + R, shard rows]; unused
    rank rows, other shards' columns and slots whose adapter does not target the shard are zeros."""

    def __init__(self, base: Callable[..., torch.Tensor], shards: list[Shard], in_features: int, out_features: int,
                 max_loras: int, max_rank: int, batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        self.base = base
        self.shards = shards
        self.max_rank = max_rank
        self.width = len(shards) * max_rank
        self.batch = batch
        self.a = torch.zeros(max_loras, in_features, self.width, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, self.width, out_features, dtype=dtype, device=device)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        bt = self.batch
        if not bt.segments:
            return out
        if x.shape[0] != bt.num_tokens:
            raise RuntimeError(f"LoRA batch routes {bt.num_tokens} tokens but the layer got {x.shape[0]}")
        x = x.to(self.a.dtype)
        same = out.dtype == self.b.dtype
        if bt.group is not None:
            return self._grouped(out, x, *bt.group)
        for slot, rows in bt.segments:
            if isinstance(rows, slice):
                self._add_slice(out[rows], torch.mm(x[rows], self.a[slot]), slot, same)
            else:
                delta = torch.mm(torch.mm(x.index_select(0, rows), self.a[slot]), self.b[slot])
                out.index_put_((rows,), delta if same else delta.to(out.dtype), accumulate=True)
        return out

    def _add_slice(self, out: torch.Tensor, h: torch.Tensor, slot: int, same: bool) -> None:
        """out += h @ B[slot] in one product over the whole block-diagonal B: its zeros are a few hundred KB
        (qkv of Gemma 3 270M at rank 16: 245 KB), cheaper to read than one more op per shard costs in dispatch
        (a single stream through an adapter: one addmm instead of three slices and three addmms per layer)."""
        if same:
            out.addmm_(h, self.b[slot])
        else:
            out += torch.mm(h, self.b[slot]).to(out.dtype)

    def _grouped(self, out: torch.Tensor, x: torch.Tensor, lo: int, hi: int, per_slot: int, gather: torch.Tensor,
                 valid: torch.Tensor | None) -> torch.Tensor:
        """All active slots in batched products over their padded token groups (SGMV's shape): one bmm for A,
        then per shard one bmm over B's nonzero block and one scatter-add, for any mix of adapters."""
        h = torch.bmm(x.index_select(0, gather).view(hi - lo, per_slot, -1), self.a[lo:hi])
        if valid is not None:
            h.mul_(valid)  # padding rows (token 0) add zeros
        r = self.max_rank
        for j, shard in enumerate(self.shards):
            cols = slice(shard.offset, shard.offset + shard.size)
            delta = torch.bmm(h[:, :, j * r : (j + 1) * r], self.b[lo:hi, j * r : (j + 1) * r, cols])
            delta = delta.view(gather.shape[0], -1)
            # index_put_ (not index_add_): repeated padding indices, and index_add_ stalls when threaded
            out[:, cols].index_put_((gather,), delta if delta.dtype == out.dtype else delta.to(out.dtype),
                                    accumulate=True)
        return out

    def set_slot(self, slot: int, modules: dict[str, LoRAModuleWeights]) -> None:
        """Write one adapter's A/B for this layer's shards into `slot` (zeros where it has none)."""
        r = self.max_rank
        self.a[slot].zero_()
        self.b[slot].zero_()
        for j, shard in enumerate(self.shards):
            m = modules.get(shard.target)
            if m is not None:
                self.a[slot][:, j * r : j * r + m.rank].copy_(m.a.t())
                self.b[slot][j * r : j * r + m.rank, shard.offset : shard.offset + shard.size].copy_(m.b.t())

    @property
    def num_bytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()
