"""GGUF (llama.cpp) conventions -> Hugging Face ones: model config from metadata, tensor names, and the
per-architecture fix-ups llama.cpp applied when it wrote the file.

- llama: convert_hf_to_gguf.py permutes the rows of Q and K for its interleaved RoPE; we undo it to get
  back the rotate-half layout of HF checkpoints (Qwen2/3 and Gemma 3 are written unpermuted).
- gemma3: norm weights are stored with the +1 already added (llama.cpp multiplies by w, HF by 1 + w);
  we subtract 1, as transformers' GGUF loader does, so the (1 + w) RMSNorm matches it exactly.
  llama.cpp hard-codes what the file does not say: local RoPE base 10k, every 6th layer global,
  attention scale 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tokenmill.model.gguf_reader import GGUFFile

SUPPORTED_GGUF_ARCHS = ("gemma3", "llama", "qwen2", "qwen3")
_HF_ARCH = {"gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",  # Llama/Qwen: the norm before the MLP
}
_GEMMA_LAYER = {
    **_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
SKIPPED = ("rope_freqs.weight",)  # llama3 rope factors: carried by the config's rope scaling instead


def hf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.architecture
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(
            f"model: GGUF architecture {arch!r} in {gguf.path} is not supported (supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHS)})"
        )
    return _HF_ARCH[arch]


def hf_tensor_name(arch: str, gguf_name: str) -> str | None:
    """The HF parameter name for a GGUF tensor; None for tensors we derive elsewhere (rope_freqs)."""
    if gguf_name in SKIPPED:
        return None
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK.match(gguf_name)
    table = _GEMMA_LAYER if arch == "gemma3" else _LAYER
    if m is None or m.group(2) not in table:
        raise ValueError(f"model: GGUF tensor {gguf_name!r} has no known mapping for architecture {arch!r}")
    return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"


def fix_tensor(arch: str, gguf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """Undo llama.cpp's write-time transformations (see module docstring)."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
        shape = tensor.shape
        return tensor.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return tensor - 1.0
    return tensor


def _common(g: GGUFFile, vocab_size: int) -> dict[str, Any]:
    heads = int(g.arch_key("attention.head_count"))
    kv = g.arch_key("attention.head_count_kv", heads)
    out = dict(
        vocab_size=vocab_size,
        hidden_size=int(g.arch_key("embedding_length")),
        intermediate_size=int(g.arch_key("feed_forward_length")),
        num_hidden_layers=int(g.arch_key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv if not hasattr(kv, "__len__") else max(kv)),
        rms_norm_eps=float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(g.arch_key("context_length", 4096)),
        bos_token_id=_int_or_none(g.metadata.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(g.metadata.get("tokenizer.ggml.eos_token_id")),
        pad_token_id=_int_or_none(g.metadata.get("tokenizer.ggml.padding_token_id")),
        tie_word_embeddings="output.weight" not in g.tensors,
    )
    head_dim = g.arch_key("attention.key_length")
    if head_dim is not None:
        out["head_dim"] = int(head_dim)
    return out


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _rope_scaling(g: GGUFFile) -> dict | None:
    kind = g.arch_key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "llama3":
        return None  # carried by the rope_freqs tensor, see llama3_scaling_from_factors
    if kind != "linear":
        raise ValueError(f"model: GGUF rope.scaling.type={kind!r} in {g.path} is not supported (supported: linear)")
    return {"rope_type": "linear", "factor": float(g.arch_key("rope.scaling.factor"))}


def llama3_scaling_from_factors(g: GGUFFile, theta: float, head_dim: int) -> dict:
    """Llama 3.x GGUFs store llama3 RoPE scaling as per-frequency divisors (rope_freqs) and not its
    parameters. Recover them: factor is the largest divisor; low/high frequency factors and the original
    context are searched among the values Meta uses and accepted only if they reproduce every divisor."""
    import math

    import numpy as np

    from tokenmill.model.gguf_dequant import dequantize

    info = g.tensors["rope_freqs.weight"]
    want = dequantize(info.data, info.ggml_type, info.shape).numpy().astype(np.float64)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor = float(want.max())
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
        for orig in [2**k for k in range(6, 18)]:
            smooth = (orig / wavelen - low) / (high - low)
            got = np.where(wavelen < orig / high, 1.0,
                           np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if np.allclose(got, want, rtol=1e-4, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": orig}
    raise ValueError(f"model: rope_freqs in {g.path} match no llama3 rope scaling parameters; "
                     "load the Hugging Face folder of this model instead")


def build_hf_config(g: GGUFFile) -> Any:
    """A transformers config object for the file's model, from GGUF metadata alone."""
    arch = g.architecture
    hf_architecture(g)
    vocab_size = g.tensors["token_embd.weight"].shape[0]
    kw = _common(g, vocab_size)
    theta = float(g.arch_key("rope.freq_base", 10000.0))
    scaling = _rope_scaling(g)
    if "rope_freqs.weight" in g.tensors:
        scaling = llama3_scaling_from_factors(g, theta, kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"]))
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        n = kw["num_hidden_layers"]
        pattern = int(g.arch_key("attention.sliding_window_pattern", 6))
        head_dim = kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
        is_27b = n == 62  # llama.cpp's one exception to 1/sqrt(head_dim)
        full = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
        cfg = Gemma3TextConfig(
            **kw,
            sliding_window=int(g.arch_key("attention.sliding_window", 4096)),
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)],
            query_pre_attn_scalar=kw["hidden_size"] // kw["num_attention_heads"] if is_27b else head_dim,
            rope_parameters={"full_attention": full,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            final_logit_softcapping=g.arch_key("final_logit_softcapping"),
            attn_logit_softcapping=None,
        )
    else:
        from transformers import LlamaConfig, Qwen2Config, Qwen3Config

        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
        rope = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
        cfg = cls(**kw, rope_parameters=rope)
    cfg.architectures = [_HF_ARCH[arch]]
    return cfg
