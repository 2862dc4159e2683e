"""A decode step through all decoder layers in one native call (kernels/csrc/decode_step.cpp).

A decode step of a small quantized model is ~10 native calls per layer, and on 2 cores each call's Python
dispatch, checks and thread start-up cost about as much as its arithmetic. `FusedDecodeLayers` describes the
layers once and runs the whole stack in one call for the steps it covers: decodes, also verifying speculative
drafts (1 + k queries per sequence), up to INT8_MAX_ROWS rows in all. Every other step (prefill chunks, more rows,
LoRA, dense or bf16 weights) returns None and runs layer by layer. It covers decoders built from the shared
pieces (model/llama.py's DecoderLayer: Llama, Mistral, Qwen2 without biases, Qwen3; model/gemma3.py's
sandwich-norm layer) whose linears all hold GGUF blocks.
The result equals the layer-by-layer path bit for bit (gelu models) or within float32 rounding (silu, which the
layer path computes with torch): tests/model/test_decode_step.py.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.kernels.decode_step import (
    ACTIVATIONS,
    LayerWeights,
    StepGroup,
    StepShape,
)
from tokenmill.layers.activation import GeluTanhAndMul, SiluAndMul
from tokenmill.layers.attention import ForwardContext
from tokenmill.layers.quantized import INT8_MAX_ROWS, QuantizedLinear

log = logging.getLogger("tokenmill.layers")


def _plan(module: nn.Module):
    """The module's int8 plan when its forward is a bias-free QuantizedLinear (not wrapped, e.g. by LoRA)."""
    f = getattr(module, "forward", None)
    return f.plan if isinstance(f, QuantizedLinear) and f.bias is None else None


def _norm_weight(norm: nn.Module | None) -> torch.Tensor | None:
    return None if norm is None else getattr(norm, "native_weight", None)


def _layer_weights(layer: nn.Module, ropes: list, eps: set) -> LayerWeights | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return None
    plans = [_plan(getattr(attn, "qkv_proj", None)), _plan(getattr(attn, "o_proj", None)),
             _plan(getattr(mlp, "gate_up_proj", None)), _plan(getattr(mlp, "down_proj", None))]
    if any(p is None for p in plans):
        return None
    sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma: norms of both sublayers' outputs too
    norms = [layer.input_layernorm, layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm]
    outs = [layer.post_attention_layernorm, layer.post_feedforward_layernorm] if sandwich else []
    qk = [attn.q_norm, attn.k_norm] if getattr(attn, "qk_norm", True) and hasattr(attn, "q_norm") else []
    if any(_norm_weight(n) is None for n in norms + outs + qk):
        return None
    eps.update(n.eps for n in norms + outs + qk)
    rotary = attn.rotary
    if all(r is not rotary for r in ropes):
        ropes.append(rotary)
    w_out = [_norm_weight(n) for n in outs] or [None, None]
    w_qk = [_norm_weight(n) for n in qk] or [None, None]
    return LayerWeights(*plans, _norm_weight(norms[0]), _norm_weight(norms[1]), w_out[0], w_out[1], w_qk[0], w_qk[1],
                        attn.attn.scale, next(i for i, r in enumerate(ropes) if r is rotary))


