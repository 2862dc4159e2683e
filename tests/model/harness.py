"""A minimal step driver for runner tests: hand-built SchedulerOutputs without the real scheduler.

Sequences arrive at given steps, prefill in chunks of `chunk` tokens, then decode one token per step, so
steps mix prefill chunks with decodes. Blocks come from a shuffled free list (non-contiguous tables).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from tokenmill.engine.outputs import SampledToken, ScheduledSeq, SchedulerOutput, SeqSetup
from tokenmill.sampling_params import SamplingParams


@dataclass
class _Seq:
    seq_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    seed: int | None
    computed: int = 0
    blocks: list[list[int]] = field(default_factory=list)
    out: list[SampledToken] = field(default_factory=list)
    started: bool = False


def run_requests(runner, prompts: list[list[int]], params: list[SamplingParams], *, chunk: int = 5,
                 arrivals: list[int] | None = None, seeds: list[int | None] | None = None,
                 rng_seed: int = 0, max_steps: int = 500) -> list[list[SampledToken]]:
    rng = random.Random(rng_seed)
    groups = len(runner.kv_cache_groups)
    free = [list(range(1, n)) for n in runner.num_blocks]
    for f in free:
        rng.shuffle(f)
    seqs = [_Seq(f"s{i}", p, sp, (arrivals or [0] * len(prompts))[i], (seeds or [None] * len(prompts))[i])
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for s in seqs:
        s.blocks = [[] for _ in range(groups)]
    finished: list[str] = []
    for step in range(max_steps):
        batch = []
        for s in seqs:
            if s.arrival > step or len(s.out) >= s.params.max_tokens:
                continue
            if s.computed < len(s.prompt):
                toks = s.prompt[s.computed : s.computed + chunk]
            else:
                toks = [s.out[-1].token_id]
            end = s.computed + len(toks)
            for g in range(groups):
                while len(s.blocks[g]) < math.ceil(end / runner.block_size):
                    s.blocks[g].append(free[g].pop())
            setup = None
            if not s.started:
                setup = SeqSetup(s.params, list(s.prompt), [], s.seed, [])
                s.started = True
            sample = end >= len(s.prompt)
            batch.append((s, ScheduledSeq(s.seq_id, toks, s.computed, [list(b) for b in s.blocks], sample, setup)))
        if not batch:
            break
        out = runner.execute(SchedulerOutput([b for _, b in batch], finished_seq_ids=finished))
        finished = []
        sampled = iter(out.sampled)
        for s, sch in batch:
            s.computed += len(sch.token_ids)
            if sch.sample:
                tok = next(sampled)
                assert tok.seq_id == s.seq_id
                s.out.append(tok)
                if len(s.out) >= s.params.max_tokens:
                    finished.append(s.seq_id)
                    for g in range(groups):
                        free[g].extend(s.blocks[g])
        assert next(sampled, None) is None
    return [s.out for s in seqs]
