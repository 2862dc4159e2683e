"""StructuredOutputManager with a real (tiny, locally trained) tokenizer and xgrammar: compile off the step
loop, per-sequence matchers, one bitmask per batch, timeout, cancel, stats."""

import time

import pytest
import torch

from tests.fixtures.tiny_models import make_tokenizer
from tokenmill.engine.stats import GRAMMAR_COMPILE_BUCKETS_S
from tokenmill.sampling_params import StructuredOutputsParams as S
from tokenmill.structured_output import StructuredOutputManager, apply_bitmask

WIDTH = 640  # wider than the tokenizer (512), as Gemma's LM head is wider than its vocabulary


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("so_tok"))


def _ready(m: StructuredOutputManager, rid: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m.wait(0.1)
        ready, failed = m.poll()
        assert not failed, failed
        if rid in ready:
            return ready[rid]
    raise AssertionError(f"{rid} not compiled in {timeout_s}s")


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_matcher_per_sequence_accepts_rejects_and_terminates(tok):
    eos = tok.convert_tokens_to_ids("</s>")
    m = StructuredOutputManager(tok, WIDTH, [eos])
    m.submit("r", S(choice=["yes", "no"]))
    compiled = _ready(m, "r")
    assert m.add_seq("r#0", compiled, [eos], []) is None
    assert m.add_seq("r#1", compiled, [eos], []) is None
    for t in _ids(tok, "yes"):
        assert m.accept("r#0", t, 0) is None
    assert not m.is_terminated("r#0")
    assert m.accept("r#0", eos, 3) is None
    assert m.is_terminated("r#0")
    # r#1 has its own state: "yes" was never fed to it, and "x" fits neither choice.
    err = m.accept("r#1", _ids(tok, "x")[0], 0)
    assert err is not None and "does not fit the grammar" in err and "r#1" in err
    # Replaying tokens (a rebuilt matcher) rejects output that breaks the grammar.
    assert m.add_seq("r#2", compiled, [eos], _ids(tok, "maybe")) is not None


def test_one_bitmask_masks_only_constrained_rows(tok):
    eos = tok.convert_tokens_to_ids("</s>")
    m = StructuredOutputManager(tok, WIDTH, [eos])
    m.submit("r", S(regex="ab"))
    m.add_seq("r#0", _ready(m, "r"), [eos], [])
    assert m.bitmask(["free#0", "free#1"]) is None  # no constrained row: no mask at all
    mask = m.bitmask(["free#0", "r#0", "free#1"])
    assert mask.indices == [1]
    assert mask.bitmask.shape[1] * 32 >= WIDTH
    logits = torch.randn(3, WIDTH)
    before = logits.clone()
    apply_bitmask(logits, mask)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) in ("a", "ab") for t in allowed), [tok.decode([t]) for t in allowed]
    assert not torch.isfinite(logits[1, 512:]).any()  # ids past the tokenizer are never allowed


def test_compile_timeout_fails_only_that_request(tok):
    m = StructuredOutputManager(tok, WIDTH, [], compile_timeout_s=1e-9)
    m.submit("slow", S(json={"type": "object", "properties": {"a": {"type": "string"}}}))
    deadline = time.monotonic() + 60
    failed = {}
    while "slow" not in failed and time.monotonic() < deadline:
        m.wait(0.1)
        _, failed = m.poll()
    assert "grammar_compile_timeout_s" in failed["slow"]
    assert m.num_pending == 0
    assert m.stats.num_compile_failures == 1


def test_invalid_constraint_fails_in_poll_not_raise(tok):
    m = StructuredOutputManager(tok, WIDTH, [])
    m.submit("bad", S(regex="a(b"))
    deadline = time.monotonic() + 60
    failed = {}
    while "bad" not in failed and time.monotonic() < deadline:
        m.wait(0.1)
        _, failed = m.poll()
    assert failed["bad"].startswith("invalid structured_outputs.regex")


def test_cancel_drops_pending_compile_and_stats_count(tok):
    m = StructuredOutputManager(tok, WIDTH, [], compile_threads=1)
    m.submit("a", S(regex="[0-9]+"))
    m.submit("b", S(regex="[a-z]+"))
    m.cancel("b")
    assert m.num_pending == 1
    _ready(m, "a")
    assert m.num_pending == 0
    st = m.stats
    assert st.num_constrained_requests == 2 and st.num_compiles == 1
    assert st.compile_seconds_sum > 0
    assert st.compile_seconds_buckets[-1] == 1 and len(st.compile_seconds_buckets) == len(GRAMMAR_COMPILE_BUCKETS_S)
    assert st.compile_seconds_buckets == sorted(st.compile_seconds_buckets)  # cumulative


def test_timeout_must_be_positive(tok):
    with pytest.raises(ValueError, match="grammar_compile_timeout_s"):
        StructuredOutputManager(tok, WIDTH, [], compile_timeout_s=0)


def test_bounded_json_strings_refuse_raw_control_characters(tok):
    # xgrammar 0.2.9 lets U+0000-U+001F into strings with maxLength; compile.py tightens that class.
    m = StructuredOutputManager(tok, WIDTH, [])
    m.submit("r", S(json={"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}}))
    compiled = _ready(m, "r")
    assert m.add_seq("r#0", compiled, [], _ids(tok, '{"a":"')) is None
    assert m.accept("r#0", _ids(tok, "\x16")[0], 6) is not None
    assert m.add_seq("r#1", compiled, [], _ids(tok, '{"a":"ok"}')) is None
