"""Fault isolation: a failing batch fails its sequences only; a dead core fails every waiter, no hang."""

import asyncio
import os
import signal

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
        self.dropped = [*getattr(self, "dropped", []), *sched.finished_seq_ids]
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


def test_a_failed_step_still_hands_the_runner_its_finished_sequences(tiny_llama_dir):
    """The step that raised carried the ids of sequences finished before it: the runner must still get them
    (and the failed ones), else their per-sequence sampling state stays in the runner for good."""
    from tokenmill.executor.model_runner import ModelRunner

    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)
    runner = _FailOnce(ModelRunner(cfg), "bad")
    core = EngineCore(cfg, runner)
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    core.add_request(EngineCoreRequest("first", [5, 6, 7], sp))
    assert [d.finish_reason for d in core.step()] == ["length"]
    core.add_request(EngineCoreRequest("bad", [5, 6, 7], sp))
    assert [d.finish_reason for d in core.step()] == ["error"]  # this step carried "first"'s id, then raised
    core.add_request(EngineCoreRequest("good", [5, 6, 7], sp))
    while core.has_unfinished():
        core.step()
    dropped = set(runner.dropped)
    assert any(i.startswith("first") for i in dropped) and any(i.startswith("bad") for i in dropped)
    assert not any(k.startswith(("first", "bad")) for k in runner._r.states)


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


def _mp_config(tiny_llama_dir):
    return engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128)


def test_first_scheduled_kept_only_for_live_requests_then_sigkill(tiny_llama_dir):
    """The core reports a request's first-scheduled time in the step it schedules it; a report that lands
    after the front end is done with the request (aborted as it was scheduled) must not stay forever.
    Then the core is SIGKILLed mid-request: the waiter fails at once, naming the signal."""
    from tokenmill.engine.core_client import MPCoreClient

    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    async def until_finished(client, rid):
        for _ in range(1000):  # bounded: one batch per engine step
            if any(d.request_id == rid and d.finish_reason for d in await client.get_output()):
                return
        raise AssertionError(f"{rid} never finished")

    async def main():
        client = await MPCoreClient.start(_mp_config(tiny_llama_dir))
        try:
            await client.add_request(EngineCoreRequest("gone", [5, 6, 7], sp))
            client.release("gone")  # the server popped and moved on before the core's report arrived
            await until_finished(client, "gone")  # its report came with (or before) its only token
            assert client._first_scheduled == {}
            await client.add_request(EngineCoreRequest("kept", [5, 6, 7], sp))
            await until_finished(client, "kept")
            assert client.pop_first_scheduled("kept") is not None  # live requests still get their time
            client.release("kept")
            assert client._first_scheduled == {} and client._live == set()
            # AsyncLLM releases every request it ran, consumed to the end or closed early
            eng = AsyncLLM(client.config, client=client)
            async for _ in eng.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=2), "done"):
                pass
            stream = eng.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), "left")
            await anext(stream)
            await stream.aclose()
            assert client._first_scheduled == {} and client._live == set()
            # (one core start serves both tests: spawning one costs seconds)
            await _sigkill_fails_waiters_and_reports_why(eng, client)
        finally:
            await client.shutdown()

    asyncio.run(asyncio.wait_for(main(), 120))


async def _sigkill_fails_waiters_and_reports_why(eng, client):
    stream = eng.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), "r")
    await anext(stream)
    os.kill(client.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        async for _ in stream:
            pass
    reason = await asyncio.wait_for(eng.wait_dead(), 10)
    assert "SIGKILL" in reason and eng.errored and "SIGKILL" in eng.dead_reason
    assert client._first_scheduled == {} and client._live == set()
    with pytest.raises(EngineDeadError):
        await client.add_request(EngineCoreRequest("late", [5, 6, 7], SamplingParams(max_tokens=1)))



def test_send_to_a_core_with_no_reader_fails_when_it_dies():
    """A PUSH socket with no live peer blocks a send forever; the core's death must end the wait."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.core_client import MPCoreClient

    async def main():
        client = MPCoreClient(EngineConfig())  # sockets made, no core process: nothing reads
        try:
            add = asyncio.create_task(client.add_request(EngineCoreRequest("r", [5], SamplingParams(max_tokens=1))))
            for _ in range(10):
                await asyncio.sleep(0)
            assert not add.done()  # blocked in the send
            client._mark_dead("engine core process 1 died (killed by signal SIGKILL)")
            with pytest.raises(EngineDeadError, match="SIGKILL"):
                await asyncio.wait_for(add, 10)
            await client.abort(["r"])  # a no-op on a dead core, never a hang
        finally:
            await client.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_socket_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """A frontend killed before shutdown leaves its socket folder; the next one removes the folders of PIDs that
    are gone, and nothing else."""
    import subprocess
    import sys
    import tempfile

    from tokenmill.engine.core_client import make_ipc_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"tokenmill-core-{gone.pid}-abc"
    live = tmp_path / f"tokenmill-core-{os.getppid()}-def"  # the pytest runner's parent: running
    other = [tmp_path / "tokenmill-core-xyz", tmp_path / "someone-else-1"]
    for d in (stale, live, *other):
        d.mkdir()
        (d / "in").touch()
    made = make_ipc_dir()
    assert os.path.dirname(made) == str(tmp_path) and os.path.basename(made).startswith(f"tokenmill-core-{os.getpid()}-")
    assert not stale.exists() and live.exists() and all(d.exists() for d in other)
