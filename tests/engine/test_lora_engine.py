"""AsyncLLM (in-process core client) with LoRA: the add_lora / remove_lora utility calls between steps, a
generation through an adapter, and the core refusing to free an adapter its unfinished requests use."""

from __future__ import annotations

import asyncio

import pytest

from tests.lora.conftest import SPECS, make_adapter
from tokenmill import SamplingParams
from tokenmill.engine.args import engine_config
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.inproc_client import InProcessCoreClient
from tokenmill.lora.request import LoRARequest


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("engine_adapter") / "a", SPECS[0], seed=5)


def _engine(path) -> AsyncLLM:
    from tokenmill.executor.model_runner import ModelRunner

    cfg = engine_config(str(path), block_size=4, num_gpu_blocks_override=128, max_model_len=128, dtype="float32",
                        enable_lora=True, max_loras=1, max_lora_rank=8)
    return AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))


async def _tokens(engine: AsyncLLM, rid: str, lora: LoRARequest | None) -> list[int]:
    out = []
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    async for o in engine.generate(list(range(40, 52)), params, rid, lora_request=lora):
        out += o.outputs[0].token_ids
    return out


def test_utility_calls_and_generation_through_an_adapter(tiny_llama_dir, adapter_dir, tmp_path):
    engine = _engine(tiny_llama_dir)
    lora = LoRARequest("a", 1, str(adapter_dir))

    async def main() -> None:
        try:
            with pytest.raises(ValueError, match="adapter_config.json: missing"):
                await engine.add_lora(LoRARequest("bad", 2, str(tmp_path)))
            with pytest.raises(ValueError, match="unknown engine utility"):
                await engine.client.call_utility("step")  # only the LoRA methods may be called
            await engine.add_lora(lora)
            assert engine.client.core.runner.lora.stats()["loaded"] == 1
            base = await _tokens(engine, "base", None)
            adapted = await _tokens(engine, "lora", lora)
            assert adapted != base and len(adapted) == 6
            # while a request through it is unfinished, the core keeps the adapter's weights
            gen = engine.generate(list(range(40, 52)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                                  "running", lora_request=lora)
            await gen.__anext__()
            assert await engine.client.call_utility("remove_lora", "a") is False
            await gen.aclose()  # aborts it
            for _ in range(200):  # the abort is applied between steps
                if await engine.client.call_utility("remove_lora", "a"):
                    break
                await asyncio.sleep(0.01)
            assert engine.client.core.runner.lora.stats()["loaded"] == 0
            assert await _tokens(engine, "again", lora) == adapted  # reloaded from its path on next use
        finally:
            await engine.shutdown()

    asyncio.run(main())
