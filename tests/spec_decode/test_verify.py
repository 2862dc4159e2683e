"""Verification of drafts: greedy acceptance, and rejection sampling that keeps the target distribution
(chi-square on a tiny vocabulary, fixed seed, bounded sample count)."""

import torch

from tokenmill.engine.outputs import ScheduledSeq
from tokenmill.layers.sampler import Sampler, SeqSamplingState
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.verify import accept, row_states

V = 6
# chi-square quantile for 5 degrees of freedom at p = 0.999
CHI2_5_999 = 20.52


def _seq(drafts: list[int]) -> ScheduledSeq:
    return ScheduledSeq(seq_id="s", token_ids=[1, *drafts], start_pos=0, block_ids=[[1]], sample=True,
                        num_draft_tokens=len(drafts))


def _verify(logits_rows: torch.Tensor, drafts: list[int], copies: int, params: SamplingParams, seed: int = 0):
    """Verify the same drafts `copies` times in one sampler call; the emitted token lists."""
    seqs = [_seq(drafts) for _ in range(copies)]
    states = row_states(seqs, [SeqSamplingState(params=params, prompt_token_ids=[1]) for _ in seqs])
    logits = logits_rows.repeat(copies, 1).clone()
    gen = torch.Generator().manual_seed(seed)
    rows = Sampler(V, torch.device("cpu"))(logits, states, gen)
    return [[r.token_id for r in emitted] for emitted in accept(seqs, rows)]


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_accepts_the_matching_prefix_then_corrects():
    logits = torch.tensor([[0, 5, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0], [0, 0, 0, 0, 5, 0]], dtype=torch.float32)
    greedy = SamplingParams(temperature=0.0)
    assert _verify(logits, [1, 2], 1, greedy) == [[1, 2, 4]]  # both accepted, then the bonus token
    assert _verify(logits, [1, 3], 1, greedy) == [[1, 2]]  # second rejected: the target's token replaces it
    assert _verify(logits, [0, 2], 1, greedy) == [[1]]


def test_rejection_sampling_keeps_the_target_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, V) * 1.5
    probs = torch.softmax(logits, dim=-1)
    d1 = int(probs[0].argsort(descending=True)[1])  # the second most likely: both outcomes frequent
    d2 = int(probs[1].argmax())
    n = 6000
    out = _verify(logits, [d1, d2], n, SamplingParams(temperature=1.0))
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).float()
    assert _chi2(first, probs[0]) < CHI2_5_999, (first / n, probs[0])
    # after an accepted d1, the next token follows the target's second row
    second = torch.bincount(torch.tensor([o[1] for o in out if o[0] == d1]), minlength=V).float()
    assert second.sum() > 300
    assert _chi2(second, probs[1]) < CHI2_5_999, (second / second.sum(), probs[1])
    accept_rate = sum(o[0] == d1 for o in out) / n
    assert abs(accept_rate - float(probs[0, d1])) < 0.03


def test_rejection_sampling_after_temperature_and_top_k():
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    params = SamplingParams(temperature=0.7, top_k=4)
    x = logits[0] / 0.7
    kth = x.topk(4).values[-1]
    target = torch.softmax(x.masked_fill(x < kth, float("-inf")), dim=-1)
    draft = int(target.argmax())
    out = _verify(logits, [draft], 5000, params, seed=3)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=V).float()
    keep = target > 0
    assert first[~keep].sum() == 0, "a token outside top_k was emitted"
    assert _chi2(first[keep], target[keep]) < 16.27  # 3 degrees of freedom, p = 0.999


def test_seeded_rows_use_their_output_index():
    """Row j of a seeded sequence gets its own generator (seeded by the runner from its output index)."""
    params = SamplingParams(temperature=1.0, seed=5)
    st = SeqSamplingState(params=params, prompt_token_ids=[1], output_token_ids=[4, 4], generator=torch.Generator(),
                          seed=5)
    rows = row_states([_seq([2, 3])], [st])
    assert rows[0] is st
    assert [len(r.output_token_ids) for r in rows] == [2, 3, 4]
    assert rows[1].output_token_ids == [4, 4, 2] and rows[2].output_token_ids == [4, 4, 2, 3]
    assert len({id(r.generator) for r in rows}) == 3
