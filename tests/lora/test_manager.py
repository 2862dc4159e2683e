"""LoRAManager: wrapping, slot assignment with LRU eviction, the in-memory adapter cache, add / remove, the
per-step cap, and its counters."""

from __future__ import annotations

import pytest
import torch

from tests.lora.conftest import SPECS
from tokenmill.config import LoRAConfig, ModelConfig
from tokenmill.engine.outputs import ScheduledSeq, SeqSetup
from tokenmill.lora.adapter import LoRAAdapterError, shapes_from_hf_config
from tokenmill.lora.manager import LoRAManager
from tokenmill.lora.request import LoRARequest
from tokenmill.model.loader import load_model
from tokenmill.sampling_params import SamplingParams

NAMES = [s.name for s in SPECS]


@pytest.fixture
def make_manager(tiny_llama_dir):
    def make(max_loras: int = 2, max_cpu_loras: int | None = None) -> LoRAManager:
        loaded = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32"))
        return LoRAManager(loaded.model, LoRAConfig(max_loras=max_loras, max_lora_rank=16,
                                                    max_cpu_loras=max_cpu_loras), torch.device("cpu"))
    return make


def _req(adapters, i: int) -> LoRARequest:
    return LoRARequest(NAMES[i], i + 1, str(adapters.paths[NAMES[i]]))


def _seq(lora: LoRARequest | None, n: int = 2, setup: bool = False) -> ScheduledSeq:
    s = SeqSetup(SamplingParams(), [5] * n, [], None, lora=lora.to_wire() if lora else None) if setup else None
    return ScheduledSeq(f"s{id(s)}", [5] * n, 0, [[1]], True, setup=s, lora_id=lora.lora_int_id if lora else 0)


def test_wraps_every_projection_with_base_shapes(make_manager, tiny_llama_dir):
    from transformers import AutoConfig

    mgr = make_manager()
    assert {k: len(v) for k, v in mgr.layers.items()} == {0: 4, 1: 4}  # qkv, o, gate_up, down per layer
    assert mgr.shapes == shapes_from_hf_config(AutoConfig.from_pretrained(str(tiny_llama_dir)))


def test_slots_lru_and_swaps(make_manager, llama_adapters):
    mgr = make_manager(max_loras=2, max_cpu_loras=4)
    r1, r2, r3 = (_req(llama_adapters, i) for i in range(3))
    mgr.set_batch([_seq(r1, setup=True), _seq(r2, setup=True), _seq(None)])
    assert mgr.slot_ids == [1, 2] and mgr.stats()["swaps"] == 2
    assert [s for s, _ in mgr.batch.segments] == [0, 1]
    mgr.set_batch([_seq(r1)])  # adapter 2 is now the least recently used slot
    mgr.set_batch([_seq(r3, setup=True), _seq(r1)])
    assert mgr.slot_ids == [1, 3] and mgr.stats()["swaps"] == 3
    mgr.set_batch([_seq(r2), _seq(r3)])  # 1 is not needed by this step: its slot goes, 3's stays
    assert mgr.slot_ids == [2, 3] and mgr.stats()["swaps"] == 4 and mgr.stats()["loads"] == 3
    mgr.set_batch([_seq(None)])
    assert not mgr.batch.active and mgr.slot_ids == [2, 3]


def test_more_adapters_than_slots_in_one_step_is_an_error(make_manager, llama_adapters):
    mgr = make_manager(max_loras=2, max_cpu_loras=3)
    with pytest.raises(ValueError, match="3 adapters in one step but max_loras=2"):
        mgr.set_batch([_seq(_req(llama_adapters, i), setup=True) for i in range(3)])


def test_cpu_cache_is_lru_and_reloads(make_manager, llama_adapters):
    mgr = make_manager(max_loras=1, max_cpu_loras=2)
    for i in range(3):
        mgr.add(_req(llama_adapters, i))
    assert list(mgr.cache) == [2, 3] and mgr.stats()["loaded"] == 2 and mgr.stats()["loads"] == 3
    mgr.set_batch([_seq(_req(llama_adapters, 0))])  # evicted from memory: read from disk again
    assert mgr.stats()["loads"] == 4 and list(mgr.cache) == [3, 1] and mgr.slot_ids == [1]


def test_add_remove_and_replace(make_manager, llama_adapters, tmp_path):
    mgr = make_manager(max_loras=2)
    r1 = _req(llama_adapters, 0)
    mgr.set_batch([_seq(r1, setup=True)])
    assert mgr.remove(NAMES[0]) and mgr.slot_ids == [None, None] and not mgr.cache
    assert not mgr.remove(NAMES[0]) and not mgr.remove(99)
    with pytest.raises(KeyError, match="lora_int_id=1 has no registered adapter"):
        mgr.set_batch([_seq(r1)])
    mgr.add(r1)
    assert mgr.remove(1) and not mgr.requests
    moved = LoRARequest(NAMES[0], 1, str(llama_adapters.paths[NAMES[1]]))  # same id, another folder
    mgr.add(r1)
    mgr.set_batch([_seq(r1)])
    mgr.add(moved)
    assert mgr.slot_ids == [None, None] and mgr.requests[1] == moved
    with pytest.raises(LoRAAdapterError):
        mgr.add(LoRARequest("bad", 5, str(tmp_path)))
    assert 5 not in mgr.cache and 5 not in mgr.requests


def test_invalid_config(tiny_llama_dir):
    loaded = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32"))
    with pytest.raises(ValueError, match="max_cpu_loras=1 >= max_loras"):
        LoRAManager(loaded.model, LoRAConfig(max_loras=2, max_cpu_loras=1), torch.device("cpu"))
