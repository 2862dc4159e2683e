"""Llama family (Llama 2/3, Mistral, SmolLM) and the shared decoder that Qwen2/Qwen3 specialise.

Flattened-token forward: input_ids [T], positions [T] -> hidden [T, H]; attention reads ctx for the paged
cache. q/k/v and gate/up are fused into one matmul each; load_weights maps HF names onto the fused shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.kernels.quant_format import QuantizedTensor
from tokenmill.kv_cache_spec import KVCacheGroupSpec
from tokenmill.layers.activation import get_act_and_mul
from tokenmill.layers.attention import Attention, ForwardContext
from tokenmill.layers.linear import FusedLinear, copy_weight
from tokenmill.layers.lm_head import LMHead
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.quantized import load_quantized
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters

# HF checkpoint name fragment -> (our fused module name, shard)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}


def layer_sliding_windows(config: Any) -> list[int | None]:
    """Per-layer window: from `layer_types` when present, else the config-wide sliding_window (Mistral)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" and window else None for t in types]
    return [window] * n


def kv_groups_from_windows(windows: list[int | None]) -> list[KVCacheGroupSpec]:
    """One KV cache group per distinct window, in order of first appearance."""
    groups: dict[int | None, list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w, []).append(i)
    return [KVCacheGroupSpec(layer_ids=ids, sliding_window=w) for w, ids in groups.items()]


class DecoderAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None,
                 bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.rotary = rotary
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(layer_id, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        norms = (self.q_norm, self.k_norm) if self.qk_norm else ()
        q, k, v = self.rotary.rotate_qkv(positions, self.qkv_proj(x), self.num_heads, self.num_kv_heads, *norms)
        return self.o_proj(self.attn(q, k, v, ctx))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, {"gate": intermediate, "up": intermediate}, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = get_act_and_mul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None,
                 attn_bias: bool, qk_norm: bool):
        super().__init__()
        self.self_attn = DecoderAttention(config, layer_id, rotary, sliding_window, attn_bias, qk_norm)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, getattr(config, "hidden_act", "silu"),
                            bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_layers(decoder: nn.Module, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """x through decoder.layers: in one native call when decoder.fused_layers (layers/decode_step.py, set by the
    model runner) covers the step, else layer by layer."""
    fused = decoder.fused_layers
    out = fused(x, positions, ctx) if fused is not None else None
    if out is not None:
        return out
    for layer in decoder.layers:
        x = layer(positions, x, ctx)
    return x


class DecoderModel(nn.Module):
    def __init__(self, config: Any, attn_bias: bool, qk_norm: bool):
        super().__init__()
        self.fused_layers = None  # see run_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))
        self.windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, self.windows[i], attn_bias, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.norm(run_layers(self, self.embed_tokens(input_ids), positions, ctx))


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM. Subclasses set ATTN_BIAS / QK_NORM (Qwen2: bias, Qwen3: q/k RMSNorm)."""

    ATTN_BIAS: bool | None = None  # None: config.attention_bias
    QK_NORM = False

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        bias = self.ATTN_BIAS if self.ATTN_BIAS is not None else bool(getattr(config, "attention_bias", False))
        self.model = DecoderModel(config, bias, self.QK_NORM)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        tied = self.model.embed_tokens if self.tie_word_embeddings else None
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> float32 logits [T, V]; `out` is a buffer they may be written into (see LMHead)."""
        return self.lm_head(hidden, out=out)

    def kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return kv_groups_from_windows(self.model.windows)

    def kv_layer_shapes(self) -> list[tuple[int, int]]:
        """(num_kv_heads, head_dim) of every attention layer, indexed by layer id."""
        return [(l.self_attn.num_kv_heads, l.self_attn.head_dim) for l in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (fused) parameters; returns the names of parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: some checkpoints store a copy of the embeddings
            fused = next((frag for frag in _STACKED if f".{frag}." in name), None)
            if fused is not None:
                target, shard = _STACKED[fused]
                pname = name.replace(fused, target)
                module = self.get_submodule(pname.rsplit(".", 1)[0])
                module.load_shard(shard, tensor, is_bias=name.endswith(".bias"))
                loaded.add(f"{pname}#{shard}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            if isinstance(tensor, QuantizedTensor):  # GGUF blocks kept as stored (layers/quantized.py)
                load_quantized(self.get_submodule(name.rsplit(".", 1)[0]), tensor, params[name])
            else:
                copy_weight(params[name], tensor, name)
            loaded.add(name)
        return loaded

    def expected_weights(self) -> set[str]:
        """Names load_weights must report for a complete checkpoint (fused shards as name#shard)."""
        names: set[str] = set()
        for pname, _ in self.named_parameters():
            module = self.get_submodule(pname.rsplit(".", 1)[0])
            if isinstance(module, FusedLinear):
                names.update(f"{pname}#{s}" for s in module.shard_offsets)
            else:
                names.add(pname)
        return names


class MistralForCausalLM(LlamaForCausalLM):
    pass
