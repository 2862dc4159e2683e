"""Helpers for torch-free scheduler tests: build schedulers and feed them sampled tokens by hand."""

from __future__ import annotations

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.outputs import KVCacheGroupSpec, ModelOutput, SampledToken, SchedulerOutput
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64,
                   chunked: bool = True, policy: str = "fcfs", caching: bool = True, max_model_len: int = 256,
                   groups: list[KVCacheGroupSpec] | None = None, num_blocks_per_group: list[int] | None = None
                   ) -> Scheduler:
    groups = groups or [KVCacheGroupSpec(layer_ids=[0, 1])]
    counts = num_blocks_per_group or [num_blocks] * len(groups)
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        enable_chunked_prefill=chunked, policy=policy),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        groups, counts, max_model_len, vocab_size=1000)


def req(rid: str, prompt: list[int], max_tokens: int | None = 4, priority: int = 0, arrival: float = 0.0,
        **kw) -> EngineCoreRequest:
    kw.setdefault("temperature", 0.0)
    return EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw),
                             priority=priority, arrival_time=arrival, eos_token_ids=[2])


def run_step(s: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list]:
    """One step: every sequence that samples gets `token`."""
    out = s.schedule()
    sampled = [SampledToken(x.seq_id, token) for x in out.seqs if x.sample]
    return out, s.update(out, ModelOutput(sampled=sampled))


def drain(s: Scheduler, max_steps: int = 1000, token: int = 7) -> list:
    deltas = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return deltas
        deltas += run_step(s, token)[1]
    raise AssertionError("scheduler did not finish")
