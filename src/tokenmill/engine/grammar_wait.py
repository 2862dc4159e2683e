"""Requests parked until their grammar compiles (SeqStatus.WAITING_FOR_GRAMMAR), beside the scheduler's queues.

The structured-output manager compiles off the step loop; this holds each constrained request's sequences
until then, so unconstrained requests never wait behind a compile. No torch, no xgrammar: the manager is
reached only through the calls below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenmill.engine.request import SeqStatus, Sequence

if TYPE_CHECKING:
    from tokenmill.structured_output.manager import StructuredOutputManager


class GrammarWaitQueue:
    """Invariant: a request id is a key exactly while it has parked sequences and a compile submitted."""

    def __init__(self, structured: StructuredOutputManager) -> None:
        self.structured = structured
        self._parked: dict[str, list[Sequence]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._parked.values())

    def __bool__(self) -> bool:
        return bool(self._parked)

    def park(self, request_id: str, seqs: list[Sequence], constraint: Any) -> None:
        for s in seqs:
            s.status = SeqStatus.WAITING_FOR_GRAMMAR
        self._parked[request_id] = seqs
        self.structured.submit(request_id, constraint)

    def release(self, enqueue: Callable[[Sequence], None], fail: Callable[[Sequence, str], None]) -> None:
        """Enqueue the sequences whose grammar is ready (behind those already waiting), fail those whose
        compile failed or timed out."""
        ready, failed = self.structured.poll()
        for rid, compiled in ready.items():
            for seq in self._parked.pop(rid, []):
                err = self.structured.add_seq(seq.seq_id, compiled, seq.eos_token_ids + seq.params.stop_token_ids,
                                              seq.output_token_ids)
                if err is None:
                    enqueue(seq)
                else:
                    fail(seq, err)
        for rid, msg in failed.items():
            for seq in list(self._parked.get(rid, [])):
                fail(seq, msg)

    def drop(self, seq: Sequence) -> None:
        """A parked sequence ends (abort, failed compile): when it was its request's last, drop the compile."""
        parked = self._parked.get(seq.request_id, [])
        if seq in parked:
            parked.remove(seq)
        if not parked:
            self._parked.pop(seq.request_id, None)
            self.structured.cancel(seq.request_id)

    def wait(self, timeout_s: float) -> None:
        """Nothing to run but grammars compiling: block until one is ready rather than spin."""
        if self._parked:
            self.structured.wait(timeout_s)

    def stats(self) -> dict[str, Any]:
        st = self.structured.stats
        return {"num_constrained_requests": st.num_constrained_requests,
                "num_waiting_for_grammar": len(self),
                "num_grammar_compiles": st.num_compiles,
                "num_grammar_compile_failures": st.num_compile_failures,
                "grammar_compile_seconds_sum": st.compile_seconds_sum,
                "grammar_compile_seconds_buckets": list(st.compile_seconds_buckets)}
