"""Attention over the paged KV cache, and the per-step context every attention layer reads.

Models call `Attention(q, k, v, ctx)` with flattened tokens of a mixed batch (prefill chunks and decodes).
The layer writes this step's K/V at the group's slot_mapping, then attends through the group's block
tables with the chosen backend ("fast" by default, "reference" as the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.kernels.metadata import AttentionMetadata
from tokenmill.kernels.paged_attention import paged_attention
from tokenmill.kernels.reference import paged_attention_reference, write_kv

BACKENDS = ("fast", "reference")


@dataclass(slots=True)
class ForwardContext:
    """What one forward step needs beyond token ids and positions.

    kv_caches[layer_id] = (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim] of the
    layer's group; layer_to_group[layer_id] indexes attn_metadata.
    """

    attn_metadata: list[AttentionMetadata]
    layer_to_group: list[int]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    backend: str = "fast"
    cpu_kernels: CpuKernels | None = None  # native decode attention (CPU, float32), when built


class Attention(nn.Module):
    """Paged attention for one layer. sliding_window=None means full attention."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} must be a multiple of num_key_value_heads={num_kv_heads}")
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_id]
        meta = ctx.attn_metadata[ctx.layer_to_group[self.layer_id]]
        fast = ctx.backend != "reference"
        if not (fast and ctx.cpu_kernels is not None and ctx.cpu_kernels.decode_ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)):
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        if not fast:
            out = paged_attention_reference(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        else:
            out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, ctx.cpu_kernels)
        return out.reshape(t, self.num_heads * self.head_dim)
