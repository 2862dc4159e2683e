"""Random PEFT adapters built with peft itself on the tiny fixture models, and their merged references.

peft zero-initialises lora_B (an untrained adapter is a no-op), so every adapter's B (and A) is randomised.
The reference for an adapter is peft's merge_and_unload() model in transformers, decoded greedily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    targets: list[str] | str
    alpha: float
    rslora: bool = False
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None


# Ranks 4 / 8 / 16, attention only / mlp only / all seven, rslora on one, per-module rank and alpha on one.
SPECS = [
    AdapterSpec("attn-r4", 4, ATTN, 8),
    AdapterSpec("mlp-r8", 8, MLP, 16),
    AdapterSpec("all-r16-rslora", 16, ALL, 16, rslora=True),
    AdapterSpec("qv-patterns", 8, r".*\.(q_proj|v_proj)", 8, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 24}),
]


def make_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec, seed: int) -> Path:
    """Save a random PEFT LoRA adapter for the HF model in base_dir into out_dir (peft's own format)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.targets, use_rslora=spec.rslora,
                     rank_pattern=spec.rank_pattern or {}, alpha_pattern=spec.alpha_pattern or {}, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.25 if "lora_A" in name else 0.1))
    model.save_pretrained(str(out_dir))
    return out_dir


class MergedReference:
    """Greedy continuations of peft's merge_and_unload() model (base model when adapter is None)."""

    def __init__(self, base_dir: Path, adapter: Path | None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        self.model = model.eval()
        self._cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in self._cache:
            t = self.torch.tensor([prompt])
            with self.torch.no_grad():
                out = self.model.generate(t, attention_mask=self.torch.ones_like(t), max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            self._cache[key] = out[0, len(prompt):].tolist()
        return self._cache[key]


class AdapterSet:
    """Adapters (by spec name) for one base model, with lazily built merged references."""

    def __init__(self, base_dir: Path, root: Path):
        self.base_dir = base_dir
        self.root = root
        self._paths: dict[str, Path] = {}
        self._refs: dict[str | None, MergedReference] = {}

    @property
    def paths(self) -> _LazyPaths:
        return _LazyPaths(self)

    def path(self, name: str) -> Path:
        """The adapter folder, built on first use (seeded by its place in SPECS: the same weights every run)."""
        if name not in self._paths:
            i, spec = next((i, s) for i, s in enumerate(SPECS) if s.name == name)
            self._paths[name] = make_adapter(self.base_dir, self.root / name, spec, seed=i + 1)
        return self._paths[name]

    def ref(self, name: str | None) -> MergedReference:
        if name not in self._refs:
            self._refs[name] = MergedReference(self.base_dir, self.paths[name] if name else None)
        return self._refs[name]


class _LazyPaths:
    def __init__(self, adapters: AdapterSet):
        self.adapters = adapters

    def __getitem__(self, name: str) -> Path:
        return self.adapters.path(name)


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama_dir, tmp_path_factory) -> AdapterSet:
    return AdapterSet(tiny_llama_dir, tmp_path_factory.mktemp("llama_adapters"))


@pytest.fixture(scope="session")
def qwen2_adapters(tiny_qwen2_dir, tmp_path_factory) -> AdapterSet:
    return AdapterSet(tiny_qwen2_dir, tmp_path_factory.mktemp("qwen2_adapters"))


@pytest.fixture(scope="session")
def gemma3_adapters(tiny_gemma3_dir, tmp_path_factory) -> AdapterSet:
    return AdapterSet(tiny_gemma3_dir, tmp_path_factory.mktemp("gemma3_adapters"))
