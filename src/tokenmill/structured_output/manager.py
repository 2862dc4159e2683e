"""StructuredOutputManager: the engine core's one seam to constrained decoding.

One xgrammar GrammarCompiler per model (with its cache), built lazily from the tokenizer and the model's
logits width (Gemma's 262,144 is wider than its tokenizer; the bitmask must cover every logit). Grammars
compile in a thread pool off the step loop: the scheduler parks a constrained request until poll() reports
its grammar ready (or failed: invalid, or over the compile timeout), so unconstrained requests never wait.
Each sequence (each of n samples) gets its own GrammarMatcher; its state follows the sequence's output
tokens, which preemption by recompute keeps, so a preempted sequence resumes with its matcher as it was.

Invariant: a seq id is in `_matchers` from add_seq() until remove_seq(); a request id is in `_pending`
from submit() until poll() reports it or cancel() drops it.
"""

from __future__ import annotations

import bisect
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.stats import GRAMMAR_COMPILE_BUCKETS_S
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured_output.compile import (
    DEFAULT_MAX_JSON_WHITESPACE,
    compile_params,
)


@dataclass(slots=True)
class GrammarBitmask:
    """One step's mask for the sampled rows: `bitmask` [rows, ceil(width / 32)] int32 (a torch tensor),
    `indices` the constrained rows (the only ones masked; unconstrained rows are left open)."""

    bitmask: Any
    indices: list[int]


