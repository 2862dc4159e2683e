"""Fast paged attention in PyTorch: batched decodes, one SDPA per prefill chunk.

Decodes (sequences with one query token, or a few after earlier context: speculative verification, see
metadata.MAX_DECODE_QUERIES) run the native CPU kernel when it is loaded (float32 or bf16 caches on CPU: it
reads each visible K/V slot once for all the sequence's queries, straight from the cache blocks); otherwise
they gather their K/V whole blocks at a time into a padded [B, nb * block_size, Hkv, D] batch and attend with
one masked SDPA call over strided views (no transpose copies; GQA handled by SDPA; several queries per
sequence are padded to the longest). A prefill chunk that starts at position 0
attends to its own fresh K/V with a causal SDPA; a later chunk gathers its visible blocks with an explicit
mask.
Checked against kernels/reference.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.kernels.metadata import AttentionMetadata


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D] this step's keys (already written to the cache)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [N, B, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    cpu_kernels: CpuKernels | None = None,
) -> torch.Tensor:
    plan = meta.plan(q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads

    dec_out = None
    if plan.decode_token_idx is not None:
        qd = q if plan.decode_is_all else q.index_select(0, plan.decode_token_idx)
        if cpu_kernels is not None and _native_ok(qd, k_cache):
            dec_out = cpu_kernels.decode_attention(qd.float().contiguous(), k_cache, v_cache, plan.decode_blocks,
                                                   plan.decode_first_pos, plan.decode_lo, plan.decode_ctx,
                                                   scale, plan.decode_q_start).to(q.dtype)
        elif plan.decode_pad_rows is None:
            dec_out = _decode_sdpa(qd, k_cache, v_cache, plan.decode_blocks, plan.mask(), scale)
        else:  # several queries per sequence: pad to [B, Q] query slots, one masked SDPA, drop the padding
            mask = plan.mask()
            bsz, num_q = mask.shape[0], mask.shape[2]
            qp = qd.index_select(0, plan.decode_pad_rows).view(bsz, num_q, num_heads, head_dim)
            dec_out = _decode_sdpa(qp, k_cache, v_cache, plan.decode_blocks, mask, scale)
            dec_out = dec_out.reshape(bsz * num_q, num_heads, head_dim).index_select(0, plan.decode_unpad)
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
        ks = _gather_blocks(k_cache, p.key_blocks, q.dtype).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        vs = _gather_blocks(v_cache, p.key_blocks, q.dtype).view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=scale, enable_gqa=group > 1)
        out[p.q_lo : p.q_hi] = o.squeeze(0).transpose(0, 1)
    return out


def _native_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The native kernel reads float32 or bf16 caches (queries of either dtype, widened to float32)."""
    return (q.device.type == "cpu" and q.dtype in _NATIVE_DTYPES and k_cache.dtype in _NATIVE_DTYPES
            and k_cache.is_contiguous())


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _decode_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                 mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Decodes in PyTorch: gather whole blocks into a padded [B, L, Hkv, D] batch, one masked SDPA.
    q [B, Hq, D] (one query per sequence) -> [B, Hq, D], or q [B, Q, Hq, D] -> [B, Q, Hq, D]."""
    bsz, num_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    num_kv_heads = k_cache.shape[2]
    keys = _gather_blocks(k_cache, blocks, q.dtype).view(bsz, -1, num_kv_heads, head_dim)
    vals = _gather_blocks(v_cache, blocks, q.dtype).view(bsz, -1, num_kv_heads, head_dim)
    # SDPA reads the strided [B, Hkv, L, D] views directly (no transpose copies) and handles GQA.
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2) if q.dim() == 3 else q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=num_heads > num_kv_heads,
    )
    return out.view(bsz, num_heads, head_dim) if q.dim() == 3 else out.transpose(1, 2)


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[S, Hkv, n, D] -> [S, Hkv * group, n, D]. For fresh prefills an explicit copy makes SDPA faster on CPU
    than its enable_gqa path (the copy is small next to the attention itself)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of whole blocks: index_select on a 2-D view copies each block as one contiguous chunk; a cache
    stored in another dtype than the queries (--kv-cache-dtype) is converted on the gathered copy."""
    flat = cache.view(cache.shape[0], -1).index_select(0, blocks.reshape(-1)).to(dtype)
    return flat.view(*blocks.shape, *cache.shape[1:])
