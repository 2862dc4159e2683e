"""LLM.generate with lora_request: greedy outputs through every adapter are token-for-token those of peft's
merged model, in one batch mixed with base-model prompts, under chunked prefill, preemption and slot swaps."""

from __future__ import annotations

import random

import pytest

from tests.lora.conftest import SPECS
from tokenmill import LLM, SamplingParams
from tokenmill.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
)
from tokenmill.lora.adapter import LoRAAdapterError
from tokenmill.lora.request import LoRARequest

MAX_NEW = 6
NAMES = [s.name for s in SPECS]


def _config(model_dir, *, max_loras: int = 4, max_cpu_loras: int | None = None, block_size: int = 4,
            num_blocks: int = 128, max_tokens: int = 256) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), dtype="float32", max_model_len=256),
        cache=CacheConfig(block_size=block_size, num_gpu_blocks_override=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=16),
        lora=LoRAConfig(max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras),
    )


def _requests(adapters, names) -> dict[str | None, LoRARequest | None]:
    reqs: dict[str | None, LoRARequest | None] = {None: None}
    for name in names:
        reqs[name] = LoRARequest(name, NAMES.index(name) + 1, str(adapters.paths[name]))
    return reqs


def _mixed(seed: int, n: int, lengths: tuple[int, int] = (3, 20),
           names: list[str] = NAMES) -> list[tuple[str | None, list[int]]]:
    """n (adapter name or None, prompt) pairs cycling base + the adapters; one prompt reused by two adapters."""
    rng = random.Random(seed)
    choices = [None, *names]
    out = [(choices[i % len(choices)], [rng.randrange(6, 500) for _ in range(rng.randint(*lengths))]) for i in range(n)]
    out.append((names[0], out[-1][1]))  # same prompt, different adapter: outputs must differ by adapter only
    return out


def _check(llm: LLM, adapters, cases) -> None:
    reqs = _requests(adapters, {n for n, _ in cases if n})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for _, p in cases], params, lora_request=[reqs[a] for a, _ in cases])
    for (name, prompt), out in zip(cases, outs):
        assert out.outputs[0].token_ids == adapters.ref(name).greedy(prompt, MAX_NEW), f"adapter {name} diverged"
    assert llm.all_blocks_free()


def test_mixed_batch_matches_merged_models(llama_adapters):
    llm = LLM(config=_config(llama_adapters.base_dir))
    cases = _mixed(1, 7)
    _check(llm, llama_adapters, cases)
    stats = llm.runner.lora.stats()
    assert stats["loads"] == len(NAMES) and stats["swaps"] == len(NAMES)
    # The adapters change the output: each differs from the base model on some prompt.
    base = llama_adapters.ref(None)
    assert all(llama_adapters.ref(n).greedy(p, MAX_NEW) != base.greedy(p, MAX_NEW) for n, p in cases if n)


def test_chunked_prefill_and_preemption(llama_adapters):
    # A 12-token budget chunks every prompt; 12 blocks of 4 for 7 x ~25 tokens force preemption by recompute.
    llm = LLM(config=_config(llama_adapters.base_dir, num_blocks=12, max_tokens=12))
    _check(llm, llama_adapters, _mixed(2, 6, lengths=(14, 22)))
    assert llm.engine.stats().num_preemptions > 0


def test_more_adapters_than_slots_swaps(llama_adapters):
    # 2 slots and 2 adapters in memory for 4 adapters: the scheduler caps adapters per step, slots swap
    # between steps, adapters are reloaded from disk after LRU eviction; outputs stay exact.
    llm = LLM(config=_config(llama_adapters.base_dir, max_loras=2, max_cpu_loras=2))
    _check(llm, llama_adapters, _mixed(3, 8, lengths=(3, 8)))
    stats = llm.runner.lora.stats()
    # Every adapter went through one of the 2 slots; only 2 of the 4 loaded up front were still in memory.
    assert stats["swaps"] >= len(NAMES) and stats["loaded"] == 2 and stats["loads"] >= len(NAMES) + 2
    _check(llm, llama_adapters, _mixed(4, 8, lengths=(3, 8))[::-1])
    assert llm.runner.lora.stats()["swaps"] >= stats["swaps"] + 2


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_other_families(arch, request):
    adapters = request.getfixturevalue(f"{arch}_adapters")
    llm = LLM(config=_config(adapters.base_dir, max_tokens=24))
    _check(llm, adapters, _mixed(4, 4, names=["all-r16-rslora", "attn-r4"]))


def test_lora_request_errors(llama_adapters, tiny_llama_dir, tmp_path):
    params = SamplingParams(temperature=0.0, max_tokens=2)
    plain = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=64, num_gpu_blocks_override=16)
    good = LoRARequest("a", 1, str(llama_adapters.paths[NAMES[0]]))
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate("hi", params, lora_request=good)
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=64, num_gpu_blocks_override=16, enable_lora=True,
              max_loras=2, max_lora_rank=16)  # vLLM's engine arguments reach the runner's LoRAManager
    assert llm.runner.lora is not None and llm.runner.lora.max_loras == 2
    with pytest.raises(ValueError, match="2 given for 1 prompts"):
        llm.generate("hi", params, lora_request=[good, good])
    with pytest.raises(ValueError, match="lora_int_id=1 names two adapters"):
        llm.generate(["hi", "yo"], params, lora_request=[good, LoRARequest("b", 1, str(tmp_path))])
    with pytest.raises(LoRAAdapterError, match="adapter_config.json"):
        llm.generate(["hi", "yo"], params, lora_request=[good, LoRARequest("b", 2, str(tmp_path))])
    assert llm.all_blocks_free() and not llm.engine.has_unfinished()  # nothing queued by the failed call
    out = llm.generate("hi", params, lora_request=good)[0].outputs[0].token_ids
    assert out == llama_adapters.ref(NAMES[0]).greedy(llm.get_tokenizer()("hi")["input_ids"], 2)
    # chat() passes lora_request through: same tokens as generate() on the templated prompt
    conv = [{"role": "user", "content": "hello there"}]
    ids = llm.get_tokenizer().apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    chat = llm.chat(conv, params, lora_request=good)[0].outputs[0].token_ids
    assert chat == llm.generate({"prompt_token_ids": ids}, params, lora_request=good)[0].outputs[0].token_ids
    assert chat == llama_adapters.ref(NAMES[0]).greedy(ids, 2)
