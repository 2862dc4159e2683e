"""DraftModelProposer on tiny random models: proposals equal the draft's own greedy continuation computed by
transformers (across calls with partial acceptance, rollbacks and evictions), the vocabulary check at load,
and the draft's KV blocks all free again after release."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.tiny_models import TINY_VOCAB_SIZE, build_tiny_model, make_tokenizer
from tokenmill.config import ModelConfig, SpeculativeConfig
from tokenmill.model.loader import load_model
from tokenmill.spec_decode.draft_model import (
    DraftModelProposer,
    common_prefix_len,
    sample_ids,
)
from tokenmill.spec_decode.proposer import ProposalInput


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def copy_draft_dir(tiny_llama_dir, tmp_path_factory):
    """The target itself, in another folder: a draft whose every proposal the target accepts."""
    return shutil.copytree(tiny_llama_dir, tmp_path_factory.mktemp("draft_copy") / "m")


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory):
    """A different, smaller random model with the same tokenizer: it mostly disagrees with the target. (Not
    qwen2: transformers loads that folder's tokenizer as Qwen2Tokenizer, which adds <|endoftext|> as id 512.)"""
    return build_tiny_model(tmp_path_factory.mktemp("draft_other"), "llama", seed=11, num_hidden_layers=1,
                            hidden_size=32, intermediate_size=64)


def _proposer(draft_dir, target, **kw) -> DraftModelProposer:
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("block_size", 4)
    return DraftModelProposer(SpeculativeConfig(method="draft_model", model=str(draft_dir)), target, **kw)


_HF: dict = {}
_GREEDY: dict = {}


def hf_greedy(folder, history: list[int], k: int, vocab: int | None = None) -> list[int]:
    """The draft's own greedy continuation over its first `vocab` ids, by transformers (full recompute per
    token: the oracle)."""
    key = (str(folder), tuple(history), k, vocab)
    if key not in _GREEDY:
        from transformers import AutoModelForCausalLM

        if str(folder) not in _HF:
            _HF[str(folder)] = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        model, ids, out = _HF[str(folder)], list(history), []
        with torch.no_grad():
            for _ in range(k):
                out.append(int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax()))
                ids.append(out[-1])
        _GREEDY[key] = out
    return _GREEDY[key]


def assert_blocks_consistent(proposer: DraftModelProposer) -> None:
    """Every block free or held by exactly one sequence, each holding exactly what its tokens need."""
    kv = proposer.kv
    held = [b for s in kv.seqs.values() for b in s.block_ids]
    assert len(set(held)) == len(held) and not set(held) & set(kv.free_blocks) and 0 not in held + kv.free_blocks
    assert len(held) + kv.num_free_blocks == kv.capacity_blocks
    for seq in kv.seqs.values():
        assert len(seq.block_ids) == math.ceil(len(seq.token_ids) / kv.block_size)


def _next_history(history: list[int], drafts: list[int], accepted: int, rng: random.Random) -> list[int]:
    """What the target would have verified: the first `accepted` drafts, then a token of its own that differs
    from the next draft (a rejection) or any token after a full acceptance."""
    own = drafts[accepted] ^ 1 if accepted < len(drafts) else rng.randrange(3, TINY_VOCAB_SIZE)
    return history + drafts[:accepted] + [own]