def build_fused_decode(decoder: nn.Module, kernels: CpuKernels | None) -> FusedDecodeLayers | None:
    """A FusedDecodeLayers for `decoder` (a model's layer stack: .layers) when every layer qualifies, else None."""
    layers = getattr(decoder, "layers", None)
    if kernels is None or not layers:
        return None
    acts = {type(layer.mlp.act) for layer in layers if hasattr(getattr(layer, "mlp", None), "act")}
    act = {GeluTanhAndMul: "gelu_tanh", SiluAndMul: "silu"}.get(next(iter(acts))) if len(acts) == 1 else None
    ropes: list = []
    eps: set = set()
    weights = [_layer_weights(layer, ropes, eps) for layer in layers]
    if act is None or any(w is None for w in weights) or len(eps) != 1 or len(ropes) > 2:
        return None
    heads = {(l.self_attn.num_heads, l.self_attn.num_kv_heads, l.self_attn.head_dim) for l in layers}
    inter = {w.gate_up.width // 2 for w in weights}
    if len(heads) != 1 or len(inter) != 1:
        return None
    (hq, hkv, d), i, n = heads.pop(), inter.pop(), weights[0].qkv.k
    if any((w.qkv.k, w.qkv.width, w.o.k, w.o.width, w.gate_up.k, w.down.k, w.down.width)
           != (n, (hq + 2 * hkv) * d, hq * d, n, n, i, n) for w in weights):
        return None
    return FusedDecodeLayers(kernels, weights, ropes, hq, hkv, d, i, eps.pop(), act)


def attach_fused_decode(model: nn.Module, kernels: CpuKernels | None) -> None:
    """Give the model's decoder (model.model, with a `fused_layers` slot) its FusedDecodeLayers, if it qualifies."""
    decoder = getattr(model, "model", None)
    if decoder is not None and hasattr(decoder, "fused_layers"):
        decoder.fused_layers = build_fused_decode(decoder, kernels)
        if decoder.fused_layers is not None:
            log.info("decode steps run all %d layers in one native call", len(decoder.layers))


class FusedDecodeLayers:
    """Runs a decoder's layers in one native call on decode steps (see the module docstring)."""

    def __init__(self, kernels: CpuKernels, weights: list[LayerWeights], ropes: list, num_heads: int,
                 num_kv_heads: int, head_dim: int, intermediate: int, eps: float, act: str):
        self.kernel = kernels.decode_step
        self.weights, self.ropes = weights, ropes
        self.hq, self.hkv, self.d, self.inter, self.eps = num_heads, num_kv_heads, head_dim, intermediate, eps
        self.act = ACTIVATIONS[act]
        self.n = weights[0].qkv.k
        self._layers: tuple | None = None  # (kv_caches list, layer_to_group, C array, cache dtype, slots per group)
        self._scratch: dict[int, tuple[list[torch.Tensor], StepShape]] = {}

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """x [T, n] after the embedding -> the hidden state after the last layer, or None (not a step it covers:
        the caller runs the layers)."""
        t = x.shape[0]
        if (ctx.backend == "reference" or not 0 < t <= INT8_MAX_ROWS or x.dtype is not torch.float32 or not x.is_cpu
                or x.dim() != 2 or x.shape[1] != self.n):
            return None
        layers = self._layer_array(ctx)
        if layers is None:
            return None
        arr, cache_dtype, num_slots = layers[2], layers[3], layers[4]
        groups = (StepGroup * len(ctx.attn_metadata))()
        for gi, meta in enumerate(ctx.attn_metadata):
            plan = meta.plan(torch.float32)
            if not plan.decode_is_all or meta.slot_mapping.numel() != t:
                return None
            q_start = plan.decode_q_start  # several queries per sequence (speculative verification), or None
            groups[gi] = StepGroup(meta.slot_mapping.data_ptr(), plan.decode_blocks.data_ptr(),
                                   plan.decode_blocks.shape[1], plan.decode_first_pos.data_ptr(),
                                   None if q_start is None else q_start.data_ptr(), plan.decode_lo.data_ptr(),
                                   plan.decode_ctx.data_ptr(), plan.decode_blocks.shape[0], num_slots[gi])
        shape = self._shape(t, ctx.attn_metadata[0].block_size)
        tables = [r.cos_sin(positions, torch.float32) for r in self.ropes]  # kept alive through the call
        for i, (cos, sin) in enumerate(tables):
            shape.cos[i], shape.ssin[i] = cos.data_ptr(), sin.data_ptr()
        out = x.clone(memory_format=torch.contiguous_format)
        self.kernel.run(out, arr, shape, groups, cache_dtype)
        return out

    def _layer_array(self, ctx: ForwardContext) -> tuple | None:
        got = self._layers
        if got is not None and got[0] is ctx.kv_caches and got[1] == ctx.layer_to_group:
            return got if got[2] is not None else None
        caches = ctx.kv_caches
        dtypes = {c.dtype for kv in caches for c in kv}
        if len(caches) != len(self.weights) or len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16) \
                or any(not c.is_cpu or not c.is_contiguous() or tuple(c.shape[2:]) != (self.hkv, self.d)
                       for kv in caches for c in kv):
            log.info("fused decode step off: KV caches of another layout than the layers expect")
            self._layers = (caches, list(ctx.layer_to_group), None, None, None)
            return None
        num_slots = {}
        for layer, g in enumerate(ctx.layer_to_group):
            num_slots[g] = caches[layer][0].shape[0] * caches[layer][0].shape[1]
        arr = self.kernel.layers(self.weights, caches, ctx.layer_to_group)
        self._layers = (caches, list(ctx.layer_to_group), arr, caches[0][0].dtype,
                        [num_slots[g] for g in range(max(num_slots) + 1)])
        return self._layers

    def _shape(self, t: int, block_size: int) -> StepShape:
        got = self._scratch.get(t)
        if got is None:
            kmax = max(self.n, self.hq * self.d, self.inter)
            f = torch.float32
            bufs = [torch.empty(t * w, dtype=f) for w in
                    (self.n, (self.hq + 2 * self.hkv) * self.d, self.hq * self.d, self.n, 2 * self.inter, self.inter)]
            bufs += [torch.empty(t * kmax, dtype=torch.int8), torch.empty(t * kmax // 32, dtype=f),
                     torch.empty(t * kmax // 32, dtype=f)]
            shape = StepShape(t, self.n, self.hq, self.hkv, self.d, self.inter, block_size, self.act, self.eps)
            (shape.h, shape.qkv, shape.attn, shape.o, shape.gu, shape.a, shape.q8, shape.qd,
             shape.qs) = [b.data_ptr() for b in bufs]
            got = self._scratch[t] = (bufs, shape)
        got[1].bs = block_size
        return got[1]
