"""Typed wrapper over csrc/decode_step.cpp: all decoder layers of a decode step in one native call.

`StepLayer` / `StepGroup` / `StepShape` mirror the C structs. A model's layers are described once
(`DecodeStepKernel.layers`: weights as LinearPlans, norm weights, caches), the per-step parts (attention metadata,
RoPE rows, scratch) on every call. Oracle: the same step through the model's layers (tests/model/test_decode_step.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from tokenmill.kernels.quant_kernels import LinearPlan, bind

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

ACTIVATIONS = {"gelu_tanh": 0, "silu": 1}


class StepLinear(ctypes.Structure):
    _fields_ = [("nparts", _i64), ("types", _p), ("weights", _p), ("rows", _p), ("row_bytes", _p), ("cols", _p),
                ("k", _i64), ("width", _i64)]


class StepLayer(ctypes.Structure):
    _fields_ = [("qkv", StepLinear), ("o", StepLinear), ("gate_up", StepLinear), ("down", StepLinear),
                ("w_in", _p), ("w_attn_out", _p), ("w_ffn_in", _p), ("w_ffn_out", _p), ("w_q", _p), ("w_k", _p),
                ("k_cache", _p), ("v_cache", _p), ("group", _i64), ("rope", _i64), ("scale", _f32)]


class StepGroup(ctypes.Structure):
    _fields_ = [("slots", _p), ("blocks", _p), ("nb", _i64), ("first_pos", _p), ("q_start", _p), ("lo", _p),
                ("ctx", _p), ("B", _i64), ("num_slots", _i64)]


class StepShape(ctypes.Structure):
    _fields_ = [("T", _i64), ("n", _i64), ("hq", _i64), ("hkv", _i64), ("d", _i64), ("inter", _i64), ("bs", _i64),
                ("act", _i64), ("eps", _f32), ("cos", _p * 2), ("ssin", _p * 2), ("h", _p), ("qkv", _p), ("attn", _p),
                ("o", _p), ("gu", _p), ("a", _p), ("q8", _p), ("qd", _p), ("qs", _p)]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer for the step. Norm weights are float32 [n] (or [head_dim] for q / k) holding any offset;
    w_attn_out / w_ffn_out: Gemma's norms of the sublayer outputs (None: plain residual adds); w_q / w_k: q / k
    norms (both or neither). rope: index of the layer's RoPE table among the step's (cos, signed sin) pairs."""

    qkv: LinearPlan
    o: LinearPlan
    gate_up: LinearPlan
    down: LinearPlan
    w_in: torch.Tensor
    w_ffn_in: torch.Tensor
    w_attn_out: torch.Tensor | None
    w_ffn_out: torch.Tensor | None
    w_q: torch.Tensor | None
    w_k: torch.Tensor | None
    scale: float
    rope: int


def _linear(plan: LinearPlan) -> StepLinear:
    return StepLinear(len(plan.parts), ctypes.addressof(plan.types), ctypes.addressof(plan.pointers),
                      ctypes.addressof(plan.rows), ctypes.addressof(plan.row_bytes), ctypes.addressof(plan.cols),
                      plan.k, plan.width)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStepKernel:
    def __init__(self, lib: ctypes.CDLL):
        args = [_p, _p, _i64, _p, _p, ctypes.c_int]
        self._run = {torch.float32: bind(lib.decode_step_f32, args), torch.bfloat16: bind(lib.decode_step_f32_bf16kv, args)}

    @staticmethod
    def layers(weights: list[LayerWeights], caches: list[tuple[torch.Tensor, torch.Tensor]], groups: list[int]
               ) -> ctypes.Array:
        """The C array of layers (the caller keeps `weights` and `caches` alive while it is used)."""
        arr = (StepLayer * len(weights))()
        for i, (w, (kc, vc), g) in enumerate(zip(weights, caches, groups, strict=True)):
            arr[i] = StepLayer(_linear(w.qkv), _linear(w.o), _linear(w.gate_up), _linear(w.down), _ptr(w.w_in),
                               _ptr(w.w_attn_out), _ptr(w.w_ffn_in), _ptr(w.w_ffn_out), _ptr(w.w_q), _ptr(w.w_k),
                               kc.data_ptr(), vc.data_ptr(), g, w.rope, w.scale)
        return arr

    def run(self, x: torch.Tensor, layers: ctypes.Array, shape: StepShape, groups: ctypes.Array,
            cache_dtype: torch.dtype) -> None:
        """x [T, n] float32 contiguous, in place: every layer of `layers` on its rows. The caller made the
        shape, its scratch and the groups' metadata (layers/decode_step.py); slots are checked here."""
        rc = self._run[cache_dtype](ctypes.addressof(shape), ctypes.addressof(layers), len(layers),
                                    ctypes.addressof(groups), x.data_ptr(), torch.get_num_threads())
        if rc == -2:
            raise IndexError("decode_step: a slot is outside its KV cache")
        if rc != 0:
            raise ValueError("decode_step: a weight has a block type without a kernel")
