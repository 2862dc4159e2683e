"""Running penalty counts (layers/penalties.py): equal to the counts rebuilt from the history after any
sequence of steps, preemptions (the runner re-sends the history) and finishes; outputs identical to the
rebuild-every-step formula they replace; rows given back when sequences leave."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill import LLM, SamplingParams
from tokenmill.engine.outputs import SchedulerOutput
from tokenmill.layers.penalties import PenaltyCounts
from tokenmill.layers.sampler import Sampler, SeqSamplingState

V = 40
CPU = torch.device("cpu")


def _histogram(ids: list[int]) -> torch.Tensor:
    """The old rebuild-from-history counts: ids outside the vocabulary ignored."""
    counts = torch.zeros(V)
    for t in ids:
        if 0 <= t < V:
            counts[t] += 1
    return counts


def _state(params: SamplingParams, prompt: list[int], out: list[int]) -> SeqSamplingState:
    return SeqSamplingState(params, list(prompt), list(out))


PEN = SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.3)
token = st.integers(min_value=0, max_value=V + 3)  # a few ids past the vocabulary too
op = st.one_of(
    st.tuples(st.just("new"), st.lists(token, max_size=6), st.lists(token, max_size=4)),
    st.tuples(st.just("step"), st.lists(token, min_size=1, max_size=3)),  # one sampled token per live seq
    st.tuples(st.just("preempt"), st.integers(0, 7)),
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 7)),
)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=25))
def test_running_counts_equal_counts_from_history(ops):
    pc = PenaltyCounts(V, CPU)
    live: list[SeqSamplingState] = []
    for kind, *args in ops:
        if kind == "new":
            live.append(_state(PEN, args[0], args[1]))
        elif kind == "step":
            for i, s in enumerate(live):
                s.output_token_ids.append(args[0][i % len(args[0])])
        elif live and kind == "preempt":  # the runner drops the state and builds a new one from the setup
            i = args[0] % len(live)
            old = live[i]
            pc.release(old)
            live[i] = _state(PEN, old.prompt_token_ids, old.output_token_ids)
        elif live and kind == "finish":
            pc.release(live.pop(args[0] % len(live)))
        elif live and kind == "truncate":  # history rewritten under the sampler: it must recount
            s = live[args[0] % len(live)]
            del s.output_token_ids[len(s.output_token_ids) // 2:]
        if live:
            counts, seen = pc.rows_for(live)
            for r, s in enumerate(live):
                assert torch.equal(counts[r], _histogram(s.output_token_ids))
                assert torch.equal(seen[r], _histogram(s.prompt_token_ids) > 0)
        assert pc.num_used == len({s.penalty_row for s in live if pc.owns(s)})
    for s in live:
        pc.release(s)
    assert pc.num_used == 0 and pc.counts.shape[0] == 0  # idle: memory given back


def _old_penalties(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    """The formula the running counts replace, counts rebuilt from the histories (the code before issue 15)."""
    x = logits.clone()
    for r, s in enumerate(states):
        p = s.params
        out = _histogram(s.output_token_ids)
        if p.repetition_penalty != 1.0:
            seen = (_histogram(s.prompt_token_ids) > 0) | (out > 0)
            rep = torch.tensor(p.repetition_penalty)
            x[r] = torch.where(seen, torch.where(x[r] > 0, x[r] / rep, x[r] * rep), x[r])
        x[r] = x[r] - torch.tensor(p.frequency_penalty) * out - torch.tensor(p.presence_penalty) * (out > 0).float()
    return x


def test_penalised_logits_identical_to_rebuilding_from_history():
    g = torch.Generator().manual_seed(3)
    params = [PEN, SamplingParams(temperature=0.0, frequency_penalty=-1.1),
              SamplingParams(temperature=0.0, repetition_penalty=0.7), SamplingParams(temperature=0.0, presence_penalty=2.0)]
    states = [_state(p, torch.randint(0, V, (5,), generator=g).tolist(), []) for p in params]
    sampler = Sampler(V, CPU)
    for _ in range(30):
        logits = torch.randn(len(states), V, generator=g) * 4
        expected = _old_penalties(logits, states)
        sampler._apply_penalties(logits, states)
        assert torch.equal(logits, expected)
        for s in states:
            s.output_token_ids.append(int(torch.randint(0, V, (1,), generator=g)))
    # a batch where only some rows are penalised leaves the others untouched
    plain = _state(SamplingParams(temperature=0.0), [1, 2], [3, 3])
    logits = torch.randn(2, V, generator=g)
    expected = torch.cat([_old_penalties(logits[:1], states[:1]), logits[1:]])
    sampler._apply_penalties(logits, [states[0], plain])
    assert torch.equal(logits, expected)


def test_a_state_moved_to_another_sampler_gets_its_own_row():
    a, b = Sampler(V, CPU), Sampler(V, CPU)
    s = _state(PEN, [1], [2, 2])
    other = _state(PEN, [5], [6])
    a._apply_penalties(torch.zeros(2, V), [other, s])  # s takes row 1 of a
    logits = torch.zeros(1, V)
    b._apply_penalties(logits, [s])  # b has no row 1: s must be counted afresh there
    assert torch.equal(b.penalty_counts.rows_for([s])[0][0], _histogram([2, 2]))
    a.release(other)
    assert a.penalty_counts.num_used == 1  # s still holds its row in a


def test_penalties_through_preemption_match_an_unpreempted_run(tiny_llama_dir):
    """The runner rebuilds a preempted sequence's row from the re-sent history and frees every row at the end."""
    prompts = [[1] + list(range(30 + 7 * i, 30 + 7 * i + 6 + 3 * i)) for i in range(5)]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                        frequency_penalty=0.6, presence_penalty=0.3)

    def run(num_blocks: int) -> tuple[list[list[int]], LLM]:
        llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, block_size=4,
                  num_gpu_blocks_override=num_blocks, max_num_batched_tokens=64)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
        return [o.outputs[0].token_ids for o in outs], llm

    roomy, _ = run(256)
    tight, llm = run(20)
    assert llm.engine.stats().num_preemptions > 0
    assert tight == roomy
    # rows are held only by states the runner still has (finished ids reach it with the next step) ...
    assert llm.runner.sampler.penalty_counts.num_used == len(llm.runner.states)
    llm.runner.execute(SchedulerOutput([], finished_seq_ids=list(llm.runner.states)))
    assert llm.runner.sampler.penalty_counts.num_used == 0  # ... and given back with them
