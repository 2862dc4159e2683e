"""A constrained request through the engine-core process (msgpack + ZeroMQ): the constraint crosses the wire,
the output matches it, and the compile figures come back in the stats."""

import asyncio
import re

from tokenmill import SamplingParams
from tokenmill.engine.args import engine_config
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.core_client import MPCoreClient
from tokenmill.sampling_params import StructuredOutputsParams as S


def test_constraint_crosses_the_core_process_boundary(tiny_llama_dir):
    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=128, max_model_len=256)
    eng = None
    async def run(params, rid):
        text, reason = [], None
        async for out in eng.generate([5, 6, 7, 8], params, rid):
            o = out.outputs[0]
            text.append(o.text)
            reason = o.finish_reason or reason
        return "".join(text), reason

    async def main():
        nonlocal eng
        eng = AsyncLLM(cfg, client=await MPCoreClient.start(cfg))
        try:
            got = await asyncio.gather(
                run(SamplingParams(seed=1, max_tokens=100, structured_outputs=S(regex=r"[0-9]{3}-[a-z]{2}")), "c"),
                run(SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), "u"))
            for _ in range(200):  # stats arrive with the core's messages
                if eng.stats().num_grammar_compiles:
                    break
                await asyncio.sleep(0.05)
            return got, eng.stats()
        finally:
            await eng.shutdown()

    ((text, reason), (_, free_reason)), stats = asyncio.run(asyncio.wait_for(main(), 120))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and reason == "stop"
    assert free_reason == "length"
    assert stats.num_constrained_requests == 1 and stats.num_grammar_compiles == 1
    assert stats.grammar_compile_seconds_sum > 0 and stats.grammar_compile_seconds_buckets[-1] == 1
