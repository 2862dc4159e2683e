"""Fast paged attention in PyTorch: batched decodes, one SDPA per prefill chunk.

Decodes (sequences with one query token) gather their K/V whole blocks at a time into a padded
[B, nb * block_size, Hkv, D] batch and attend with one masked SDPA call over strided views (no transpose
copies; GQA handled by SDPA). A prefill chunk that starts at position 0 attends to its own fresh
K/V with a causal SDPA; a later chunk gathers its visible blocks with an explicit mask.
Checked against kernels/reference.py.
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
    plan = meta.plan(q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads

    dec_out = None
    if plan.decode_token_idx is not None:
        qd = q if plan.decode_is_all else q.index_select(0, plan.decode_token_idx)
        bsz = qd.shape[0]
        keys = _gather_blocks(k_cache, plan.decode_blocks).view(bsz, -1, num_kv_heads, head_dim)  # [B, L, Hkv, D]
        vals = _gather_blocks(v_cache, plan.decode_blocks).view(bsz, -1, num_kv_heads, head_dim)
        # SDPA reads the strided [B, Hkv, L, D] views directly (no transpose copies) and handles GQA.
        dec_out = F.scaled_dot_product_attention(
            qd.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=plan.decode_mask,
            scale=scale, enable_gqa=group > 1,
        ).view(bsz, num_heads, head_dim)
        if plan.decode_is_all:
            return dec_out

    out = torch.empty_like(q)
    if dec_out is not None:
        out.index_copy_(0, plan.decode_token_idx, dec_out)
    for starts_list, starts, n, contiguous in plan.fresh_groups:
        if contiguous:
            lo = starts_list[0]
            sl = slice(lo, lo + n * len(starts_list))
            qs, ks, vs = q[sl], k[sl], v[sl]
        else:
            idx = (starts[:, None] + torch.arange(n, device=q.device)[None, :]).reshape(-1)
            qs, ks, vs = q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx)
        o = F.scaled_dot_product_attention(
            qs.view(-1, n, num_heads, head_dim).transpose(1, 2),
            _repeat_kv(ks.view(-1, n, num_kv_heads, head_dim).transpose(1, 2), group),
            _repeat_kv(vs.view(-1, n, num_kv_heads, head_dim).transpose(1, 2), group),
            is_causal=True, scale=scale,
        ).transpose(1, 2).reshape(-1, num_heads, head_dim)
        if contiguous:
            out[sl] = o
        else:
            out.index_copy_(0, idx, o)
    for p in plan.prefills:
        qs = q[p.q_lo : p.q_hi].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ks = _gather_blocks(k_cache, p.key_blocks).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        vs = _gather_blocks(v_cache, p.key_blocks).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=scale, enable_gqa=group > 1)
        out[p.q_lo : p.q_hi] = o.squeeze(0).transpose(0, 1)
    return out


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[S, Hkv, n, D] -> [S, Hkv * group, n, D]. For fresh prefills an explicit copy makes SDPA faster on CPU
    than its enable_gqa path (the copy is small next to the attention itself)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows of whole blocks: index_select on a 2-D view copies each block as one contiguous chunk."""
    flat = cache.view(cache.shape[0], -1).index_select(0, blocks.reshape(-1))
    return flat.view(*blocks.shape, *cache.shape[1:])
