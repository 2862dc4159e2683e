"""The engine core process runs on the cores it is given (every thread) with one torch thread per core."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.cpu_affinity import format_cpu_list
from tokenmill.engine.args import engine_config
from tokenmill.engine.core_client import MPCoreClient
from tokenmill.engine.errors import EngineDeadError


def thread_affinities(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_core_process_is_pinned_with_one_thread_per_core(tiny_llama_dir):
    before = os.sched_getaffinity(0)
    last = max(before)
    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128,
                        cpu_cores=str(last))

    async def run() -> None:
        client = await MPCoreClient.start(cfg)
        try:
            affinities = thread_affinities(client.pid)
            assert len(affinities) > 1 and all(a == {last} for a in affinities)  # zmq's and torch's threads too
            assert (client.model_info["num_threads"], client.model_info["cpu_cores"]) == (1, str(last))
            assert os.sched_getaffinity(0) == before  # only the core process is pinned
        finally:
            await client.shutdown()

    asyncio.run(run())


def test_core_process_unpinned_uses_the_affinity_mask(tiny_llama_dir):
    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=128,
                        num_threads=1)

    async def run() -> None:
        client = await MPCoreClient.start(cfg)
        try:
            assert os.sched_getaffinity(client.pid) == os.sched_getaffinity(0)
            assert client.model_info["num_threads"] == 1
            assert client.model_info["cpu_cores"] == format_cpu_list(os.sched_getaffinity(0))
        finally:
            await client.shutdown()

    asyncio.run(run())


def test_core_start_fails_clearly_on_a_core_it_may_not_use(tiny_llama_dir):
    # EngineConfig built directly (not through engine_config's check): the core itself refuses.
    bad = max(os.sched_getaffinity(0)) + 1
    cfg = EngineConfig(model=ModelConfig(model=str(tiny_llama_dir), max_model_len=128),
                       cache=CacheConfig(block_size=4, num_gpu_blocks_override=64), cpu_cores=(bad,))

    async def run() -> None:
        with pytest.raises(EngineDeadError, match=rf"invalid cpu_cores={bad}: .* not available; "
                                                  "this process may use cores"):
            await MPCoreClient.start(cfg)

    asyncio.run(run())


_OFFLINE = """
import json, os, sys, torch
from tokenmill import LLM, SamplingParams
llm = LLM(sys.argv[1], cpu_cores=sys.argv[2], dtype="float32", block_size=4, num_gpu_blocks_override=64,
          max_model_len=128)
out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
print(json.dumps({"cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "tokens": len(out[0].outputs[0].token_ids)}))
"""


def test_offline_llm_takes_cpu_cores_and_pins_its_process(tiny_llama_dir):
    # A fresh process: LLM runs the runner in the caller's process, which it pins.
    last = max(os.sched_getaffinity(0))
    res = subprocess.run([sys.executable, "-c", _OFFLINE, str(tiny_llama_dir), str(last)], capture_output=True,
                         text=True, timeout=300, check=False, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"cores": [last], "threads": 1, "tokens": 2}