def apply_bitmask(logits: Any, mask: GrammarBitmask) -> None:
    """Set disallowed logits of the constrained rows to -inf, in place (xgrammar's batched CPU/CUDA kernel)."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, mask.bitmask.to(logits.device, non_blocking=True),
                                    indices=mask.indices)


@dataclass(slots=True)
class _Pending:
    future: Future
    submitted: float  # time.monotonic()


@dataclass(slots=True)
class CompileStats:
    """Cumulative figures for metrics (copied into SchedulerStats). `compile_seconds_buckets[i]` counts
    compiles that took <= GRAMMAR_COMPILE_BUCKETS_S[i] (Prometheus' cumulative `le` buckets; the +Inf
    bucket is num_compiles)."""

    num_constrained_requests: int = 0
    num_compile_failures: int = 0
    num_compiles: int = 0
    compile_seconds_sum: float = 0.0
    compile_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(GRAMMAR_COMPILE_BUCKETS_S))


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, logits_width: int, stop_token_ids: list[int], *,
                 compile_timeout_s: float = 30.0, compile_threads: int = 2,
                 max_json_whitespace: int = DEFAULT_MAX_JSON_WHITESPACE) -> None:
        if compile_timeout_s <= 0:
            raise ValueError(f"invalid grammar_compile_timeout_s={compile_timeout_s}: must be > 0")
        self.tokenizer = tokenizer
        self.logits_width = logits_width
        self.stop_token_ids = list(stop_token_ids)
        self.compile_timeout_s = compile_timeout_s
        self.compile_threads = max(1, compile_threads)
        self.max_json_whitespace = max_json_whitespace
        self._pool: ThreadPoolExecutor | None = None
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._matchers: dict[str, Any] = {}
        self._batch_matcher = None
        self._bitmask = None  # reused [rows, words] int32 buffer
        self.stats = CompileStats()

    # ---- compile (worker threads) -------------------------------------------------------------
    def _get_compiler(self):
        with self._compiler_lock:  # the first compile builds it (TokenizerInfo of a 262k vocab takes ~1 s)
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.logits_width,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.compile_threads)
            return self._compiler

    def _compile(self, params: StructuredOutputsParams) -> tuple[Any, float]:
        t0 = time.monotonic()
        compiled = compile_params(self._get_compiler(), params, self.max_json_whitespace)
        return compiled, time.monotonic() - t0

    # ---- requests (step loop thread) ----------------------------------------------------------
    def submit(self, request_id: str, params: StructuredOutputsParams) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.compile_threads, thread_name_prefix="grammar-compile")
        self._pending[request_id] = _Pending(self._pool.submit(self._compile, params), time.monotonic())
        self.stats.num_constrained_requests += 1

    def poll(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Finished compiles: ({request_id: compiled grammar}, {request_id: error message}).
        A compile still running past the timeout is reported failed (its thread finishes in the background;
        the result is dropped)."""
        ready: dict[str, Any] = {}
        failed: dict[str, str] = {}
        now = time.monotonic()
        for rid, p in list(self._pending.items()):
            if not p.future.done():
                if now - p.submitted > self.compile_timeout_s:
                    p.future.cancel()
                    failed[rid] = self._timeout_msg()
                continue
            try:
                compiled, seconds = p.future.result()
            except ValueError as e:
                failed[rid] = str(e)
            except Exception as e:  # noqa: BLE001 - anything else from xgrammar fails the request, never the core
                failed[rid] = f"invalid structured_outputs: grammar compile failed: {e!r}"
            else:
                # Measured from submission: time in the pool's queue counts against the timeout too.
                if now - p.submitted > self.compile_timeout_s:
                    failed[rid] = self._timeout_msg()
                else:
                    ready[rid] = compiled
                self._record(seconds)
        for rid in (*ready, *failed):
            del self._pending[rid]
        self.stats.num_compile_failures += len(failed)
        return ready, failed

    def _timeout_msg(self) -> str:
        return (f"structured_outputs: grammar not compiled within grammar_compile_timeout_s="
                f"{self.compile_timeout_s}s; simplify the constraint or raise the timeout")

    def _record(self, seconds: float) -> None:
        st = self.stats
        st.num_compiles += 1
        st.compile_seconds_sum += seconds
        for i in range(bisect.bisect_left(GRAMMAR_COMPILE_BUCKETS_S, seconds), len(GRAMMAR_COMPILE_BUCKETS_S)):
            st.compile_seconds_buckets[i] += 1

    def wait(self, timeout_s: float) -> None:
        """Block until some pending compile finishes or timeout_s passes (an otherwise idle step loop)."""
        futures = [p.future for p in self._pending.values()]
        if futures:
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def cancel(self, request_id: str) -> None:
        """Abort: drop a pending compile (cancelled if it has not started)."""
        p = self._pending.pop(request_id, None)
        if p is not None:
            p.future.cancel()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ---- sequences ----------------------------------------------------------------------------
    def add_seq(self, seq_id: str, compiled: Any, stop_token_ids: list[int], output_token_ids: list[int]) -> str | None:
        """A matcher for one sequence, advanced over tokens it already has; an error message if they do not
        fit the grammar."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)
        self._matchers[seq_id] = matcher
        for i, t in enumerate(output_token_ids):
            if not matcher.accept_token(t):
                return self._reject_msg(seq_id, t, i)
        return None

    def remove_seq(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)

    def is_constrained(self, seq_id: str) -> bool:
        return seq_id in self._matchers

    def accept(self, seq_id: str, token_id: int, position: int) -> str | None:
        """Advance the sequence's matcher; an error message when the grammar rejects the token."""
        if not self._matchers[seq_id].accept_token(token_id):
            return self._reject_msg(seq_id, token_id, position)
        return None

    def is_terminated(self, seq_id: str) -> bool:
        """The grammar is complete and its stop token accepted: the sequence is done."""
        return self._matchers[seq_id].is_terminated()

    @staticmethod
    def _reject_msg(seq_id: str, token_id: int, position: int) -> str:
        return (f"structured_outputs: token {token_id} at output position {position} of {seq_id} does not fit "
                f"the grammar; the sequence was stopped rather than return output that breaks the constraint")

    def valid_prefix(self, seq_id: str, drafts: list[int]) -> int:
        """How many leading draft tokens the sequence's grammar accepts (the matcher is left unchanged)."""
        matcher = self._matchers[seq_id]
        n = 0
        for t in drafts:
            if matcher.is_terminated() or not matcher.accept_token(t):
                break
            n += 1
        if n:
            matcher.rollback(n)
        return n

    def bitmask(self, seq_ids: list[str], drafts: dict[str, list[int]] | None = None) -> GrammarBitmask | None:
        """The step's mask for the sampled rows in `seq_ids` order; None when none of them is constrained.
        A sequence verifying drafts has 1 + len(drafts) rows: row j is the mask after its first j drafts (the
        matcher advances over them to fill the rows, then rolls back)."""
        drafts = drafts or {}
        row_of: list[int] = []  # first row of each sequence
        rows = 0
        for sid in seq_ids:
            row_of.append(rows)
            rows += 1 + len(drafts.get(sid, ()))
        indices = [row_of[i] for i, sid in enumerate(seq_ids) if sid in self._matchers]
        if not indices:
            return None
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = xgr.allocate_token_bitmask(max(rows, 64), self.logits_width)
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=self.compile_threads)
        mask = self._bitmask[:rows]
        plain = [(self._matchers[sid], row_of[i]) for i, sid in enumerate(seq_ids)
                 if sid in self._matchers and not drafts.get(sid)]
        if len(plain) == 1:
            plain[0][0].fill_next_token_bitmask(mask, plain[0][1])
        elif plain:
            self._batch_matcher.batch_fill_next_token_bitmask([m for m, _ in plain], mask, [r for _, r in plain])
        for i, sid in enumerate(seq_ids):
            if sid in self._matchers and drafts.get(sid):
                indices.extend(self._fill_draft_rows(self._matchers[sid], drafts[sid], mask, row_of[i]))
        return GrammarBitmask(mask, sorted(indices))

    @staticmethod
    def _fill_draft_rows(matcher: Any, drafts: list[int], mask: Any, row: int) -> list[int]:
        """Rows row+1.. for a sequence's drafts (row itself is counted by the caller). The scheduler trimmed
        the drafts to what the grammar accepts, so each advance succeeds."""
        matcher.fill_next_token_bitmask(mask, row)
        extra = []
        accepted = 0
        for j, t in enumerate(drafts, start=1):
            if not matcher.accept_token(t):
                break
            accepted += 1
            matcher.fill_next_token_bitmask(mask, row + j)
            extra.append(row + j)
        if accepted:
            matcher.rollback(accepted)
        return extra

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
