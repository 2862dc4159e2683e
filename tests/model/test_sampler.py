"""Sampler: masks, penalties, bias, min_tokens, seeded reproducibility, logprobs from raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.kernels.cpu_kernels import load_cpu_kernels
from tokenmill.layers.sampler import Sampler, SeqSamplingState
from tokenmill.sampling_params import SamplingParams

V = 50
KERNELS = load_cpu_kernels()
# The random draw by torch ops, and by the native kernel (sample_rows) when it is built
DRAWS = [pytest.param(None, id="torch"),
         pytest.param(KERNELS, id="native", marks=pytest.mark.skipif(KERNELS is None, reason="no native kernels"))]


def _state(seed: int | None = None, prompt=(1, 2), out=(), eos=(), **kw) -> SeqSamplingState:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SeqSamplingState(SamplingParams(**kw), list(prompt), list(out), list(eos), gen, seed)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits, states, gen=None, kernels=None):
    return Sampler(V, torch.device("cpu"), kernels)(logits.clone(), states, gen or torch.Generator().manual_seed(123))


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax():
    logits = _logits(3)
    rows = _sample(logits, [_state(temperature=0.0, logprobs=4) for _ in range(3)])
    ref = torch.log_softmax(logits, -1)
    for i, r in enumerate(rows):
        assert r.token_id == int(logits[i].argmax())
        assert r.logprob == pytest.approx(float(ref[i, r.token_id]), abs=1e-6)
        assert r.rank == 1
        assert [t for t, _ in r.top_logprobs] == ref[i].topk(4).indices.tolist()


def test_logprobs_ignore_processing_and_rank_counts_better_tokens():
    logits = _logits(1)
    worst = int(logits[0].argmin())
    r = _sample(logits, [_state(temperature=0.0, logprobs=0, logit_bias={worst: 100.0})])[0]
    assert r.token_id == worst  # the bias decides the token ...
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, worst]), abs=1e-6)  # ... not its logprob
    assert r.rank == V and r.top_logprobs == []


def test_no_logprobs_requested_gives_none():
    r = _sample(_logits(1), [_state(temperature=0.0)])[0]
    assert r.logprob is None and r.top_logprobs is None and r.rank is None


def test_seeded_rows_do_not_depend_on_batch_mates():
    logits = _logits(4, seed=1)
    alone = [_sample(logits[2:3], [_state(seed=7, temperature=1.0)])[0].token_id for _ in range(2)]
    mates = [_state(seed=s, temperature=0.7, top_k=5) for s in (1, 2)] + [_state(seed=7, temperature=1.0), _state(temperature=1.0)]
    together = _sample(logits, mates)[2].token_id
    assert alone[0] == alone[1] == together
    # over many seeds the draws vary (it is really sampling)
    draws = {_sample(logits[2:3], [_state(seed=s, temperature=1.0)])[0].token_id for s in range(40)}
    assert len(draws) > 3


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0] + [-5.0] * (V - 4)])
    def support(**kw):
        return {_sample(logits, [_state(seed=s, temperature=1.0, **kw)])[0].token_id for s in range(60)}
    assert support(top_k=2) == {0, 1}
    # probs ~ 0.64, 0.24, 0.09, 0.03: top_p=0.8 keeps {0, 1}
    assert support(top_p=0.8) == {0, 1}
    assert support(top_p=0.5) == {0}
    # min_p=0.3: keep tokens with prob >= 0.3 * 0.64 = 0.19
    assert support(min_p=0.3) == {0, 1}
    assert len(support()) >= 3


def test_penalties_change_the_choice():
    logits = torch.zeros(1, V)
    logits[0, 3] = 2.0
    logits[0, 4] = 1.5
    assert _sample(logits, [_state(temperature=0.0, out=[3])])[0].token_id == 3
    assert _sample(logits, [_state(temperature=0.0, out=[3], frequency_penalty=1.0)])[0].token_id == 4
    assert _sample(logits, [_state(temperature=0.0, out=[3], presence_penalty=1.0)])[0].token_id == 4
    # repetition penalty covers the prompt too: 2.0 / 2 = 1.0 < 1.5
    assert _sample(logits, [_state(temperature=0.0, prompt=[3], repetition_penalty=2.0)])[0].token_id == 4
    # frequency scales with the count, presence does not
    lg = torch.zeros(1, V)
    lg[0, 3], lg[0, 4] = 2.0, 0.5
    assert _sample(lg, [_state(temperature=0.0, out=[3, 3], frequency_penalty=1.0)])[0].token_id == 4
    assert _sample(lg, [_state(temperature=0.0, out=[3, 3], presence_penalty=1.0)])[0].token_id == 3


def test_penalised_rows_leave_other_rows_alone():
    logits = torch.zeros(2, V)
    logits[:, 3] = 2.0
    rows = _sample(logits, [_state(temperature=0.0, out=[3], frequency_penalty=2.0), _state(temperature=0.0, out=[3])])
    assert rows[0].token_id != 3 and rows[1].token_id == 3


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # the EOS
    assert _sample(logits, [_state(temperature=0.0, logit_bias={9: 20.0})])[0].token_id == 9
    assert _sample(logits, [_state(temperature=0.0, eos=[2], min_tokens=2, max_tokens=5, out=[7])])[0].token_id != 2
    assert _sample(logits, [_state(temperature=0.0, eos=[2], min_tokens=1, max_tokens=5, out=[7])])[0].token_id == 2
    # stop_token_ids are held back too
    logits[0, 11] = 20.0
    r = _sample(logits, [_state(temperature=0.0, eos=[2], stop_token_ids=[11], min_tokens=1, max_tokens=5)])[0]
    assert r.token_id not in (2, 11)


@pytest.mark.parametrize("kernels", DRAWS)
def test_temperature_sampling_follows_the_distribution(kernels):
    logits = torch.full((1, V), -math.inf)
    logits[0, :2] = torch.tensor([math.log(0.8), math.log(0.2)])
    draws = [_sample(logits, [_state(seed=s, temperature=1.0)], kernels=kernels)[0].token_id for s in range(200)]
    assert 0.65 < draws.count(0) / 200 < 0.93
    # unseeded rows use the runner's generator: reproducible given it
    unseeded = [_state(temperature=1.0) for _ in range(8)]
    a = [r.token_id for r in _sample(_logits(8), unseeded, torch.Generator().manual_seed(5), kernels)]
    b = [r.token_id for r in _sample(_logits(8), unseeded, torch.Generator().manual_seed(5), kernels)]
    assert a == b


@pytest.mark.parametrize("kernels", DRAWS)
def test_sampling_over_a_large_vocabulary_keeps_support_and_frequencies(kernels):
    """Inverse-CDF sampling over 262k entries: mass at the very end of the vocabulary (after a long run of
    zero-probability entries) is found with the right frequencies, and masked entries are never chosen."""
    big = 262_144
    logits = torch.full((4, big), -math.inf)
    logits[:, -2] = math.log(0.7)
    logits[:, -1] = math.log(0.3)
    logits[:, 0] = -math.inf  # the first entry stays masked (a u of 0 must not pick it)
    sampler = Sampler(big, torch.device("cpu"), kernels)
    gen = torch.Generator().manual_seed(7)
    picks = []
    for _ in range(100):
        rows = sampler(logits.clone(), [_state(temperature=1.0) for _ in range(4)], gen)
        picks += [r.token_id for r in rows]
    assert set(picks) <= {big - 2, big - 1}
    assert 0.6 < picks.count(big - 2) / len(picks) < 0.8
    # a spread distribution: frequencies of the top token follow its probability
    spread = torch.randn(1, big, generator=torch.Generator().manual_seed(1))
    spread[0, 12345] = 14.0  # ~ half of the mass
    p_top = torch.softmax(spread, -1)[0, 12345].item()
    draws = [sampler(spread.clone(), [_state(seed=s, temperature=1.0)], gen)[0].token_id for s in range(300)]
    assert abs(draws.count(12345) / 300 - p_top) < 0.1


@pytest.mark.skipif(KERNELS is None, reason="no native kernels")
def test_native_draw_is_the_torch_draw_for_the_same_uniforms():
    """The same uniform gives the same token by both paths, but where float rounding of the running sums puts
    u * total on the other side of a step (measured: none of 2,000 here); masked entries never come out; u = 0
    takes the first entry of positive weight; a row of only -inf gives the last index (then the fallback)."""
    g = torch.Generator().manual_seed(3)
    rows, big = 40, 3000
    x = torch.randn(rows, big, generator=g) * 4
    x[torch.rand(rows, big, generator=g) < 0.3] = -math.inf
    agree = 0
    for _ in range(50):
        u = torch.rand(rows, generator=g)
        got = KERNELS.sample_rows(x, u)
        xs = x.clone()
        cdf = xs.sub_(xs.amax(-1, keepdim=True)).exp_().cumsum_(-1)
        want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        agree += int((got == want).sum())
        assert torch.isfinite(x.gather(1, got[:, None])).all()
    assert agree >= 0.995 * 50 * rows
    edge = torch.full((2, 600), -math.inf)
    edge[0, 7], edge[0, 599] = 0.0, 1.0
    assert KERNELS.sample_rows(edge, torch.tensor([0.0, 0.5])).tolist() == [7, 599]
