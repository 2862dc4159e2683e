"""Property tests of the incremental detokenizer on arbitrary token sequences, with SentencePiece byte-fallback
tokens (<0xE2> ...) that split UTF-8 characters, invalid byte runs, special tokens and '▁' spaces: the streamed
pieces concatenated equal the one-shot decode of the whole sequence (the tokenizer's own decode, without
transformers' clean-up of spaces, which no streaming detokenizer applies), and nothing raises."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.engine.detokenizer import IncrementalDetokenizer

PIECES = ["▁", "▁Hello", "▁world", "▁the", "ing", "é", "日", "本", "🙂", "a", "b", ".", ",", "▁▁", "S", "y", ":",
          "\n", "▁é"]
PROPS = settings(max_examples=150, derandomize=True, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _byte_fallback_tokenizer(strip_leading_space: bool):
    """A Llama / Gemma style tokenizer: '▁' for spaces, the 256 <0xNN> byte tokens, <s> </s> special.
    strip_leading_space: Llama's decoder (drops the space a '▁' puts before the first word); Gemma's keeps it."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip_leading_space else []))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"llama_style": _byte_fallback_tokenizer(True), "gemma_style": _byte_fallback_tokenizer(False)}
VOCAB = len(TOKENIZERS["gemma_style"])
BYTES = {b: 3 + b for b in range(256)}
# ids weighted towards bytes of multi-byte characters (lead bytes 0xC2-0xF4, continuations 0x80-0xBF)
token_id = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([BYTES[b] for b in range(0x80, 0xF5)]),
                     st.sampled_from([BYTES[b] for b in "é日🙂".encode()]))
# prompts of whole pieces: a prompt ending in byte tokens would join the output's byte run, and then no text is
# "the output's" (the one-shot decode rewrites the prompt's own bytes)
STOPS = ["a", "\ufffd", "é", "lo w", "🙂", "e", " ", "日本"]
prompts = st.sampled_from([[], ["S", "a", "y", ":"], ["▁Hello", "▁world"], ["日", "本", "\n"], ["<s>", "▁the"]])


def _expected(tok, prompt_ids: list[int], ids: list[int], skip: bool) -> str:
    decode = lambda x: tok.decode(x, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    before, full = decode(prompt_ids), decode(prompt_ids + ids)
    assert full.startswith(before)  # prompts are whole characters: their text is a prefix
    return full[len(before):]


def _stream(tok, prompt_ids: list[int], ids: list[int], chunks: list[int], skip: bool,
            stop: list[str] | None = None) -> tuple[str, str]:
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip, stop=stop)
    pieces, i = [], 0
    for n in chunks:  # the engine hands over one or several tokens per delta
        if d.stop_reason is not None:
            break
        pieces.append(d.process(ids[i:i + n]))
        i += n
    pieces.append(d.process(ids[i:], finished=True))
    return "".join(pieces), d.text


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@PROPS
@given(ids=st.lists(token_id, max_size=24), prompt=prompts, skip=st.booleans(),
       chunks=st.lists(st.integers(1, 3), max_size=24), stop=st.lists(st.sampled_from(STOPS), max_size=1))
def test_streamed_text_equals_one_shot_decode(name, ids, prompt, skip, chunks, stop):
    tok = TOKENIZERS[name]
    prompt_ids = tok.convert_tokens_to_ids(prompt)
    streamed, text = _stream(tok, prompt_ids, ids, chunks, skip, stop)
    assert streamed == text == _cut(_expected(tok, prompt_ids, ids, skip), stop), (ids, prompt, skip, chunks, stop)


def _cut(full: str, stop: list[str]) -> str:
    """The text a single stop string leaves: everything before its first occurrence."""
    return full[:full.find(stop[0])] if stop and stop[0] in full else full


@pytest.fixture(scope="module")
def bytelevel_tok(tmp_path_factory):
    """The tiny models' byte-level BPE (GPT-2 style: multi-byte characters split across tokens, no <0xNN>)."""
    from tests.fixtures.tiny_models import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("detok_props"))


@PROPS
@given(data=st.data(), skip=st.booleans(), chunks=st.lists(st.integers(1, 3), max_size=24),
       stop=st.lists(st.sampled_from(STOPS), max_size=1))
def test_bytelevel_streamed_text_equals_one_shot_decode(bytelevel_tok, data, skip, chunks, stop):
    tok = bytelevel_tok
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=24))
    prompt_ids = tok("Hello", add_special_tokens=False)["input_ids"]
    streamed, text = _stream(tok, prompt_ids, ids, chunks, skip, stop)
    assert streamed == text == _cut(_expected(tok, prompt_ids, ids, skip), stop), (ids, skip, chunks, stop)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_regression_valid_byte_followed_by_an_invalid_one(name):
    """Found by the property above: <0x00> streamed as "\\x00" at once, but the one-shot decode of the run
    <0x00><0x80> (not UTF-8) is "\\ufffd\\ufffd": the byte run is now held back until it ends."""
    tok = TOKENIZERS[name]
    ids = [BYTES[0x00], BYTES[0x80]]
    assert _stream(tok, [], ids, [1], skip=True) == ("\ufffd\ufffd", "\ufffd\ufffd")
    # a run that is valid UTF-8 ("é" split over two byte tokens) still streams once the run ends
    d = IncrementalDetokenizer(tok, [])
    e_acute = [BYTES[b] for b in "é".encode()]
    assert [d.process([t]) for t in e_acute + [tok.convert_tokens_to_ids("a")]] == ["", "", "éa"]


def test_regression_stop_string_in_the_tail_flushed_at_the_end(bytelevel_tok):
    """Found by the property above: a stop string inside the text held back to the end (here the U+FFFD of a
    lone continuation byte, token 100 '\u00a1') was flushed without the stop check, so it was shown."""
    tok = bytelevel_tok
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    assert _stream(tok, prompt, [100], [], skip=False, stop=["\ufffd"]) == ("", "")
    # and a byte-fallback run completed only by the end of the sequence ("é") is checked too
    sp = TOKENIZERS["gemma_style"]
    assert _stream(sp, [], [BYTES[b] for b in "é".encode()], [1, 1], skip=True, stop=["é"]) == ("", "")
