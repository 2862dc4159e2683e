"""Fast paged attention in PyTorch: batched decodes, one SDPA per prefill chunk.

Decodes (sequences with one query token) are gathered into a padded [B, Hkv, L, D] batch and attended with
one masked matmul-softmax-matmul, grouping query heads per KV head so GQA needs no K/V copies. A prefill
chunk that starts at position 0 attends to its own fresh K/V with a causal SDPA; a later chunk gathers its
visible context from the cache with an explicit mask. Checked against kernels/reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.metadata import AttentionMetadata


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D] this step's keys (already written to the cache)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [N, B, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    plan = meta.plan()
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)

    dec_out = None
    if plan.decode_token_idx is not None:
        qd = q if plan.decode_is_all else q.index_select(0, plan.decode_token_idx)
        bsz = qd.shape[0]
        qd = qd.view(bsz, num_kv_heads, group, head_dim)
        keys = k_flat[plan.decode_slots].to(q.dtype).permute(0, 2, 3, 1)  # [B, Hkv, D, L]
        vals = v_flat[plan.decode_slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
        scores = torch.matmul(qd, keys).mul_(scale)  # [B, Hkv, G, L]
        scores.masked_fill_(~plan.decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        dec_out = torch.matmul(probs, vals).reshape(bsz, num_heads, head_dim)
        if plan.decode_is_all:
            return dec_out

    out = torch.empty_like(q)
    if dec_out is not None:
        out.index_copy_(0, plan.decode_token_idx, dec_out)
    for p in plan.prefills:
        qs = q[p.q_lo : p.q_hi].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if p.key_slots is None:
            ks = k[p.q_lo : p.q_hi].transpose(0, 1).unsqueeze(0)
            vs = v[p.q_lo : p.q_hi].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            ks = k_flat[p.key_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            vs = v_flat[p.key_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=scale, enable_gqa=group > 1)
        out[p.q_lo : p.q_hi] = o.squeeze(0).transpose(0, 1)
    return out
