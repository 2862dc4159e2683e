"""Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm per head, no bias) on the shared decoder."""

from __future__ import annotations

from tokenmill.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    ATTN_BIAS = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    ATTN_BIAS = None  # config.attention_bias (False in released checkpoints)
    QK_NORM = True
