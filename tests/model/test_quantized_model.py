"""GGUF blocks kept as stored (quantization=auto) against the same file dequantized (quantization=none), on
tiny models, for every block type: the block path (fused shards of mixed types, llama's permuted q/k rows
moved as whole blocks, the tied embedding looked up and used as LM head) computes the same model.

Stated tolerances: layers run the panel GEMM on float32 activations above INT8_MAX_ROWS (32) rows, the LM head
above 32 too when its rows are interleaved (Q8_0 / Q5_0), else above PLAIN_HEAD_INT8_MAX_ROWS (16); a prompt longer
than 32 matches within 1e-4 x the logit range. Wherever the 8-bit activation kernel runs (up to 32 rows, a plain
head up to 16): max |diff| <= 5% of the logit range, and the greedy token is the same at nearly every position."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.gemma import prefill_logits, write_gguf_from_hf
from tests.fixtures.quant_blocks import KERNEL_TYPE_NAMES
from tests.fixtures.tiny_models import build_tiny_model
from tokenmill.config import ModelConfig
from tokenmill.layers.quantized import INT8_MAX_ROWS, PLAIN_HEAD_INT8_MAX_ROWS
from tokenmill.model.loader import load_model

LONG = [1, 5, 60, 100, 7, 300, 2, 9, 11, 40, 41, 42, 43, 200, 201, 17, 18, 19, 77, 78] + list(range(350, 402))
MID = LONG[:20]  # layers on 8-bit activations, a plain-layout LM head on float32 ones
SHORT = LONG[:6]
assert len(SHORT) <= PLAIN_HEAD_INT8_MAX_ROWS < len(MID) <= INT8_MAX_ROWS < len(LONG)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A tiny llama whose every matrix has rows of 256 (K-quant super-blocks) or more; untied LM head."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "llama", "llama", seed=21, hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _pair(path: Path):
    auto = load_model(ModelConfig(model=str(path), dtype="float32", quantization="auto"))
    none = load_model(ModelConfig(model=str(path), dtype="float32", quantization="none"))
    return auto, none


def _compare(auto, none, prompt) -> None:
    got, want = prefill_logits(auto.model, prompt), prefill_logits(none.model, prompt)
    scale = (want.max() - want.min()).item()
    if len(prompt) > INT8_MAX_ROWS:
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=0)
    else:
        assert (got - want).abs().max().item() <= 0.05 * scale
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.8, f"greedy agreement {agree}"


@pytest.mark.parametrize("qtype", KERNEL_TYPE_NAMES)
def test_llama_blocks_match_dequantized(qtype, wide_llama, tmp_path, gguf_cache_dir):
    path = write_gguf_from_hf(wide_llama, tmp_path / f"llama-{qtype}.gguf", "llama", qtype, random_blocks=True)
    auto, none = _pair(path)
    assert auto.quantization == f"gguf blocks ({qtype} x{2 * 7 + 2})"  # 2 layers x 7 matrices, embedding, head
    assert none.quantization == "none (dequantized)"
    for prompt in (LONG, MID, SHORT):
        _compare(auto, none, prompt)


def test_mixed_types_in_fused_layers(wide_llama, tmp_path, gguf_cache_dir):
    """A Q4_K_M-like mix: q/k/gate/up Q5_0, v Q8_0, o Q4_K, down Q6_K, embeddings Q8_0, head Q6_K."""
    mix = {"v_proj": "Q8_0", "o_proj": "Q4_K", "down_proj": "Q6_K", "embed_tokens": "Q8_0", "lm_head": "Q6_K"}
    path = write_gguf_from_hf(wide_llama, tmp_path / "llama-mix.gguf", "llama", "Q5_0", overrides=mix,
                              random_blocks=True)
    auto, none = _pair(path)
    assert "Q5_0" in auto.quantization and "Q6_K" in auto.quantization
    for prompt in (LONG, MID, SHORT):
        _compare(auto, none, prompt)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0"])
def test_gemma3_tied_embedding_blocks(qtype, tiny_gguf_sources, tmp_path, gguf_cache_dir):
    """Gemma 3: the Q8_0 (etc.) embedding is both the scaled input lookup and the LM head, as in the
    default model; real (gguf-quantized) source weights."""
    path = write_gguf_from_hf(tiny_gguf_sources["gemma3"], tmp_path / f"gemma-{qtype}.gguf", "gemma3", qtype)
    auto, none = _pair(path)
    embed = auto.model.model.embed_tokens
    assert embed.weight.numel() == 0  # the dense copy was never made resident
    head = auto.model.lm_head._project.plan.parts[0][1]
    assert head.interleaved == (qtype in ("Q8_0", "Q5_0"))  # rows interleaved by 8, for the lookup as well
    assert auto.model.lm_head._project.int8_max_rows == (INT8_MAX_ROWS if head.interleaved else PLAIN_HEAD_INT8_MAX_ROWS)
    assert embed.forward.weight is head
    for prompt in (LONG, MID, SHORT):
        _compare(auto, none, prompt)


def test_quantization_argument_is_checked(wide_llama, tmp_path, gguf_cache_dir):
    from tokenmill.engine.args import engine_config

    with pytest.raises(ValueError, match=r"invalid quantization='awq': must be one of auto, none, q8_0, q4_k"):
        engine_config(str(wide_llama), quantization="awq")
    assert engine_config(str(wide_llama), quantization=None).model.quantization == "auto"
    assert engine_config(str(wide_llama), quantization="GGUF").model.quantization == "auto"
    path = write_gguf_from_hf(wide_llama, tmp_path / "llama-q8.gguf", "llama", "Q8_0")
    with pytest.raises(ValueError, match="already quantized: use auto"):
        load_model(ModelConfig(model=str(path), quantization="q8_0"))


def test_without_native_kernels_blocks_are_dequantized(wide_llama, tmp_path, gguf_cache_dir, monkeypatch):
    path = write_gguf_from_hf(wide_llama, tmp_path / "llama-q4k.gguf", "llama", "Q4_K", random_blocks=True)
    none = load_model(ModelConfig(model=str(path), dtype="float32", quantization="none"))
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", "0")
    auto = load_model(ModelConfig(model=str(path), dtype="float32", quantization="auto"))
    torch.testing.assert_close(prefill_logits(auto.model, SHORT), prefill_logits(none.model, SHORT), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["q8_0", "q4_k"])
def test_hf_checkpoint_quantized_at_load(method, wide_llama, gguf_cache_dir):
    """A safetensors model under --quantization q8_0 / q4_k: its matrices become blocks (q4_k where rows tile
    by 256), logits stay close to the dense model's, and the blocks are cached for the next load."""
    from tokenmill.model.cache_dir import cache_root

    dense = load_model(ModelConfig(model=str(wide_llama), dtype="float32"))
    quant = load_model(ModelConfig(model=str(wide_llama), dtype="float32", quantization=method))
    want_type = {"q8_0": "Q8_0", "q4_k": "Q4_K"}[method]
    assert quant.quantization.startswith(f"{method} at load ({want_type} x")
    assert dense.quantization == "none"
    assert quant.model.model.layers[0].mlp.down_proj.weight.numel() == 0  # the dense matrix was released
    want = prefill_logits(dense.model, LONG)
    got = prefill_logits(quant.model, LONG)
    # Random gaussian weights are the worst case for 4 bits (measured here: q8_0 mean |diff| 0.03 and greedy
    # agreement 0.95; q4_k 0.40 and 0.5, against a logit std of 1.3).
    err = (got - want).abs().mean().item()
    assert 0 < err <= {"q8_0": 0.05, "q4_k": 0.5}[method] * want.std().item()
    if method == "q8_0":
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8
    entries = list((cache_root() / "quantized").iterdir())
    again = load_model(ModelConfig(model=str(wide_llama), dtype="float32", quantization=method))
    assert list((cache_root() / "quantized").iterdir()) == entries  # read back, not rebuilt
    torch.testing.assert_close(prefill_logits(again.model, LONG), got, atol=0, rtol=0)


def test_dense_batch_weights_route_big_steps_to_a_dense_copy(wide_llama, tmp_path, gguf_cache_dir):
    """--dense-batch-weights: steps over INT8_MAX_ROWS rows (a plain LM head: PLAIN_HEAD_INT8_MAX_ROWS) run a dense
    (dequantized) copy, the same numbers as quantization=none up to float32 summation order; small steps still
    read the blocks."""
    mix = {"v_proj": "Q8_0", "down_proj": "Q6_K", "lm_head": "Q6_K"}
    path = write_gguf_from_hf(wide_llama, tmp_path / "llama-dense.gguf", "llama", "Q4_K", overrides=mix,
                              random_blocks=True)
    none = load_model(ModelConfig(model=str(path), dtype="float32", quantization="none"))
    both = load_model(ModelConfig(model=str(path), dtype="float32", dense_batch_weights=True))
    layer = both.model.model.layers[0].mlp.down_proj.forward
    assert layer.dense is not None and both.model.lm_head._project.dense is not None
    want = prefill_logits(none.model, LONG)
    torch.testing.assert_close(prefill_logits(both.model, LONG), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    _compare(both, none, SHORT)
