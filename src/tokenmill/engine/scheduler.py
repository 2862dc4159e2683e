"""Continuous-batching scheduler (vLLM v1 style): one token budget per step, decodes first, then prefills.

Per step: running sequences (served in policy order) get their next tokens — one for a decode, the rest of
the prompt (chunked to the remaining budget) for a prefill in progress; when blocks run out the running
sequence with the largest policy key (lowest priority, latest arrival) is preempted by recompute. Then, if
nothing was preempted, waiting sequences are admitted in policy order with their prefix-cache hits, while
budget, max_num_seqs and blocks last. The head of the waiting queue is never overtaken by a later request
that also needs blocks or budget, so nothing starves under FCFS.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.grammar_wait import GrammarWaitQueue
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.outputs import (
    KVCacheGroupSpec,
    ModelOutput,
    ScheduledSeq,
    SchedulerOutput,
    SeqOutputDelta,
)
from tokenmill.engine.prompt_logprobs import PromptLogprobsCollector
from tokenmill.engine.request import EngineCoreRequest, Request, SeqStatus, Sequence
from tokenmill.engine.stats import SchedulerStats

if TYPE_CHECKING:
    from tokenmill.structured_output.manager import StructuredOutputManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, kv_groups: Seq[KVCacheGroupSpec],
                 num_blocks: Seq[int], max_model_len: int, vocab_size: int | None = None,
                 structured: StructuredOutputManager | None = None) -> None:
        if config.policy not in ("fcfs", "priority"):
            raise ValueError(f"invalid policy={config.policy!r}: must be 'fcfs' or 'priority'")
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.config = config
        self.use_priority = config.policy == "priority"
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.kv = KVCacheManager(kv_groups, num_blocks, cache.block_size, cache.enable_prefix_caching,
                                 cache.prefix_cache_salt)
        self.requests: dict[str, Request] = {}
        self.seqs: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._finished_ids: list[str] = []  # for the runner to drop per-sequence state
        self._pending: list[SeqOutputDelta] = []  # deltas not tied to a sampled token (errors)
        self.prompt_logprobs = PromptLogprobsCollector()
        self._order = 0
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        # Constrained decoding: requests parked (SeqStatus.WAITING_FOR_GRAMMAR) until their grammar compiles.
        self.structured = structured
        self.grammar_waiting = GrammarWaitQueue(structured) if structured is not None else None

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        n = len(req.prompt_token_ids)
        if req.request_id in self.requests:
            raise ValueError(f"invalid request_id={req.request_id!r}: already in use")
        if n == 0:
            raise ValueError("invalid prompt: it has no tokens; at least one is required")
        if n > self.max_model_len:
            raise ValueError(f"invalid prompt: it has {n} tokens, more than max_model_len={self.max_model_len}")
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            raise ValueError(
                f"invalid prompt: it has {n} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens} while chunked prefill is disabled "
                f"(enable chunked prefill or raise max_num_batched_tokens)")
        if self.vocab_size is not None:
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"invalid prompt_token_ids: {bad[:5]} outside [0, {self.vocab_size})")
        req.params.validate()
        constraint = req.params.structured_outputs
        if constraint is not None and self.structured is None:
            raise ValueError("invalid structured_outputs: this engine has no structured-output backend")
        seqs = [Sequence(req, i, self._order, self.max_model_len) for i in range(req.params.n)]
        self._order += 1
        self.requests[req.request_id] = Request(req.request_id, seqs)
        if req.params.prompt_logprobs is not None:
            self.prompt_logprobs.expect(seqs[0].seq_id)  # per request, as vLLM: sample 0 computes them
        for s in seqs:
            self.seqs[s.seq_id] = s
        if constraint is None:
            for s in seqs:
                self._enqueue(s, front=False)
        else:
            self.grammar_waiting.park(req.request_id, seqs, constraint)
        self.num_prompt_tokens += n

    def abort(self, ids: Iterable[str]) -> None:
        """Abort requests (by request id) or single samples (by seq id); their blocks are freed now."""
        for rid in ids:
            if rid in self.requests:
                targets = list(self.requests[rid].seqs)
            elif rid in self.seqs:
                targets = [self.seqs[rid]]
            else:
                continue
            for s in targets:
                if not s.is_finished:
                    self._finish(s, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self._pending)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.grammar_waiting:
            self.grammar_waiting.release(lambda seq: self._enqueue(seq, front=False), self._fail)
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # seq_id -> num new tokens, in scheduling order
        preempted = False
        self.running.sort(key=self._key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._fit_windows(seq, seq.num_computed_tokens,
                                        min(seq.num_tokens - seq.num_computed_tokens, budget))
            ok = True
            while not self.kv.allocate_slots(seq, seq.num_computed_tokens, num_new):
                victim = max(self.running, key=self._key)
                if victim is seq and len(self.running) == 1:
                    self._fail(seq, self._never_fits_msg(seq))
                    ok = False
                    break
                vi = self.running.index(victim)
                budget += scheduled.pop(victim.seq_id, 0)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    ok = False
                    break
                if vi < i:
                    i -= 1
            if not ok:
                continue  # seq left running; index i now points at the next one
            scheduled[seq.seq_id] = num_new
            budget -= num_new
            i += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled)

        out = []
        for sid, num_new in scheduled.items():
            seq = self.seqs[sid]
            start = seq.num_computed_tokens
            setup = seq.setup() if seq.needs_setup else None
            seq.needs_setup = False
            out.append(ScheduledSeq(
                seq_id=sid,
                token_ids=seq.token_slice(start, start + num_new),
                start_pos=start,
                block_ids=[list(t) for t in self.kv.tables[sid]],
                sample=start + num_new == seq.num_tokens,
                setup=setup,
                prompt_logprobs=seq.params.prompt_logprobs if self.prompt_logprobs.wants(sid) else None,
            ))
            seq.num_computed_tokens += num_new
        finished, self._finished_ids = self._finished_ids, []
        mask = None
        if self.structured is not None:
            mask = self.structured.bitmask([s.seq_id for s in out if s.sample])
        return SchedulerOutput(seqs=out, finished_seq_ids=finished, grammar_bitmask=mask)

    def wait_for_grammars(self, timeout_s: float) -> None:
        """Nothing to run but grammars compiling: block until one is ready rather than spin."""
        if self.grammar_waiting:
            self.grammar_waiting.wait(timeout_s)

    def _admit_waiting(self, budget: int, scheduled: dict[str, int]) -> int:
        cfg = self.config
        idx = 0
        while idx < len(self.waiting) and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[idx]
            if not self._sibling_ready(seq):
                idx += 1  # waits for sample 0's prompt blocks to be cached; others may go ahead
                continue
            if self.prompt_logprobs.wants(seq.seq_id):  # a cached position has no logits: compute them all
                hit, hit_tables = 0, [[] for _ in self.kv.groups]
            else:
                hit, hit_tables = self.kv.find_prefix_hit(seq)
            num_new = seq.num_tokens - hit
            if num_new > budget:
                # Without chunking a prompt runs whole; a resumed sequence longer than the whole
                # budget could never run whole, so it is chunked anyway.
                if not cfg.enable_chunked_prefill and num_new <= cfg.max_num_batched_tokens:
                    break
                num_new = budget
            num_new = self._fit_windows(seq, hit, num_new, hit_tables)
            admitted = self.kv.allocate_slots(seq, hit, num_new, hit_tables)
            while not admitted and self.use_priority and self.running:
                # a higher-priority arrival takes blocks from the lowest-priority running sequence
                victim = max(self.running, key=self._key)
                if self._key(victim) <= self._key(seq):
                    break
                budget += scheduled.pop(victim.seq_id, 0)
                self._preempt(victim)  # re-queued behind seq: its key is larger
                admitted = self.kv.allocate_slots(seq, hit, num_new, hit_tables)
            if not admitted:
                if not self.running:
                    self.waiting.pop(idx)
                    self._fail(seq, self._never_fits_msg(seq))
                    continue
                break
            self.waiting.pop(idx)
            self.kv.record_query(seq.num_tokens, hit)
            if seq.num_computed_tokens == 0 and not seq.output_token_ids:
                seq.num_cached_tokens = hit
            seq.num_computed_tokens = hit
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = num_new
            budget -= num_new
        return budget

    def _fit_windows(self, seq: Sequence, num_computed: int, num_new: int,
                     hit_tables: list[list[int]] | None = None) -> int:
        """A chunk no larger than the sliding-window groups can hold: a prefill there needs its window plus the
        whole chunk at once, which a pool sized for windows may not have. With chunked prefill, what fits now
        (the rest follows next steps); else, or when nothing fits now, what fits once others are preempted
        (a prompt longer than that is chunked even with chunking off: whole, it could never run)."""
        now, emptied = self.kv.window_fit(seq, num_computed, hit_tables)
        if self.config.enable_chunked_prefill and now > 0:
            return min(num_new, now)
        return min(num_new, max(emptied, 1))

    def _sibling_ready(self, seq: Sequence) -> bool:
        """Samples 1..n-1 start once sample 0's prompt blocks are cached, so they share them as hits."""
        if seq.index == 0 or not self.kv.enable_caching:
            return True
        first = self.requests[seq.request_id].seqs[0]
        return first.prompt_done_once or first.is_finished

    # ---- update -------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, model_out: ModelOutput) -> list[SeqOutputDelta]:
        deltas, self._pending = self._pending, []
        for s in sched.seqs:
            seq = self.seqs.get(s.seq_id)
            if seq is None:
                continue
            if seq.num_computed_tokens >= len(seq.prompt_token_ids):
                seq.prompt_done_once = True
            self.kv.cache_full_blocks(seq)
        for chunk in model_out.prompt_logprobs:
            self.prompt_logprobs.record(chunk)
        for st in model_out.sampled:
            seq = self.seqs.get(st.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            constrained = self.structured is not None and self.structured.is_constrained(seq.seq_id)
            if constrained:
                err = self.structured.accept(seq.seq_id, st.token_id, len(seq.output_token_ids))
                if err is not None:  # never hand out a token that breaks the constraint
                    self._fail(seq, err)
                    deltas.append(self._pending.pop())
                    continue
            seq.output_token_ids.append(st.token_id)
            self.num_generation_tokens += 1
            reason, stop_reason = self._check_stop(seq, st.token_id)
            if reason is None and constrained and self.structured.is_terminated(seq.seq_id):
                reason, stop_reason = "stop", st.token_id  # grammar complete: its stop token ended it
            deltas.append(SeqOutputDelta(
                request_id=seq.request_id,
                index=seq.index,
                new_token_ids=[st.token_id],
                new_logprobs=None if st.logprob is None else [st.logprob],
                new_top_logprobs=None if st.top_logprobs is None else [list(st.top_logprobs)],
                new_ranks=None if st.logprob is None else [st.rank],
                finish_reason=reason,
                stop_reason=stop_reason,
                num_prompt_tokens=len(seq.prompt_token_ids),
                num_cached_tokens=seq.num_cached_tokens,
                prompt_logprobs=self.prompt_logprobs.take(seq.seq_id, seq.prompt_token_ids),
            ))
            if reason is not None:
                self._finish(seq, reason, stop_reason)
        return deltas

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in seq.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    # ---- transitions --------------------------------------------------------------------------
    def _key(self, seq: Sequence) -> tuple:
        # fcfs orders by (priority, arrival) too: the same while all priorities are 0, but lower-priority work
        # (Batch API lines) waits behind and is preempted before interactive requests
        return seq.sort_key(True)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        seq.status = SeqStatus.WAITING
        if self.use_priority:
            keys = [self._key(s) for s in self.waiting]
            self.waiting.insert(bisect.bisect(keys, self._key(seq)), seq)
        else:  # fcfs: arrival order within a priority; a preempted sequence goes first in its priority
            prios = [s.priority for s in self.waiting]
            find = bisect.bisect_left if front else bisect.bisect_right
            self.waiting.insert(find(prios, seq.priority), seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.needs_setup = True  # the runner rebuilds its state (penalty counts, generator) on return
        self._finished_ids.append(seq.seq_id)
        self.num_preemptions += 1
        self._enqueue(seq, front=True)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
                error: str | None = None) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.WAITING_FOR_GRAMMAR:
            self.grammar_waiting.drop(seq)
        if self.structured is not None:
            self.structured.remove_seq(seq.seq_id)
        self.kv.free(seq)
        self.prompt_logprobs.drop(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason, seq.error = reason, stop_reason, error
        self._finished_ids.append(seq.seq_id)
        del self.seqs[seq.seq_id]
        req = self.requests.get(seq.request_id)
        if req is not None and req.is_finished:
            del self.requests[seq.request_id]

    def _fail(self, seq: Sequence, msg: str) -> None:
        self._finish(seq, "error", error=msg)
        self._pending.append(SeqOutputDelta(
            request_id=seq.request_id, index=seq.index, new_token_ids=[], finish_reason="error", error=msg,
            num_prompt_tokens=len(seq.prompt_token_ids), num_cached_tokens=seq.num_cached_tokens))

    def fail_seqs(self, seq_ids: Iterable[str], msg: str) -> None:
        """Fail these sequences (e.g. the runner raised on their batch); the engine keeps serving."""
        for sid in seq_ids:
            seq = self.seqs.get(sid)
            if seq is not None:
                self._fail(seq, msg)

    def _never_fits_msg(self, seq: Sequence) -> str:
        return (f"sequence {seq.seq_id} needs KV cache for {seq.num_tokens} tokens, more than the cache holds "
                f"({self.kv.capacity_tokens()} tokens); raise kv_cache_memory or lower max_model_len")

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_blocks_total=self.kv.num_blocks_total,
            num_blocks_free=self.kv.num_blocks_free,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            **(self.grammar_waiting.stats() if self.grammar_waiting is not None else {}),
        )
