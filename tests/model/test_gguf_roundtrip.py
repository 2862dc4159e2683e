"""Tiny random models written to GGUF the way llama.cpp does, loaded back by tokenmill: logits match the
source weights (exactly up to fp32 rounding for F32, closely for Q8_0), tokenizer ids match, the header
reader agrees with gguf's GGUFReader, and conversions are cached."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.gemma import prefill_logits, write_gguf_from_hf
from tokenmill.config import ModelConfig
from tokenmill.layers.quantized import INT8_MAX_ROWS
from tokenmill.model.loader import load_model

# Longer than the sliding window, and than INT8_MAX_ROWS: block weights (Q8_0) then run every matrix, the
# LM head included, on float32 activations, so they match the rounded source weights to float32 rounding.
PROMPT = [1, 5, 60, 100, 7, 300, 2, 9, 11, 40, 41, 42, 43, 200, 201, 17, 18, 19, 77, 78, 79, 80] + list(range(350, 400))
assert len(PROMPT) > INT8_MAX_ROWS
TEXTS = ["Hello world! café 🙂", "The quick brown fox jumps over the lazy dog.", "  spaces\n\nand\tTabs 日本語"]


@pytest.fixture(scope="module")
def gguf_files(tiny_gguf_sources, tmp_path_factory, gguf_cache_dir) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("gguf_files")
    files = {(arch, q): write_gguf_from_hf(src, out / f"{arch}-{q}.gguf", arch, q)
             for arch, src in tiny_gguf_sources.items() if arch != "llama3" for q in ("F32", "Q8_0", "F16")}
    files[("llama3", "F32")] = write_gguf_from_hf(tiny_gguf_sources["llama3"], out / "llama3-F32.gguf", "llama", "F32")
    return files


def _source_logits(src_dir: Path, qtype: str = "F32") -> torch.Tensor:
    """Logits of the source HF model; for a quantized type, with every matrix rounded through gguf's
    reference quantizer and dequantizer first (what the quantized file stands for)."""
    from gguf import GGMLQuantizationType, quants
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    if qtype != "F32":
        qt = GGMLQuantizationType[qtype]
        with torch.no_grad():
            for p in ref.parameters():
                if p.ndim == 2:
                    w = p.numpy()
                    p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, qt), qt).reshape(w.shape)))
    with torch.no_grad():
        return ref(torch.tensor([PROMPT])).logits[0]


@pytest.mark.parametrize("arch", ["gemma3", "llama", "qwen2"])
def test_logits_match_source_weights(arch, gguf_files, tiny_gguf_sources):
    """The exact path, stated: float32 (what --dtype auto picks on CPUs without native bf16, not on AMX ones)."""
    src = tiny_gguf_sources[arch]
    ref = _source_logits(src)
    f32 = load_model(ModelConfig(model=str(gguf_files[(arch, "F32")]), dtype="float32"))
    assert f32.arch == {"gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    torch.testing.assert_close(prefill_logits(f32.model, PROMPT), ref, atol=2e-5, rtol=0)
    for qtype in ("F16", "Q8_0"):
        got = prefill_logits(load_model(ModelConfig(model=str(gguf_files[(arch, qtype)]), dtype="float32")).model, PROMPT)
        # Exact against the quantization-rounded source weights; close to the original ones.
        torch.testing.assert_close(got, _source_logits(src, qtype), atol=2e-5, rtol=0)
        err = (got - ref).abs().max().item()
        assert 0 < err < 0.05 * ref.abs().max().item(), f"{qtype}: max error {err} vs the unrounded weights"


def test_llama3_rope_scaling_recovered_from_rope_freqs(gguf_files, tiny_gguf_sources):
    """Llama 3 GGUFs carry rope scaling only as the rope_freqs tensor; positions past the original
    context (64 here) go through the scaled frequencies."""
    prompt = (PROMPT * 5)[:100]
    lm = load_model(ModelConfig(model=str(gguf_files[("llama3", "F32")]), dtype="float32"))
    rope = lm.model.model.layers[0].self_attn.rotary.params
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 64
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf_sources["llama3"]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(lm.model, prompt), want, atol=2e-5, rtol=0)


def test_q8_0_matches_transformers_gguf_loader(gguf_files):
    """Same Q8_0 file, two independent loaders (transformers' dequantizes with gguf's numpy reference)."""
    from transformers import AutoModelForCausalLM

    path = gguf_files[("llama", "Q8_0")]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = prefill_logits(load_model(ModelConfig(model=str(path), dtype="float32")).model, PROMPT)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_tokenizer_from_metadata_matches_source(gguf_files, tiny_gguf_sources, gguf_cache_dir):
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(str(tiny_gguf_sources["llama"]))
    lm = load_model(ModelConfig(model=str(gguf_files[("llama", "F32")]), dtype="float32"))
    for text in TEXTS:
        assert lm.tokenizer(text).input_ids == src(text).input_ids
        ids = src(text, add_special_tokens=False).input_ids
        assert lm.tokenizer.decode(ids) == src.decode(ids)
    assert lm.bos_token_id == src.bos_token_id and lm.eos_token_ids == [src.eos_token_id]


def test_tokenizer_conversion_is_cached(gguf_files, gguf_cache_dir, monkeypatch):
    import tokenmill.model.gguf_tokenizer as gt

    path = gguf_files[("qwen2", "F32")]
    first = load_model(ModelConfig(model=str(path), dtype="float32"))
    assert any((gguf_cache_dir / gt.CACHE_KIND).iterdir())

    def fail(*_a, **_k):
        raise AssertionError("tokenizer converted again although it is cached")

    monkeypatch.setattr(gt, "convert_gguf_tokenizer", fail)
    second = load_model(ModelConfig(model=str(path), dtype="float32"))
    assert second.tokenizer(TEXTS[0]).input_ids == first.tokenizer(TEXTS[0]).input_ids


def test_gemma_gets_fallback_chat_template(gguf_files):
    from tokenmill.model.gguf_tokenizer import GEMMA_CHAT_TEMPLATE

    lm = load_model(ModelConfig(model=str(gguf_files[("gemma3", "F32")]), dtype="float32"))
    assert lm.chat_template == GEMMA_CHAT_TEMPLATE
    text = lm.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}],
                                            tokenize=False, add_generation_prompt=True)
    assert text == "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    # llama.cpp's Gemma 3 layout: every 6th layer global, the rest local with the file's window.
    groups = [(g.layer_ids, g.sliding_window) for g in lm.model.kv_cache_groups()]
    assert groups == [([0, 1, 2, 3, 4], 8), ([5], None)]
    llama = load_model(ModelConfig(model=str(gguf_files[("llama", "F32")]), chat_template="{{ 'x' }}"))
    assert llama.chat_template == "{{ 'x' }}"


def test_reader_agrees_with_gguf_reader(gguf_files):
    from gguf import GGUFReader

    from tokenmill.model.gguf_reader import read_gguf

    path = gguf_files[("gemma3", "Q8_0")]
    ours, ref = read_gguf(path), GGUFReader(str(path))
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), ours.metadata[key]
        if isinstance(got, np.ndarray) or isinstance(want, float):
            np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-7)
        else:
            assert got == want, key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == t.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(mine.data), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_bad_files_give_clear_errors(tmp_path, gguf_files):
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(ModelConfig(model=str(bad), dtype="float32"))
    from gguf import GGUFWriter

    odd = tmp_path / "odd.gguf"
    w = GGUFWriter(str(odd), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="architecture 'mamba'.*supported: gemma3, llama, qwen2"):
        load_model(ModelConfig(model=str(odd), dtype="float32"))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(gguf_files[("llama", "F32")].read_bytes()[:-1000])
    with pytest.raises(ValueError, match="runs past the end"):
        load_model(ModelConfig(model=str(truncated), dtype="float32"))
