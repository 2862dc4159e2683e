"""Front-end per-request state: SeqOutputDelta from the core -> detokenized CompletionOutput deltas.

Shared by LLM (offline, accumulates whole outputs) and AsyncLLM (streams deltas). A stop string is found
here, so the caller must abort that sequence in the core (`process` says which).
"""

from __future__ import annotations

from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import (
    CompletionOutput,
    Logprob,
    RequestOutput,
    SeqOutputDelta,
)
from tokenmill.engine.prompt_logprobs import to_logprob_dicts
from tokenmill.engine.request import seq_id_of
from tokenmill.sampling_params import SamplingParams


class _SeqState:
    __slots__ = ("cum_logprob", "detok", "error", "finish_reason", "logprobs", "stop_reason", "text", "token_ids")

    def __init__(self, detok: IncrementalDetokenizer | None, want_logprobs: bool) -> None:
        self.detok = detok
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if want_logprobs else None
        self.cum_logprob: float | None = 0.0 if want_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None


class RequestState:
    """Invariants: a finished sample ignores later deltas; `finished` once every sample has a finish_reason."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self._prompt_logprobs_sent = False
        want_lp = params.logprobs is not None
        self.seqs = []
        for _ in range(params.n):
            detok = None
            if params.detokenize and tokenizer is not None:
                detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                               stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            self.seqs.append(_SeqState(detok, want_lp))

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def errors(self) -> list[str]:
        return [s.error for s in self.seqs if s.error]

    def process(self, d: SeqOutputDelta) -> tuple[CompletionOutput | None, str | None]:
        """Apply one core delta. Returns (the CompletionOutput delta or None, seq id to abort in the core)."""
        st = self.seqs[d.index]
        if st.finish_reason is not None:
            return None, None
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = to_logprob_dicts(d.prompt_logprobs, self.params.prompt_logprobs or 0, self._decode)
        finish, stop_reason, abort = d.finish_reason, d.stop_reason, None
        new_ids = d.new_token_ids
        text = ""
        if st.detok is not None:
            shown = new_ids
            if finish == "stop" and shown and not self.params.include_stop_str_in_output:
                # EOS or a stop_token_ids hit ended it: like vLLM, the token stays in token_ids, not in the text.
                shown = shown[:-1]
            text = st.detok.process(shown, finished=finish is not None)
            if st.detok.stop_reason is not None:
                if finish is None:
                    abort = seq_id_of(self.request_id, d.index)
                # a stop string inside several new tokens (speculative decoding): the rest never happened
                new_ids = new_ids[: st.detok.num_consumed]
                finish, stop_reason = "stop", st.detok.stop_reason
        new_lps = self._logprobs(d)[: len(new_ids)] if st.logprobs is not None else None
        st.token_ids.extend(new_ids)
        if new_lps is not None:
            st.logprobs.extend(new_lps)
            st.cum_logprob += sum(lp[t].logprob for lp, t in zip(new_lps, new_ids) if t in lp)
        st.text += text
        if finish is not None:
            st.finish_reason, st.stop_reason, st.error = finish, stop_reason, d.error
        out = CompletionOutput(index=d.index, text=text, token_ids=list(new_ids),
                               cumulative_logprob=st.cum_logprob, logprobs=new_lps,
                               finish_reason=st.finish_reason, stop_reason=st.stop_reason)
        return out, abort

    def _logprobs(self, d: SeqOutputDelta) -> list[dict[int, Logprob]]:
        out = []
        tops = d.new_top_logprobs or [None] * len(d.new_token_ids)
        lps = d.new_logprobs or [None] * len(d.new_token_ids)
        ranks = d.new_ranks or [None] * len(d.new_token_ids)
        for tok, lp, top, known_rank in zip(d.new_token_ids, lps, tops, ranks):
            entry: dict[int, Logprob] = {}
            ranked = list(top or [])[: self.params.logprobs or 0]
            for r, (alt, alt_lp) in enumerate(ranked, start=1):
                entry[int(alt)] = Logprob(float(alt_lp), r, self._decode(alt))
            rank = known_rank or next((r for r, (alt, _) in enumerate(top or [], start=1) if alt == tok), None)
            if lp is not None:
                entry[tok] = Logprob(float(lp), rank, self._decode(tok))
            out.append(entry)
        return out

    def take_prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """The prompt logprobs once they have arrived, for the first streamed output only (vLLM's behaviour)."""
        if self.prompt_logprobs is None or self._prompt_logprobs_sent:
            return None
        self._prompt_logprobs_sent = True
        return self.prompt_logprobs

    def _decode(self, tok: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([tok])

    def abort_all(self) -> None:
        for st in self.seqs:
            if st.finish_reason is None:
                st.finish_reason = "abort"

    def final_output(self) -> RequestOutput:
        outs = [CompletionOutput(index=i, text=s.text, token_ids=list(s.token_ids), cumulative_logprob=s.cum_logprob,
                                 logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for i, s in enumerate(self.seqs)]
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=outs, finished=self.finished, num_cached_tokens=self.num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)
