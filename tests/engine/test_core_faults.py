"""Fault isolation: a failing batch fails its sequences only; a dead core fails every waiter, no hang."""

import asyncio

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.args import engine_config
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.core import EngineCore
from tokenmill.engine.errors import EngineDeadError
from tokenmill.engine.inproc_client import InProcessCoreClient
from tokenmill.engine.request import EngineCoreRequest


class _FailOnce:
    """The real runner, made to raise on the first batch that contains `poison` (fault injection)."""

    def __init__(self, runner, poison: str) -> None:
        self._r, self.poison, self.failed = runner, poison, False

    def __getattr__(self, name):
        return getattr(self._r, name)

    def execute(self, sched):
        if not self.failed and any(s.seq_id.startswith(self.poison) for s in sched.seqs):
            self.failed = True
            raise RuntimeError("injected failure")
        return self._r.execute(sched)


def test_runner_error_fails_batch_engine_keeps_serving(tiny_llama_dir):
    from tokenmill.executor.model_runner import ModelRunner

    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)
    core = EngineCore(cfg, _FailOnce(ModelRunner(cfg), "bad"))
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    core.add_request(EngineCoreRequest("bad", [5, 6, 7], sp))
    deltas = core.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("bad", "error")]
    assert "injected failure" in deltas[0].error
    core.add_request(EngineCoreRequest("good", [5, 6, 7], sp))
    out = []
    while core.has_unfinished():
        out += core.step()
    assert [d.finish_reason for d in out] == [None, None, "length"]
    assert core.all_blocks_free()


def test_dead_core_fails_waiters_instead_of_hanging(tiny_llama_dir):
    from tokenmill.executor.model_runner import ModelRunner

    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)
    client = InProcessCoreClient(cfg, ModelRunner(cfg))

    def broken_schedule():
        raise RuntimeError("scheduler bug")

    client.core.scheduler.schedule = broken_schedule
    eng = AsyncLLM(cfg, client=client)

    async def main():
        with pytest.raises(EngineDeadError, match="scheduler bug"):
            async for _ in eng.generate([5, 6, 7], SamplingParams(max_tokens=3), "r"):
                pass
        assert eng.errored
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate([5, 6, 7], SamplingParams(max_tokens=3), "r2"):
                pass
        await eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))
