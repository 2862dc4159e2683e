"""PEFT adapter parsing: the folded A/B equal peft's merged weight deltas (scaling, rslora, rank / alpha
patterns), and every malformed or unsupported adapter raises LoRAAdapterError naming the file and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.lora.conftest import SPECS
from tokenmill.lora.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRAAdapterError,
    load_adapter,
    read_adapter_config,
    shapes_from_hf_config,
)


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoConfig.from_pretrained(str(tiny_llama_dir)), AutoModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), dtype=torch.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_folded_weights_equal_peft_merge(spec, llama_adapters, hf_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, base = hf_llama
    adapter = load_adapter(llama_adapters.paths[spec.name], 16, shapes_from_hf_config(config))
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(llama_adapters.base_dir), dtype=torch.float32),
        str(llama_adapters.paths[spec.name])).merge_and_unload()
    base_w, merged_w = dict(base.named_parameters()), dict(merged.named_parameters())
    changed = {n for n in base_w if not torch.equal(base_w[n], merged_w[n])}
    want = {f"model.layers.{layer}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}.weight"
            for layer, t in adapter.modules}
    assert changed == want
    for (layer, target), m in adapter.modules.items():
        name = next(n for n in want if n.startswith(f"model.layers.{layer}.") and f".{target}." in n)
        torch.testing.assert_close(m.b @ m.a, merged_w[name] - base_w[name], rtol=1e-4, atol=1e-5)
    assert adapter.rank == spec.r and adapter.num_bytes > 0


def test_rank_pattern_gives_per_module_ranks(llama_adapters):
    adapter = load_adapter(llama_adapters.paths["qv-patterns"], 8)
    assert {t: m.rank for (_, t), m in adapter.modules.items()} == {"q_proj": 8, "v_proj": 4}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder: Path, fn) -> Path:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    save_file(fn(tensors), str(folder / WEIGHTS_FILE))
    return folder


def _first(tensors: dict, kind: str) -> str:
    return next(n for n in sorted(tensors) if kind in n)


CONFIG_CASES = {
    "rank_over_max": ({"r": 32}, "rank 32 exceeds max_lora_rank=16"),
    "rank_pattern_over_max": ({"rank_pattern": {"q_proj": 64}}, "rank 64 exceeds max_lora_rank=16"),
    "bias": ({"bias": "all"}, "only bias='none'"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "dora": ({"use_dora": True}, "use_dora"),
    "embed_target": ({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings (embed_tokens) is not supported"),
    "lm_head_target": ({"target_modules": ["lm_head"]}, "LM head (lm_head) is not supported"),
    "unknown_target": ({"target_modules": ["fc1"]}, "'fc1' is not supported; supported: q_proj"),
    "bad_r": ({"r": "8"}, "r='8': must be an integer >= 1"),
    "not_lora": ({"peft_type": "IA3"}, "only LORA adapters"),
    # Found by test_any_config_loads_or_raises_adapter_error (TypeError / AttributeError before the fix):
    "rank_pattern_value": ({"rank_pattern": {"q_proj": None}}, "rank_pattern['q_proj']=None: must be a positive"),
    "rank_pattern_type": ({"rank_pattern": 3}, "rank_pattern=3: must be an object"),
    "alpha_pattern_type": ({"alpha_pattern": 3}, "alpha_pattern=3: must be an object"),
    "pattern_regex": ({"alpha_pattern": {"(": 2}}, "'(' is not a valid regex"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_errors(case, llama_adapters, tmp_path):
    changes, problem = CONFIG_CASES[case]
    folder = _edit_config(_copy(llama_adapters.paths["attn-r4"], tmp_path / "a"), **changes)
    with pytest.raises(LoRAAdapterError) as e:
        load_adapter(folder, 16)
    assert e.value.file == str(folder / CONFIG_FILE) and problem in e.value.problem
    assert isinstance(e.value, ValueError) and str(folder / CONFIG_FILE) in str(e.value)


def _drop_b(t: dict) -> dict:
    return {n: v for n, v in t.items() if n != _first(t, "lora_B")}


def _lm_head(t: dict) -> dict:
    return {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}


def _embedding(t: dict) -> dict:
    return {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)}


def _layer_beyond(t: dict) -> dict:
    return {n.replace("layers.1.", "layers.7."): v for n, v in t.items()}


def _wide_a(t: dict) -> dict:  # trained on a base with hidden 96, not 64
    return {n: torch.zeros(v.shape[0], 96) if "lora_A" in n else v for n, v in t.items()}


def _rank_mismatch(t: dict) -> dict:
    name = _first(t, "lora_B")
    return {**t, name: torch.zeros(t[name].shape[0], 3)}


TENSOR_CASES = {
    "missing_b": (_drop_b, "lora_B is missing"),
    "lm_head": (_lm_head, "LM head (lm_head) is not supported"),
    "embedding": (_embedding, "embeddings (embed_tokens) is not supported"),
    "layer_beyond": (_layer_beyond, "layer 7 is beyond the base model's 2 layers"),
    "other_base": (_wide_a, "A/B map 96 -> 32 features but the base model's k_proj maps 64 -> 32"),
    "rank_mismatch": (_rank_mismatch, "do not form a LoRA pair"),
    "empty": (lambda t: {"other": torch.zeros(1)}, "not a LoRA tensor of a supported module"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_errors(case, llama_adapters, hf_llama, tmp_path):
    fn, problem = TENSOR_CASES[case]
    folder = _edit_tensors(_copy(llama_adapters.paths["attn-r4"], tmp_path / "a"), fn)
    with pytest.raises(LoRAAdapterError) as e:
        load_adapter(folder, 16, shapes_from_hf_config(hf_llama[0]))
    assert e.value.file == str(folder / WEIGHTS_FILE) and problem in e.value.problem


def test_file_errors(llama_adapters, tmp_path):
    with pytest.raises(LoRAAdapterError, match="not a directory"):
        load_adapter(tmp_path / "nope", 16)
    folder = _copy(llama_adapters.paths["attn-r4"], tmp_path / "a")
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(LoRAAdapterError, match="invalid JSON"):
        read_adapter_config(folder, 16)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(LoRAAdapterError, match="adapter_config.json: missing"):
        load_adapter(folder, 16)
    folder = _copy(llama_adapters.paths["attn-r4"], tmp_path / "b")
    (folder / WEIGHTS_FILE).rename(folder / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match="pickle weights are not supported"):
        load_adapter(folder, 16)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(LoRAAdapterError, match="adapter_model.safetensors: missing"):
        load_adapter(folder, 16)
    (folder / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(LoRAAdapterError, match="not a readable safetensors file"):
        load_adapter(folder, 16)
    with pytest.raises(LoRAAdapterError, match="cannot be read"):  # the OS refuses the path itself
        load_adapter(tmp_path / ("x" * 300), 16)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=6)
_KEYS = ["r", "lora_alpha", "target_modules", "use_rslora", "bias", "rank_pattern", "alpha_pattern", "peft_type",
         "fan_in_fan_out", "modules_to_save", "use_dora", "layers_to_transform"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=4))
def test_any_config_loads_or_raises_adapter_error(changes, llama_adapters, tmp_path):
    """Fuzzed adapter_config.json values: the adapter loads or LoRAAdapterError names the file, never another
    exception (a load endpoint turns exactly that error into a 400)."""
    folder = tmp_path / "fuzz"
    if not folder.exists():
        _copy(llama_adapters.paths["attn-r4"], folder)
    cfg = json.loads((llama_adapters.paths["attn-r4"] / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg, **changes}))
    try:
        adapter = load_adapter(folder, 16)
    except LoRAAdapterError as e:
        assert e.file.endswith(CONFIG_FILE) or e.file.endswith(WEIGHTS_FILE)
        return
    assert all(torch.isfinite(m.b).all() for m in adapter.modules.values())
