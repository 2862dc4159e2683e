"""N-gram (prompt lookup) proposals: the longest suffix match, its latest occurrence, bounds."""

import numpy as np

from tokenmill.config import SpeculativeConfig
from tokenmill.spec_decode.ngram import NgramProposer, find_drafts
from tokenmill.spec_decode.proposer import ProposalInput


def _find(tokens, k=4, lo=1, hi=4):
    return find_drafts(np.array(tokens, dtype=np.int64), k, lo, hi)


def test_longest_suffix_wins_over_a_later_shorter_match():
    # suffix [2, 3]: [2, 3] occurred at 1 (followed by 4, 5); a later lone 3 at 6 is followed by 9
    assert _find([1, 2, 3, 4, 5, 8, 3, 9, 2, 3], k=2) == [4, 5]


def test_latest_occurrence_and_continuation_bounds():
    assert _find([7, 1, 2, 9, 1, 2, 8, 1, 2], k=3) == [8, 1, 2]  # latest earlier [1, 2] is at 4
    assert _find([5, 6, 5], k=4) == [6, 5]  # continuation may be shorter than k
    assert _find([1, 2, 3], k=4) == []
    assert _find([4], k=4) == [] and _find([], k=4) == []


def test_min_length_is_respected():
    assert _find([1, 9, 5, 1], k=2, lo=2, hi=3) == []  # only a 1-token match exists
    assert _find([1, 9, 5, 1], k=2, lo=1, hi=3) == [9, 5]


def test_proposer_tracks_histories_and_bounds_k():
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=2))
    hist = [1, 2, 3, 4, 1, 2]
    assert p.propose([ProposalInput("a", hist, 3)]) == {"a": [3, 4, 1]}
    assert p.propose([ProposalInput("a", hist + [3], 1)]) == {"a": [4]}  # max_tokens lowers k
    assert p.propose([ProposalInput("a", [9, 8, 9], 3)]) == {"a": [8, 9]}  # history replaced: rebuilt
    assert p.propose([ProposalInput("b", [5, 6, 7], 3)]) == {}
    p.release("a")
    p.release("b")
    assert not p._histories


def test_long_history_grows_in_place():
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=2, prompt_lookup_max=4))
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, 20).tolist()
    for _ in range(300):
        drafts = p.propose([ProposalInput("s", hist, 2)]).get("s", [])
        assert drafts == _find(hist, k=2, lo=2, hi=4)
        hist.append(int(rng.integers(0, 50)))
