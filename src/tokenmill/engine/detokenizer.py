"""Incremental detokenization with stop strings (front end: runs next to the client, not in the core).

Uses vLLM's prefix/read offsets: each step decodes a short window of tokens twice — up to the last emitted
token and up to the newest — and emits the difference. Decoding in context keeps SentencePiece and
byte-level leading spaces right; a window ending in U+FFFD (a multi-byte UTF-8 character split across
tokens) or in a SentencePiece byte-fallback token (<0xE2>) emits nothing until the character, or the run of
byte tokens, is complete, so the streamed text equals the one-shot decode of the whole sequence.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens kept as context for the first generated tokens


def _is_byte_token(token: str) -> bool:
    """A SentencePiece byte-fallback token such as <0xE2>. Their decoder (tokenizers' ByteFallback) decodes a
    whole run of them at once and, if the run is not valid UTF-8, makes every byte of it U+FFFD, so text
    already valid (b"\x00") changes when an invalid byte (b"\x80") follows."""
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


class IncrementalDetokenizer:
    """Invariants: `text` is the decoded output so far (cut at a stop string when one matched);
    `emitted` <= len(text) characters have been handed out; held back text could start a stop string."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # The ids skip_special_tokens drops, found once: HF's convert_ids_to_tokens(skip_special_tokens=True)
        # rebuilds this set on every call, which was the larger part of the per-token cost.
        self._skip_ids: frozenset[int] = frozenset(tokenizer.all_special_ids if skip_special_tokens else ())
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.tokens: list[str] = self._to_tokens(prompt_token_ids[-(_CONTEXT + 2):])
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - _CONTEXT, 0)
        self.text = ""
        self.emitted = 0
        self.stop_reason: str | None = None
        self.num_consumed = 0  # tokens of the last process() call up to a stop string (all when none matched)

    def _to_tokens(self, ids: list[int]) -> list[str]:
        if self._skip_ids:
            ids = [i for i in ids if i not in self._skip_ids]
        toks = self.tokenizer.convert_ids_to_tokens(ids)
        return [t for t in toks if t is not None]

    def _decode_one(self, token_id: int) -> str:
        new = self._to_tokens([token_id])
        if not new:
            return ""
        self.tokens.extend(new)
        if _is_byte_token(self.tokens[-1]):
            return ""  # a byte run is text only once it ends: a later invalid byte turns it all into U+FFFD
        prefix = self.tokenizer.convert_tokens_to_string(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.convert_tokens_to_string(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return full[len(prefix):]
        return ""

    def process(self, token_ids: list[int], finished: bool = False) -> str:
        """Append tokens; return the text that may be shown now. After a stop string matched
        (`stop_reason` set), the rest is ignored: the caller finishes the sequence and keeps only the first
        `num_consumed` of these tokens (several arrive at once with speculative decoding)."""
        self.num_consumed = len(token_ids)
        if self.stop_reason is None:
            for i, t in enumerate(token_ids):
                added = self._decode_one(t)
                if not added:
                    continue
                self.text += added
                if self.stop and self._match_stop(len(added)):
                    self.num_consumed = i + 1  # tokens after the one completing the stop string are dropped
                    break
        if finished and self.stop_reason is None and self.read_offset < len(self.tokens):
            # the sequence ended inside an incomplete character: show what there is
            prefix = self.tokenizer.convert_tokens_to_string(self.tokens[self.prefix_offset:self.read_offset])
            full = self.tokenizer.convert_tokens_to_string(self.tokens[self.prefix_offset:])
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.tokens)
            if self.stop:  # the held-back tail can hold a stop string too
                self._match_stop(len(full) - len(prefix))
        done = finished or self.stop_reason is not None
        end = len(self.text) if done else len(self.text) - self._holdback()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _match_stop(self, num_new_chars: int) -> bool:
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, max(0, len(self.text) - num_new_chars - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        self.stop_reason = s
        return True

    def _holdback(self) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
