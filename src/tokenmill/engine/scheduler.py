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

from tokenmill.config import CacheConfig, LoRAConfig, SchedulerConfig
from tokenmill.engine.grammar_wait import GrammarWaitQueue
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.lora_slots import LoRASlots
from tokenmill.engine.outputs import (
    KVCacheGroupSpec,
    ModelOutput,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
    SeqOutputDelta,
)
from tokenmill.engine.prompt_logprobs import PromptLogprobsCollector
from tokenmill.engine.request import (
    EngineCoreRequest,
    Request,
    SeqStatus,
    Sequence,
    check_prompt,
)
from tokenmill.engine.stats import SchedulerStats, SpecDecodeCounts

if TYPE_CHECKING:
    from tokenmill.structured_output.manager import StructuredOutputManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, kv_groups: Seq[KVCacheGroupSpec],
                 num_blocks: Seq[int], max_model_len: int, vocab_size: int | None = None,
                 structured: StructuredOutputManager | None = None, lora: LoRAConfig | None = None) -> None:
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
        self.spec_stats = SpecDecodeCounts()
        # Constrained decoding: requests parked (SeqStatus.WAITING_FOR_GRAMMAR) until their grammar compiles.
        self.structured = structured
        self.grammar_waiting = GrammarWaitQueue(structured) if structured is not None else None
        self.lora_slots = LoRASlots(lora)  # at most max_loras distinct adapters running (engine/lora_slots.py)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        n = len(req.prompt_token_ids)
        if req.request_id in self.requests:
            raise ValueError(f"invalid request_id={req.request_id!r}: already in use")
        whole = None if self.config.enable_chunked_prefill else self.config.max_num_batched_tokens
        check_prompt(req.prompt_token_ids, self.max_model_len, self.vocab_size, whole)
        req.params.validate()
        self.lora_slots.check(req)
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
            # a decode with drafts verifies them too: 1 + k new tokens (drafts trimmed to the budget)
            pending = seq.num_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens
            num_new = self._fit_windows(seq, seq.num_computed_tokens, min(pending, budget))
            ok = True
            while not self.kv.allocate_slots(seq, seq.num_computed_tokens, num_new):
                if seq.spec_token_ids:  # drafts never cost a preemption: this step verifies none
                    seq.spec_token_ids = []
                    num_new = min(num_new, seq.num_tokens - seq.num_computed_tokens)
                    continue
                victim = max(self.running, key=self._key)
                if victim is seq and len(self.running) == 1:
                    self._fail(seq, self.kv.never_fits_msg(seq))
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
            end = min(start + num_new, seq.num_tokens)
            drafts = seq.spec_token_ids[: start + num_new - end]  # verified in this step's forward pass
            seq.spec_token_ids = []
            out.append(ScheduledSeq(
                seq_id=sid,
                token_ids=seq.token_slice(start, end) + drafts,
                start_pos=start,
                block_ids=[list(t) for t in self.kv.tables[sid]],
                sample=end == seq.num_tokens,
                setup=setup,
                prompt_logprobs=seq.params.prompt_logprobs if self.prompt_logprobs.wants(sid) else None,
                num_draft_tokens=len(drafts),
                lora_id=seq.lora_id,
            ))
            seq.num_computed_tokens += num_new  # drafts included: update() rolls back the rejected ones
        finished, self._finished_ids = self._finished_ids, []
        mask = None
        if self.structured is not None:
            mask = self.structured.bitmask([s.seq_id for s in out if s.sample],
                                           {s.seq_id: s.draft_ids for s in out if s.num_draft_tokens})
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
            if not self.lora_slots.admits(seq, self.running):
                idx += 1  # its adapter needs a LoRA slot none frees yet; base / running adapters go ahead
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
                    self._fail(seq, self.kv.never_fits_msg(seq))
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
        emitted: dict[str, list[SampledToken]] = {}
        for st in model_out.sampled:
            emitted.setdefault(st.seq_id, []).append(st)
        for s in sched.seqs:
            seq = self.seqs.get(s.seq_id)
            if seq is None:
                continue
            if s.num_draft_tokens and seq.status is SeqStatus.RUNNING:
                self._roll_back_rejected(seq, s.num_draft_tokens, len(emitted.get(s.seq_id, ())))
            if seq.num_computed_tokens >= len(seq.prompt_token_ids):
                seq.prompt_done_once = True
            self.kv.cache_full_blocks(seq)  # after the rollback: a block holding rejected drafts is never hashed
        for chunk in model_out.prompt_logprobs:
            self.prompt_logprobs.record(chunk)
        for seq_id, tokens in emitted.items():
            seq = self.seqs.get(seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue
            delta = self._append_tokens(seq, tokens)
            deltas.append(delta)
            if delta.finish_reason is None and seq_id in model_out.draft_token_ids:
                seq.spec_token_ids = self._usable_drafts(seq, model_out.draft_token_ids[seq_id])
        return deltas

    def _roll_back_rejected(self, seq: Sequence, num_drafts: int, num_emitted: int) -> None:
        """Drafts beyond the accepted ones had K/V written but are not part of the sequence: forget them (their
        slots are overwritten when the sequence gets there; blocks stay in the table until it finishes)."""
        accepted = max(0, num_emitted - 1)
        seq.num_computed_tokens -= num_drafts - accepted
        self.spec_stats.record(num_drafts, accepted)

    def _append_tokens(self, seq: Sequence, tokens: list[SampledToken]) -> SeqOutputDelta:
        """Append this step's tokens (several when drafts were accepted) up to the first that finishes the
        sequence: a stop token or max_tokens inside an accepted run ends it exactly there."""
        constrained = self.structured is not None and self.structured.is_constrained(seq.seq_id)
        kept: list[SampledToken] = []
        reason = stop_reason = None
        for st in tokens:
            if constrained:
                err = self.structured.accept(seq.seq_id, st.token_id, len(seq.output_token_ids))
                if err is not None:  # never hand out a token that breaks the constraint
                    self._fail(seq, err)
                    return self._pending.pop()
            seq.output_token_ids.append(st.token_id)
            self.num_generation_tokens += 1
            kept.append(st)
            reason, stop_reason = seq.check_stop(st.token_id)
            if reason is None and constrained and self.structured.is_terminated(seq.seq_id):
                reason, stop_reason = "stop", st.token_id  # grammar complete: its stop token ended it
            if reason is not None:
                break
        delta = SeqOutputDelta.of_tokens(seq.request_id, seq.index, kept, reason, stop_reason,
                                         len(seq.prompt_token_ids), seq.num_cached_tokens,
                                         self.prompt_logprobs.take(seq.seq_id, seq.prompt_token_ids))
        if reason is not None:
            self._finish(seq, reason, stop_reason)
        return delta

    def _usable_drafts(self, seq: Sequence, drafts: list[int]) -> list[int]:
        """Drafts the next step may verify (a constrained sequence keeps the prefix its grammar accepts)."""
        drafts = drafts[: seq.draft_room()]
        if drafts and self.structured is not None and self.structured.is_constrained(seq.seq_id):
            drafts = drafts[: self.structured.valid_prefix(seq.seq_id, drafts)]
        return drafts

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
        seq.spec_token_ids = []
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

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            **self.kv.stats(),
            **(self.grammar_waiting.stats() if self.grammar_waiting is not None else {}),
            **self.spec_stats.as_stats(),
            **self.lora_slots.stats(self.running, self.waiting),
        )
