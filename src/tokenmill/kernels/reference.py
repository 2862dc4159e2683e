"""Plain-PyTorch paged attention: the oracle every faster path is tested against.

Loops over sequences and over context positions, reads K/V through the block table one slot at a time and
uses a naive softmax. Slow and obviously correct; do not optimise it.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new K/V [T, Hkv, D] at flat slots (block_id * block_size + offset) of [N, B, Hkv, D] caches."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_reference(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, B, Hkv, D], already holding this step's K/V
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Return [T, Hq, D]. Query token i of seq s sits at position start_pos[s] + i and sees keys at
    positions p with p <= its position and (no window or position - p < window)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    tables = meta.block_tables_list
    for s in range(len(meta.seq_lens)):
        q_lo, q_hi = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        ctx_len = meta.seq_lens[s]
        keys = torch.stack([k_cache[tables[s][p // block_size], p % block_size] for p in range(ctx_len)])
        vals = torch.stack([v_cache[tables[s][p // block_size], p % block_size] for p in range(ctx_len)])
        keys = keys.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        vals = vals.float().repeat_interleave(group, dim=1)
        for i in range(q_hi - q_lo):
            pos = meta.start_pos[s] + i
            scores = torch.einsum("hd,lhd->hl", q[q_lo + i].float(), keys) * scale
            key_pos = torch.arange(ctx_len)
            visible = key_pos <= pos
            if sliding_window is not None:
                visible &= pos - key_pos < sliding_window
            scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out[q_lo + i] = torch.einsum("hl,lhd->hd", weights, vals).to(q.dtype)
    return out
