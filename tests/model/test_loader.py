"""HF folder loading: fields, sharded checkpoints, dtype/device resolution, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.model.loader import (
    choose_dtype,
    load_model,
    resolve_dtype,
    resolve_max_model_len,
)
from tokenmill.model.registry import supported_architectures


def _load(folder, **kw):
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu", **kw))


def test_loaded_model_fields(tiny_llama_dir):
    m = _load(tiny_llama_dir)
    assert m.arch == "LlamaForCausalLM"
    assert m.max_model_len == 512 and m.vocab_size == 512
    assert m.eos_token_ids == [m.tokenizer.eos_token_id] == [2]
    assert m.bos_token_id == 1
    assert m.chat_template and "assistant" in m.chat_template
    assert m.dtype == torch.float32 and m.device.type == "cpu" and m.task == "generate"
    assert m.tokenizer.decode(m.tokenizer("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    assert _load(tiny_llama_dir, max_model_len=64).max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len"):
        _load(tiny_llama_dir, max_model_len=100_000)


def _layer_outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear's output on a fixed probe, every embedding's rows, and the parameters that still hold data.
    The loader prepares CPU linears (prepare_linears_for_cpu): their weights move into a packed form and
    `weight` is left empty, so comparing state_dict()s alone would not see a mis-sharded q/k/v/o/gate/up/down."""
    out = {}
    with torch.inference_mode():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                probe = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(m.in_features))
                out[f"{name}(probe)"] = m(probe)
            elif isinstance(m, torch.nn.Embedding):
                out[f"{name}(ids)"] = m(torch.arange(m.num_embeddings))
    out.update({k: v for k, v in model.state_dict().items() if v.numel() > 0})
    return out


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = _layer_outputs(a), _layer_outputs(b)
    assert x.keys() == y.keys()
    return all(torch.equal(x[k], y[k]) for k in x)


def test_sharded_checkpoint_loads_same_weights(tiny_llama_dir, tiny_llama_sharded_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    assert (tiny_llama_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_llama_sharded_dir.glob("*.safetensors"))) > 1
    whole = _load(tiny_llama_dir).model
    assert sum(isinstance(m, torch.nn.Linear) for m in whole.modules()) >= 4  # q/k/v, o, gate/up, down per layer
    assert _same_weights(whole, _load(tiny_llama_sharded_dir).model)
    # The comparison sees a mis-sharded weight: swap gate and up of one layer in a copy of the shards.
    folder = tmp_path / "swapped"
    shutil.copytree(tiny_llama_sharded_dir, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    shards = {index[gate], index[up]}
    tensors = {f: load_file(str(folder / f)) for f in shards}
    tensors[index[gate]][gate], tensors[index[up]][up] = tensors[index[up]][up], tensors[index[gate]][gate]
    for f, t in tensors.items():
        save_file(t, str(folder / f))
    assert not _same_weights(whole, _load(folder).model)


def test_missing_shard_is_named(tiny_llama_sharded_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_sharded_dir, folder)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=victim.name):
        _load(folder)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        _load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        _load(tmp_path / "empty")


def test_unsupported_architecture_lists_supported(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FancyNetForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        _load(folder)
    assert "FancyNetForCausalLM" in str(err.value)
    assert all(name in str(err.value) for name in supported_architectures())


def test_missing_tokenizer(tiny_llama_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        _load(folder)
    assert _load(folder, tokenizer=str(tiny_llama_dir)).tokenizer.eos_token_id == 2


def test_missing_weight_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.mlp.gate_up_proj"):
        _load(folder)


AVX2_ONLY = "fpu sse2 avx avx2 fma f16c bmi1 bmi2 movbe abm"
AVX512 = AVX2_ONLY + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni"
AMX = AVX512 + " avx512_bf16 amx_bf16 amx_tile amx_int8"


def test_dtype_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int4", cpu)
    assert resolve_max_model_len(None, 128) == 128
    # auto on CPU follows the CPU's bf16 units, whatever the checkpoint stores (TOKENMILL_CPU_FLAGS stands in
    # for /proc/cpuinfo, so every CPU kind is checked on whichever one runs the suite)
    for flags, want in ((AVX2_ONLY, torch.float32), (AVX512, torch.float32), (AMX, torch.bfloat16),
                        (AVX512 + " avx512_bf16", torch.bfloat16), ("", torch.float32)):
        monkeypatch.setenv("TOKENMILL_CPU_FLAGS", flags)
        dtype, reason = choose_dtype("auto", cpu)
        assert dtype == want, flags
        assert ("natively" if want == torch.bfloat16 else "no native bf16") in reason
        assert choose_dtype("float32", cpu) == (torch.float32, "dtype=float32 requested")


def test_auto_dtype_is_reported_and_bf16_on_amx_cpus(monkeypatch, tiny_qwen2_dir):
    """What a user on an AMX machine gets from --dtype auto, down to the KV cache and the served /version."""
    from tokenmill.config import CacheConfig, EngineConfig
    from tokenmill.executor.model_runner import ModelRunner

    monkeypatch.setenv("TOKENMILL_CPU_FLAGS", AMX)
    cfg = EngineConfig(model=ModelConfig(model=str(tiny_qwen2_dir), device="cpu"),
                       cache=CacheConfig(num_gpu_blocks_override=8))
    runner = ModelRunner(cfg)
    info = runner.precision_info()
    assert info["dtype"] == info["kv_cache_dtype"] == "bfloat16"
    assert "natively" in info["dtype_reason"] and runner.kv_caches[0][0].dtype == torch.bfloat16
    monkeypatch.setenv("TOKENMILL_CPU_FLAGS", AVX2_ONLY)
    runner = ModelRunner(EngineConfig(model=cfg.model, cache=CacheConfig(num_gpu_blocks_override=8,
                                                                           kv_cache_dtype="bfloat16")))
    info = runner.precision_info()
    assert (info["dtype"], info["kv_cache_dtype"]) == ("float32", "bfloat16")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*auto, float32 or bfloat16"):
        ModelRunner(EngineConfig(model=cfg.model, cache=CacheConfig(kv_cache_dtype="fp8")))


def test_kv_cache_dtype_is_checked_before_loading():
    """vLLM's argument name; a bad value fails at once (LLM(...) / `tokenmill serve`), not after a model load."""
    import typer
    from typer.testing import CliRunner

    from tokenmill.engine.args import engine_config
    from tokenmill.server.cli import serve_command

    assert engine_config(None, kv_cache_dtype="bfloat16").cache.kv_cache_dtype == "bfloat16"
    assert engine_config(None).cache.kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="invalid kv_cache_dtype='fp8': must be auto, float32 or bfloat16"):
        engine_config(None, kv_cache_dtype="fp8")
    app = typer.Typer()
    app.command()(serve_command)
    res = CliRunner().invoke(app, ["--kv-cache-dtype", "fp8"])
    assert res.exit_code == 2 and "kv-cache-dtype" in res.output and "auto, float32 or bfloat16" in res.output
    res = CliRunner().invoke(app, ["--quantization", "awq"])
    text = " ".join(res.output.replace("│", " ").split())  # the error box wraps long lines
    assert res.exit_code == 2 and "--quantization" in text and "auto, none, q8_0, q4_k" in text


def test_bfloat16_load(tiny_qwen2_dir):
    m = load_model(ModelConfig(model=str(tiny_qwen2_dir), dtype="bfloat16", device="cpu"))
    assert m.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in m.model.parameters())
