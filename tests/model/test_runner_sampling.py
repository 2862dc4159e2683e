"""Seeded sampling through the runner: independent of batch mates, continues exactly after preemption."""

from __future__ import annotations

from tests.model.harness import run_requests
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.engine.outputs import ScheduledSeq, SchedulerOutput, SeqSetup
from tokenmill.executor.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams

PROMPT = [1, 40, 41, 42, 43, 44, 45]


def _runner(folder) -> ModelRunner:
    cfg = EngineConfig(model=ModelConfig(model=str(folder), dtype="float32"), cache=CacheConfig(block_size=4, num_gpu_blocks_override=64))
    return ModelRunner(cfg)


def _ids(out):
    return [t.token_id for t in out]


def test_seeded_output_independent_of_batch_mates(tiny_qwen2_dir):
    runner = _runner(tiny_qwen2_dir)
    sp = SamplingParams(temperature=1.5, max_tokens=8, seed=11, ignore_eos=True)
    alone = _ids(run_requests(runner, [PROMPT], [sp], seeds=[11])[0])
    mates = [SamplingParams(temperature=1.0, max_tokens=6), sp, SamplingParams(temperature=0.0, max_tokens=8)]
    together = run_requests(runner, [[1, 9, 9, 9], PROMPT, [1, 100, 101]], mates, seeds=[None, 11, None], arrivals=[0, 1, 0])
    assert _ids(together[1]) == alone
    other_seed = _ids(run_requests(runner, [PROMPT], [sp], seeds=[12])[0])
    assert other_seed != alone


def test_seeded_sequence_continues_after_recompute(tiny_llama_dir):
    runner = _runner(tiny_llama_dir)
    sp = SamplingParams(temperature=1.2, max_tokens=6, seed=5, ignore_eos=True)
    full = _ids(run_requests(runner, [PROMPT], [sp], seeds=[5])[0])
    # Re-enter as after preemption: prompt + first 3 outputs recomputed, output ids sent in the setup.
    runner.execute(SchedulerOutput([], finished_seq_ids=["s0"]))
    tokens = PROMPT + full[:3]
    setup = SeqSetup(sp, PROMPT, full[:3], 5, [])
    out = runner.execute(SchedulerOutput([ScheduledSeq("r", tokens, 0, [[1, 2, 3]], True, setup)]))
    assert out.sampled[0].token_id == full[3]
