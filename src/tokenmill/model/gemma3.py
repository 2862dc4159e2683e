"""Gemma 3 text decoder (Gemma3ForCausalLM / gemma3_text) over the paged KV cache.

Differences from Llama, each mirrored from transformers' reference so fp32 outputs match token for token:
- layers alternate sliding-window (local) and full (global) attention per config.layer_types; each kind
  has its own RoPE base (rope_local_base_freq = 10k for local, rope_theta = 1M for global);
- q and k get a per-head RMSNorm before RoPE; every RMSNorm scales by (1 + weight), in float32;
- four norms per layer: input, post-attention, pre-feedforward, post-feedforward (the residual adds the
  *normed* sublayer output);
- GELU-tanh gated MLP; embeddings multiplied by sqrt(hidden_size) rounded to the model dtype;
- attention scale query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- the LM head is tied to the embeddings; optional final logit soft-capping.
Sliding-window layers form their own KV cache group, so the engine can release blocks that fall out of
the window; the attention layer masks keys older than the window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.attention import Attention, ForwardContext
from tokenmill.layers.linear import FusedLinear
from tokenmill.layers.lm_head import LMHead
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.model.llama import (
    GatedMLP,
    LlamaForCausalLM,
    layer_sliding_windows,
    run_layers,
)


def gemma_rope_parameters(config: Any) -> tuple[dict, dict]:
    """(global, local) RoPE parameters from a transformers v5 (per-layer-type dict) or v4 config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:
        full = dict(params["full_attention"])
        local = dict(params.get("sliding_attention") or {"rope_theta": 10000.0})
    else:
        full = dict(getattr(config, "rope_scaling", None) or {})
        full["rope_theta"] = getattr(config, "rope_theta", 1_000_000.0)
        local = {"rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    for p in (full, local):
        p["rope_type"] = p.get("rope_type", p.get("type", "default")) or "default"
    return full, local


def _gemma_norm(size: int, eps: float) -> RMSNorm:
    return RMSNorm(size, eps, weight_offset=1.0, gemma_style=True)


class Gemma3Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = FusedLinear(config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=bias)
        self.q_norm = _gemma_norm(self.head_dim, config.rms_norm_eps)
        self.k_norm = _gemma_norm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        scale = float(config.query_pre_attn_scalar) ** -0.5
        self.attn = Attention(layer_id, self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.rotary.rotate_qkv(positions, self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.q_norm,
                                         self.k_norm)
        return self.o_proj(self.attn(q, k, v, ctx))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_id, rotary, sliding_window)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size,
                            getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh")
        self.input_layernorm = _gemma_norm(config.hidden_size, eps)
        self.post_attention_layernorm = _gemma_norm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = _gemma_norm(config.hidden_size, eps)
        self.post_feedforward_layernorm = _gemma_norm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, h = self.post_attention_layernorm.add_to(x, self.self_attn(positions, self.input_layernorm(x), ctx),
                                                    self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm.add_to(x, self.mlp(h))[0]


class Gemma3Model(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.fused_layers = None  # see model/llama.py run_layers
        # An explicit weight skips reset_parameters: its normal_() over 168M elements costs seconds even on
        # the meta device that models are built on.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.embed_scale = float(config.hidden_size) ** 0.5
        full, local = gemma_rope_parameters(config)
        max_pos = config.max_position_embeddings
        # Built lazily by RotaryEmbedding: a 32k-position table is only materialised on first use.
        self.rotary_global = RotaryEmbedding(config.head_dim, max_pos, full)
        self.rotary_local = RotaryEmbedding(config.head_dim, max_pos, local)
        self.windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, self.rotary_local if self.windows[i] else self.rotary_global, self.windows[i])
            for i in range(config.num_hidden_layers)
        )
        self.norm = _gemma_norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Like transformers: the scale is rounded to the weight dtype first (sqrt(640) in bf16 differs).
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return self.norm(run_layers(self, x, positions, ctx))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text LM; weight loading, KV groups and layer shapes come from the shared decoder base."""

    def __init__(self, config: Any):
        nn.Module.__init__(self)
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attn_logit_softcapping: Gemma 3 checkpoints have none; soft-capped attention is unsupported")
        self.config = config
        self.model = Gemma3Model(config)
        self.tie_word_embeddings = True
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied=self.model.embed_tokens)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, out)
        if self.softcap:  # in place: the logits are a fresh tensor or the caller's buffer
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits
