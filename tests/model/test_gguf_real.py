"""The packaged default model (Gemma 3 270M, Q4_K_M GGUF) against transformers loading the same file."""

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
TEXTS = PROMPTS + ["  two  spaces\n\n\ttab", "héllo 日本語 🙂 <start_of_turn>user\nhi<end_of_turn>", "1234567890" * 3]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def default_llm(default_gemma):
    return LLM(dtype="float32", quantization="none", max_model_len=1024, kv_cache_memory=0.25,
               max_num_seqs=8)  # the exact path


@pytest.mark.slow
def test_default_model_greedy_matches_transformers_gguf(default_gemma, default_llm):
    from transformers import AutoModelForCausalLM

    path, _ = default_gemma
    assert default_llm.loaded.path == str(path) and default_llm.loaded.arch == "Gemma3ForCausalLM"
    tok = default_llm.get_tokenizer()
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    outs = default_llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                                SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want
        assert out.outputs[0].text == tok.decode(want)


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers_conversion(default_gemma, default_llm):
    _, fresh = default_gemma
    ours = default_llm.get_tokenizer()
    for text in TEXTS:
        ids = fresh(text).input_ids
        assert ours(text).input_ids == ids
        assert ours.decode(ids) == fresh.decode(ids)
    assert ids[0] == 2  # <bos> added, as llama.cpp's add_bos_token says
    assert default_llm.loaded.eos_token_ids == [1, 106]  # <eos>, <end_of_turn>


@pytest.mark.slow
def test_default_model_chat_uses_gemma_template(default_llm):
    out = default_llm.chat([{"role": "user", "content": "Say hello."}],
                           SamplingParams(temperature=0.0, max_tokens=4))[0]
    tok = default_llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids) == "<bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_default_model_keeps_its_blocks(default_gemma):
    """quantization=auto (the default): the file's Q5_0 / Q8_0 / Q4_K / Q6_K tensors stay blocks, and the weights
    held in memory stay within 1.3x the file's size (float32 from the same file: ~4.3x)."""
    from tokenmill.config import ModelConfig
    from tokenmill.model.loader import load_model

    path, _ = default_gemma
    loaded = load_model(ModelConfig(model=str(path), dtype="float32"))
    assert loaded.quantization.startswith("gguf blocks (") and "Q6_K" in loaded.quantization
    held = 0
    for module in loaded.model.modules():
        held += sum(qt.nbytes for qt in (module.__dict__.get("quantized_parts") or {}).values())
        held += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    assert held <= 1.3 * path.stat().st_size, f"{held / 2**20:.0f} MiB held for a {path.stat().st_size / 2**20:.0f} MiB file"