@pytest.mark.parametrize("which", ["copy", "other"])
def test_proposals_match_transformers_greedy_across_rollbacks(which, target, copy_draft_dir, other_draft_dir):
    draft_dir = copy_draft_dir if which == "copy" else other_draft_dir
    proposer = _proposer(draft_dir, target)
    rng = random.Random(7)
    histories = {f"s{i}": [1] + [rng.randrange(3, TINY_VOCAB_SIZE) for _ in range(n)]
                 for i, n in enumerate([1, 6, 17, 30])}
    ks = {"s0": 4, "s1": 3, "s2": 4, "s3": 1, "s4": 2}
    for rnd in range(6):
        if rnd == 2:
            histories["s4"] = [1, 50, 60, 70, 80, 90, 100, 110, 120]  # joins mid-run
        # s1 sits out round 3 (not proposed for): its KV waits until it is asked again.
        batch = [ProposalInput(sid, list(h), ks[sid]) for sid, h in histories.items() if (rnd, sid) != (3, "s1")]
        got = proposer.propose(batch)
        assert set(got) == {inp.seq_id for inp in batch}
        for inp in batch:
            assert got[inp.seq_id] == hf_greedy(draft_dir, inp.token_ids, inp.max_tokens), (rnd, inp.seq_id)
        assert_blocks_consistent(proposer)
        for i, inp in enumerate(batch):
            drafts = got[inp.seq_id]
            accepted = [len(drafts), 0, len(drafts) // 2][(rnd + i) % 3]  # full, none, partial in turn
            histories[inp.seq_id] = _next_history(inp.token_ids, drafts, accepted, rng)
    for sid in histories:
        proposer.release(sid)
    assert proposer.kv.num_free_blocks == proposer.kv.capacity_blocks
    assert not proposer.kv.seqs


def test_copy_of_target_proposes_target_greedy(target, copy_draft_dir, tiny_llama_dir):
    """A copy of the target proposes exactly the target's greedy tokens (every draft would be accepted)."""
    proposer = _proposer(copy_draft_dir, target)
    history = [1, 17, 42, 99, 7, 300, 12]
    got = proposer.propose([ProposalInput("a", history, 5)])["a"]
    assert got == hf_greedy(tiny_llama_dir, history, 5)


def test_fewer_drafts_near_max_model_len(tiny_llama_dir, other_draft_dir):
    short_target = load_model(ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=40))
    proposer = _proposer(other_draft_dir, short_target)
    near, full, over = [1] + list(range(10, 47)), [1] + list(range(10, 49)), [1] + list(range(10, 50))
    got = proposer.propose([ProposalInput("near", near, 4), ProposalInput("full", full, 4),
                            ProposalInput("over", over, 4), ProposalInput("zero", near, 0)])
    assert len(near) == 38 and got["near"] == hf_greedy(other_draft_dir, near, 3)  # positions 38, 39 fed: 3 drafts
    assert len(full) == 40 and got["full"] == hf_greedy(other_draft_dir, full, 1)  # position 39 fed: 1 draft
    assert len(over) == 41 and "over" not in got and "zero" not in got
    assert max(len(s.token_ids) for s in proposer.kv.seqs.values()) == 40
    assert set(proposer.kv.seqs) == {"near", "full"}  # nothing held for sequences that cannot propose
    assert_blocks_consistent(proposer)


def test_eviction_under_a_tight_budget_keeps_proposals_exact(target, other_draft_dir):
    """6 blocks of 4 tokens hold one 20-token sequence: the idle one is evicted, prefills again when asked."""
    proposer = _proposer(other_draft_dir, target, num_blocks=7)
    a, b = [1] + list(range(100, 119)), [1] + list(range(200, 219))
    assert proposer.propose([ProposalInput("a", a, 3)])["a"] == hf_greedy(other_draft_dir, a, 3)
    assert proposer.propose([ProposalInput("b", b, 3)])["b"] == hf_greedy(other_draft_dir, b, 3)
    assert set(proposer.kv.seqs) == {"b"}
    assert proposer.propose([ProposalInput("a", a + [5], 2)])["a"] == hf_greedy(other_draft_dir, a + [5], 2)
    # Both in one call do not fit: the first keeps its blocks, the second gets no drafts (and holds nothing).
    got = proposer.propose([ProposalInput("a", a + [5, 6], 3), ProposalInput("b", b + [7], 3)])
    assert got == {"a": hf_greedy(other_draft_dir, a + [5, 6], 3)}
    assert_blocks_consistent(proposer)
    proposer.release("a")
    proposer.release("b")  # unknown by now: a no-op
    assert proposer.kv.num_free_blocks == proposer.kv.capacity_blocks


