"""AsyncLLM with the in-process core client: streamed deltas, abort, per-request errors, stop strings."""

import asyncio

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.args import engine_config
from tokenmill.engine.async_llm import AsyncLLM, RequestError
from tokenmill.engine.inproc_client import InProcessCoreClient

P1 = list(range(40, 60))
P2 = [7, 300, 12, 99, 45, 250, 31]


def _engine(path, **kw) -> AsyncLLM:
    from tokenmill.executor.model_runner import ModelRunner

    args = dict(block_size=4, num_gpu_blocks_override=128, max_model_len=256)
    args.update(kw)
    cfg = engine_config(str(path), **args)
    return AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))


async def _collect(engine, prompt, params, rid):
    deltas = []
    async for out in engine.generate(prompt, params, rid):
        deltas.append(out)
    return deltas


async def _wait_all_free(engine) -> bool:
    core = engine.client.core
    for _ in range(500):  # the core thread applies aborts between steps
        if core.all_blocks_free() and not core.has_unfinished():
            return True
        await asyncio.sleep(0.01)
    return False


def test_streamed_deltas_match_offline_output(tiny_llama_dir, llama_llm):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    offline = llama_llm.generate([{"prompt_token_ids": P1}, "Hello world"], sp)

    async def main():
        eng = _engine(tiny_llama_dir)
        try:
            a, b = await asyncio.gather(_collect(eng, {"prompt_token_ids": P1}, sp, "a"),
                                        _collect(eng, "Hello world", sp, "b"))
            assert await _wait_all_free(eng)
            return a, b
        finally:
            await eng.shutdown()

    a, b = asyncio.run(main())
    for deltas, ref in ((a, offline[0]), (b, offline[1])):
        toks = [t for d in deltas for c in d.outputs for t in c.token_ids]
        text = "".join(c.text for d in deltas for c in d.outputs)
        assert toks == ref.outputs[0].token_ids and text == ref.outputs[0].text
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].outputs[0].finish_reason == "length"
        assert all(c.finish_reason is None for d in deltas[:-1] for c in d.outputs)


def test_abort_and_early_exit_free_blocks(tiny_llama_dir):
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        eng = _engine(tiny_llama_dir)
        try:
            got = []
            async for out in eng.generate(P1, sp, "x"):
                got.append(out)
                if len(got) == 2:
                    await eng.abort("x")
            assert got[-1].finished and got[-1].outputs[-1].finish_reason == "abort"
            assert sum(len(c.token_ids) for o in got for c in o.outputs) < 200
            assert await _wait_all_free(eng)

            gen = eng.generate(P2, sp, "y")  # consumer stops reading: the request is aborted
            await gen.__anext__()
            await gen.aclose()
            assert await _wait_all_free(eng)
            assert eng.stats().num_running == 0
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_errors_fail_only_their_request(tiny_llama_dir):
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def main():
        eng = _engine(tiny_llama_dir, num_gpu_blocks_override=10)  # 9 blocks of 4: 36 tokens
        try:
            ok = asyncio.create_task(_collect(eng, P2, sp, "ok"))
            with pytest.raises(ValueError, match="max_model_len=256"):
                await _collect(eng, [5] * 300, sp, "long")
            with pytest.raises(RequestError, match="KV cache"):
                await _collect(eng, list(range(10, 50)), sp, "huge")  # 40 tokens never fit
            with pytest.raises(ValueError, match="prompt"):
                await _collect(eng, {"nothing": 1}, sp, "bad")
            deltas = await ok
            assert deltas[-1].outputs[0].finish_reason == "length"
            assert sum(len(c.token_ids) for d in deltas for c in d.outputs) == 6
            assert not eng.errored
            assert await _wait_all_free(eng)
        finally:
            await eng.shutdown()
        assert eng.errored

    asyncio.run(main())


def test_stop_string_and_n_samples_stream(tiny_llama_dir, llama_llm):
    base = llama_llm.generate({"prompt_token_ids": P2}, SamplingParams(temperature=0, max_tokens=16,
                                                                       ignore_eos=True))[0].outputs[0].text
    stop = base[5:8]

    async def main():
        eng = _engine(tiny_llama_dir)
        try:
            d = await _collect(eng, P2, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]), "s")
            text = "".join(c.text for o in d for c in o.outputs)
            assert text == base[:base.find(stop)]
            assert d[-1].outputs[0].finish_reason == "stop" and d[-1].outputs[0].stop_reason == stop
            d = await _collect(eng, P1, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True), "n")
            per = {0: [], 1: []}
            for o in d:
                for c in o.outputs:
                    per[c.index] += c.token_ids
            assert len(per[0]) == len(per[1]) == 5 and d[-1].finished
            assert await _wait_all_free(eng)
        finally:
            await eng.shutdown()

    asyncio.run(main())


def test_model_info_fields(tiny_llama_dir):
    async def main():
        eng = _engine(tiny_llama_dir, max_model_len=200)
        try:
            info = eng.model_info
            assert info.max_model_len == 200 and info.vocab_size == 512 and info.task == "generate"
            assert info.eos_token_ids == [eng.tokenizer.eos_token_id]
            assert info.kv_capacity_tokens == 127 * 4 and info.chat_template
            assert info.extra["block_size"] == 4
        finally:
            await eng.shutdown()

    asyncio.run(main())
