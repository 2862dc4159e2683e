"""Incremental detokenizer: multi-byte UTF-8 across tokens, SentencePiece spaces, stop strings + hold-back."""

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello world! café naïve 日本語 🙂 über, and 🙂🙂 more."


@pytest.fixture(scope="module")
def bytelevel_tok(tmp_path_factory):
    from tests.fixtures.tiny_models import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("detok_bl"))


@pytest.fixture(scope="module")
def sentencepiece_tok():
    """A SentencePiece-style (Metaspace '▁') BPE tokenizer trained locally."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([TEXT, "Hello there, world. How are you?"] * 5, vocab_size=120, min_frequency=1,
                           special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _stream(tok, ids, prompt=(), **kw):
    d = IncrementalDetokenizer(tok, list(prompt), **kw)
    pieces = [d.process([t]) for t in ids]
    pieces.append(d.process([], finished=True))
    return pieces, d


@pytest.mark.parametrize("which", ["bytelevel_tok", "sentencepiece_tok"])
def test_streamed_text_equals_full_decode_without_replacement_chars(which, request):
    tok = request.getfixturevalue(which)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    prompt = tok("Say:", add_special_tokens=False)["input_ids"]
    pieces, d = _stream(tok, ids, prompt)
    # in context: what the full decode adds after the prompt (SentencePiece keeps the word's leading space)
    expected = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert "".join(pieces) == expected == d.text
    assert not any("\ufffd" in p for p in pieces)
    if which == "bytelevel_tok":  # multi-byte characters really were split across tokens
        assert sum(1 for p in pieces if p == "") > 0


def test_sentencepiece_leading_space_kept_mid_stream(sentencepiece_tok):
    tok = sentencepiece_tok
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    ids = tok(" world again", add_special_tokens=False)["input_ids"]
    pieces, _ = _stream(tok, ids, prompt)
    assert "".join(pieces).startswith(" world")


def test_skip_special_tokens(bytelevel_tok):
    tok = bytelevel_tok
    ids = tok("Hello world", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    skip = "".join(_stream(tok, ids)[0])
    keep = "".join(_stream(tok, ids, skip_special_tokens=False)[0])
    assert skip == "Hello world" and keep == "Hello world</s>"


def test_stop_string_excluded_and_held_back_while_streaming(bytelevel_tok):
    tok = bytelevel_tok
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces, d = _stream(tok, ids, stop=["fox jumps"])
    assert d.stop_reason == "fox jumps"
    assert d.text == "The quick brown " and "".join(pieces) == d.text
    # nothing that could begin the stop string was shown before the match was known
    shown = ""
    dd = IncrementalDetokenizer(tok, [], stop=["fox jumps"])
    for t in ids:
        shown += dd.process([t])
        assert not shown.endswith("f") and "fox" not in shown
        if dd.stop_reason:
            break
    inc, d2 = _stream(tok, ids, stop=["lazy", "fox"], include_stop_str_in_output=True)
    assert d2.stop_reason == "fox" and "".join(inc) == "The quick brown fox"


def test_stop_string_spanning_tokens_and_earliest_match(bytelevel_tok):
    tok = bytelevel_tok
    ids = tok("Hello world! How are you today?", add_special_tokens=False)["input_ids"]
    _, d = _stream(tok, ids, stop=["today", "ld! H"])
    assert d.stop_reason == "ld! H" and d.text == "Hello wor"