def test_sliding_window_draft_across_rollbacks(target, tiny_gemma3_dir):
    """A Gemma 3 draft (window 8, two KV cache groups sharing one block table) on histories past its window."""
    proposer = _proposer(tiny_gemma3_dir, target)
    rng = random.Random(3)
    histories = {"a": [1] + list(range(40, 52)), "b": [1] + list(range(300, 325))}
    for rnd in range(4):
        got = proposer.propose([ProposalInput(sid, h, 4) for sid, h in histories.items()])
        for sid, h in histories.items():
            assert got[sid] == hf_greedy(tiny_gemma3_dir, h, 4), (rnd, sid)
            histories[sid] = _next_history(h, got[sid], [0, 2, 4, 1][rnd], rng)
        assert_blocks_consistent(proposer)


def test_gguf_draft(target, other_draft_dir, gguf_cache_dir, tmp_path):
    """The draft as an F32 GGUF file: transformers' GGUF tokenizer conversion appends <|endoftext|> as id 512,
    past the embedding, so the tokenizer has 513 tokens; the 512 usable ids match the target's."""
    from tests.fixtures.gemma import write_gguf_from_hf

    gguf = write_gguf_from_hf(other_draft_dir, tmp_path / "draft.gguf", "llama")
    proposer = _proposer(gguf, target)
    assert len(proposer.draft.tokenizer) == TINY_VOCAB_SIZE + 1 and proposer.vocab_limit == TINY_VOCAB_SIZE
    history = [1, 17, 42, 99, 7, 300, 12, 5, 8]
    assert proposer.propose([ProposalInput("g", history, 4)])["g"] == hf_greedy(other_draft_dir, history, 4)


def test_failed_forward_drops_the_call_sequences(target, other_draft_dir):
    """A forward that raises (here: a token id past the embedding) leaves no state claiming unwritten K/V."""
    proposer = _proposer(other_draft_dir, target)
    ok = [1, 5, 6, 7]
    assert proposer.propose([ProposalInput("idle", ok, 2)])["idle"] == hf_greedy(other_draft_dir, ok, 2)
    with pytest.raises(IndexError):
        proposer.propose([ProposalInput("a", ok, 2), ProposalInput("bad", [1, 5, 10**6], 2)])
    assert set(proposer.kv.seqs) == {"idle"}
    assert_blocks_consistent(proposer)
    assert proposer.propose([ProposalInput("a", ok + [9], 3)])["a"] == hf_greedy(other_draft_dir, ok + [9], 3)


@pytest.fixture(scope="module")
def tight_proposer(target, other_draft_dir):
    return _proposer(other_draft_dir, target, num_blocks=13)


_steps = st.lists(st.tuples(st.sets(st.integers(0, 3), min_size=1),  # which sequences are proposed for
                            st.integers(1, 3),  # k
                            st.lists(st.integers(0, 3), min_size=4, max_size=4),  # accepted drafts per sequence
                            st.sets(st.integers(0, 3)),  # released after the step
                            st.lists(st.integers(0, 6), min_size=4, max_size=4)),  # tokens rewritten (0: none)
                  min_size=1, max_size=4)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(prompt_lens=st.lists(st.integers(1, 14), min_size=4, max_size=4), steps=_steps)
def test_random_acceptance_and_release_leak_no_blocks(tight_proposer, other_draft_dir, prompt_lens, steps):
    """Random proposals, rejections, rewritten histories, releases and evictions (12 blocks of 4 for up to 4
    sequences of up to 33 tokens): the block accounting holds after every call, proposals stay exact, all free
    at the end."""
    proposer, rng = tight_proposer, random.Random(sum(prompt_lens))
    histories = [[1] + [rng.randrange(3, TINY_VOCAB_SIZE) for _ in range(n)] for n in prompt_lens]
    for chosen, k, accepted, released, rewrite in steps:
        for i, n in enumerate(rewrite):  # a history that diverges before its last token (the contract allows it)
            if n:
                kept = histories[i][: max(1, len(histories[i]) - n)]
                histories[i] = kept + [rng.randrange(3, TINY_VOCAB_SIZE) for _ in range(n)]
        batch = [ProposalInput(f"q{i}", list(histories[i]), k) for i in sorted(chosen)]
        got = proposer.propose(batch)
        assert_blocks_consistent(proposer)
        for inp in batch:
            if inp.seq_id in got:  # absent only when the call's sequences do not fit together
                assert got[inp.seq_id] == hf_greedy(other_draft_dir, inp.token_ids, k)
                i = int(inp.seq_id[1:])
                histories[i] = _next_history(inp.token_ids, got[inp.seq_id], min(accepted[i], k), rng)
        assert got, "the first sequence of a call always fits the budget"
        for i in released:
            proposer.release(f"q{i}")
            assert_blocks_consistent(proposer)
    for i in range(4):
        proposer.release(f"q{i}")
    assert proposer.kv.num_free_blocks == proposer.kv.capacity_blocks


