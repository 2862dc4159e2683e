"""A row whose every token is masked (grammar mask, min_tokens holding back every id) must not turn into NaN:
it yields the argmax of the raw model logits, and with logprobs -inf for every token (never NaN), for greedy,
temperature, top-k / top-p / min-p rows alike; its batch mates sample as usual."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.layers.sampler import Sampler, SeqSamplingState
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.manager import GrammarBitmask

V = 50
CPU = torch.device("cpu")
KINDS = {
    "greedy": {"temperature": 0.0},
    "temperature": {"temperature": 0.8},
    "top_k": {"temperature": 1.0, "top_k": 3},
    "top_p": {"temperature": 1.0, "top_p": 0.5},
    "min_p": {"temperature": 1.0, "min_p": 0.2},
    "penalties": {"temperature": 1.0, "frequency_penalty": 1.0, "repetition_penalty": 1.5},
}


def _state(seed: int | None = None, out=(), **kw) -> SeqSamplingState:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SeqSamplingState(SamplingParams(**kw), [1, 2], list(out), [7], gen, seed)


def _mask(rows: int, allowed: dict[int, list[int]]) -> GrammarBitmask:
    """A bitmask over `rows` rows constraining the rows in `allowed` to those ids (an empty list: none)."""
    words = (V + 31) // 32
    bits = torch.zeros(rows, words, dtype=torch.int32)
    for r, ids in allowed.items():
        for t in ids:
            bits[r, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    return GrammarBitmask(bits, sorted(allowed))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_all_masked_grammar_row_falls_back_to_raw_argmax(kind):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1)) * 3
    states = [_state(seed=4, logprobs=3, **KINDS[kind]), _state(seed=5, logprobs=3, **KINDS[kind]),
              _state(seed=6, **KINDS[kind])]
    rows = Sampler(V, CPU)(logits.clone(), states, torch.Generator().manual_seed(0),
                           _mask(3, {0: [], 1: [11, 12], 2: []}))
    assert rows[0].token_id == int(logits[0].argmax())  # nothing allowed: the model's own top token
    assert rows[0].logprob == -math.inf and rows[0].rank == 1
    assert [lp for _, lp in rows[0].top_logprobs] == [-math.inf] * 3
    assert rows[1].token_id in (11, 12) and not math.isnan(rows[1].logprob)  # its mate: the mask holds
    assert math.isfinite(rows[1].logprob)
    assert rows[2].token_id == int(logits[2].argmax()) and rows[2].logprob is None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_min_tokens_holding_back_every_id_falls_back_to_raw_argmax(kind):
    """min_tokens masks EOS and every stop id; here those cover the whole vocabulary."""
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    everything = list(range(V))
    states = [_state(seed=3, logprobs=2, min_tokens=2, max_tokens=4, stop_token_ids=everything, **KINDS[kind]),
              _state(seed=8, min_tokens=1, max_tokens=4, **KINDS[kind])]
    rows = Sampler(V, CPU)(logits.clone(), states, torch.Generator().manual_seed(0))
    assert rows[0].token_id == int(logits[0].argmax())
    # logprobs come from the raw logits (before min_tokens): finite, and the chosen token ranks first
    assert rows[0].rank == 1 and math.isfinite(rows[0].logprob)
    assert 0 <= rows[1].token_id < V and rows[1].token_id != 7  # the mate's EOS stays held back


def test_all_masked_rows_never_yield_out_of_vocabulary_ids_when_sampling():
    """Raw logits -inf everywhere (nothing to fall back to): the sampler still returns ids inside the vocabulary."""
    logits = torch.full((2, V), -math.inf)
    rows = Sampler(V, CPU)(logits, [_state(seed=s, temperature=1.0, logprobs=1) for s in (1, 2)],
                           torch.Generator().manual_seed(0))
    assert all(0 <= r.token_id < V for r in rows)
