"""Engine e2e helpers: transformers greedy references (cached per session) and LLM construction."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class HFReference:
    """Greedy continuations from transformers generate(), one prompt at a time (no padding effects)."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_new_tokens: int, **gen_kw) -> list[int]:
        key = (tuple(prompt), max_new_tokens, tuple(sorted(gen_kw.items())))
        if key not in self._cache:
            t = self.torch.tensor([prompt])
            with self.torch.no_grad():
                out = self.model.generate(t, attention_mask=self.torch.ones_like(t), max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **gen_kw)
            self._cache[key] = out[0, len(prompt):].tolist()
        return self._cache[key]

    def logits(self, ids: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="session")
def llama_ref(tiny_llama_dir) -> HFReference:
    return HFReference(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def qwen2_ref(tiny_qwen2_dir) -> HFReference:
    return HFReference(str(tiny_qwen2_dir))


@pytest.fixture(scope="session")
def llama_llm(tiny_llama_dir):
    """A shared default engine for tests that do not need special engine arguments."""
    from tokenmill import LLM

    return LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_gpu_blocks_override=256, max_model_len=256, seed=0)