# ---- vocabulary check ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("draft_small_vocab"), "llama", seed=4, vocab_size=400)
    make_tokenizer(folder, vocab_size=400)  # its own, smaller tokenizer
    return folder


@pytest.fixture(scope="module")
def swapped_tokens_dir(copy_draft_dir, tmp_path_factory):
    """Same size, same specials, but two ordinary tokens trade ids."""
    folder = shutil.copytree(copy_draft_dir, tmp_path_factory.mktemp("draft_swapped") / "m")
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    x, y = (t for t, i in vocab.items() if i in (100, 300))
    vocab[x], vocab[y] = vocab[y], vocab[x]
    path.write_text(json.dumps(tok))
    return folder


def test_vocabulary_size_mismatch_names_both_models(target, small_vocab_dir, tiny_llama_dir):
    with pytest.raises(ValueError) as err:
        _proposer(small_vocab_dir, target)
    msg = str(err.value)
    assert msg.startswith("speculative_config.model:") and "usable vocabulary sizes differ: 400 vs 512" in msg
    assert str(small_vocab_dir) in msg and str(tiny_llama_dir) in msg
    assert "tokenizer of 400 tokens, vocab_size 400" in msg and "tokenizer of 512 tokens, vocab_size 512" in msg
    assert "must use the target's tokenizer" in msg


def test_token_string_mismatch_is_refused(target, swapped_tokens_dir):
    with pytest.raises(ValueError, match=r"token 100 is .* in the draft and .* in the target"):
        _proposer(swapped_tokens_dir, target)


def test_padded_embedding_is_accepted_and_never_proposed_past_the_target(tmp_path, target):
    """Same tokenizer, wider embedding (checkpoints pad it): accepted; ids >= the target's 512 never proposed."""
    from safetensors.torch import load_file, save_file

    folder = build_tiny_model(tmp_path / "padded", "llama", seed=5, vocab_size=640)
    weights = load_file(str(folder / "model.safetensors"))
    head = weights["lm_head.weight"]
    # Padded rows +-100x real ones: one of each pair has a huge logit, so unmasked they would win every argmax.
    head[TINY_VOCAB_SIZE::2], head[TINY_VOCAB_SIZE + 1::2] = 100 * head[:64], -100 * head[:64]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    proposer = _proposer(folder, target)
    assert proposer.vocab_limit == TINY_VOCAB_SIZE
    history = [1, 5, 9, 200]
    assert hf_greedy(folder, history, 1)[0] >= TINY_VOCAB_SIZE  # the padding would win unmasked
    assert proposer.propose([ProposalInput("p", history, 4)])["p"] == hf_greedy(folder, history, 4, TINY_VOCAB_SIZE)


def test_missing_model_path_is_a_clear_error(target):
    with pytest.raises(ValueError, match="speculative_config.model: a draft model needs a path"):
        DraftModelProposer(SpeculativeConfig(method="draft_model"), target, max_num_seqs=1)


def test_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix_len([], [1]) == 0
    ids = sample_ids(262144)
    assert ids[:256] == list(range(256)) and ids[-1] == 262143 and len(ids) < 1600
    assert sample_ids(3) == [0, 1, 2]
