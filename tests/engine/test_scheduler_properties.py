"""Property tests of the torch-free engine: EngineCore + Scheduler + KV manager under random interleavings.

Hypothesis draws an engine (tiny KV pools that force preemption, chunked prefill budgets, max_num_seqs,
fcfs / priority, prefix caching on or off, an optional sliding-window group) and a list of operations: add
(shared prefixes, n > 1, priorities, max_tokens, stop ids, min_tokens, cache salts), abort (a request or
one sample) and step. A fake runner stands in for the model: it keeps a fake KV cache (each slot holds a
key of the whole prefix up to its position, as real K/V depend on it), checks that every position a step
attends to holds this sequence's own prefix, and samples a token that is a pure function of the history.

After every step: budget and max_num_seqs respected; ref counts == the live block tables' use; every block
in exactly one of held / free / evictable; prefix-cache hashes only on full blocks of computed tokens and
equal to the chain hash of what they hold. At the end (run until idle, bounded): each sample finished
exactly once or was aborted, its tokens are exactly what it generates alone (preemption, chunking and
prefix hits change nothing), and every block is free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.block_pool import cache_extra_keys, hash_block
from tokenmill.engine.core import EngineCore
from tokenmill.engine.outputs import (
    NULL_BLOCK_ID,
    KVCacheGroupSpec,
    ModelOutput,
    SampledToken,
    SchedulerOutput,
)
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.sampling_params import SamplingParams

EOS = 2
VOCAB = 24
MAX_MODEL_LEN = 40


def next_token(history: list[int]) -> int:
    """The fake model: a deterministic function of the whole history, hitting EOS and stop ids now and then."""
    return (sum((i + 1) * t for i, t in enumerate(history)) * 7 + len(history)) % (VOCAB - 1) + 1


@dataclass
class _Loaded:
    max_model_len: int = MAX_MODEL_LEN
    vocab_size: int = VOCAB
    eos_token_ids: list[int] = field(default_factory=lambda: [EOS])
    tokenizer: Any = None


class FakeRunner:
    """Checks what the scheduler hands it against a simulated KV cache; samples next_token(history)."""

    def __init__(self, groups: list[KVCacheGroupSpec], num_blocks: list[int], block_size: int) -> None:
        self.kv_cache_groups, self.num_blocks, self.block_size = groups, num_blocks, block_size
        self.loaded = _Loaded()
        self.hist: dict[str, list[int]] = {}
        self.salt: dict[str, str | None] = {}
        # (group, block, offset) -> (cache_salt, the prefix whose K/V the slot holds)
        self.slots: dict[tuple[int, int, int], tuple[str | None, tuple[int, ...]]] = {}
        self.fail_next = False  # the next batch raises (a runner fault): only its sequences may fail
        self.failed: set[str] = set()
        self.violation: str | None = None

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        try:
            return self._execute(sched)
        except AssertionError as e:  # EngineCore turns runner errors into failed requests: keep it for the test
            self.violation = str(e)
            raise

    def _execute(self, sched: SchedulerOutput) -> ModelOutput:
        for sid in sched.finished_seq_ids:
            self.hist.pop(sid, None)
        if self.fail_next:
            self.fail_next = False
            self.failed |= {s.seq_id for s in sched.seqs}
            raise RuntimeError("injected runner fault")
        sampled = []
        bs = self.block_size
        for s in sched.seqs:
            if s.setup is not None:
                self.hist[s.seq_id] = list(s.setup.prompt_token_ids) + list(s.setup.output_token_ids)
                self.salt[s.seq_id] = s.setup.params.cache_salt
            hist = self.hist[s.seq_id]  # KeyError: scheduled without setup after a preemption
            end = s.start_pos + len(s.token_ids)
            assert s.token_ids and end <= len(hist), (s, hist)
            assert s.token_ids == hist[s.start_pos:end], f"{s.seq_id} fed the wrong tokens"
            for g, (spec, table) in enumerate(zip(self.kv_cache_groups, s.block_ids)):
                for p in range(s.start_pos, end):  # write this chunk's K/V
                    b = table[p // bs]
                    assert b != NULL_BLOCK_ID, f"{s.seq_id} writes position {p} to the null block"
                    self.slots[(g, b, p % bs)] = (self.salt[s.seq_id], tuple(hist[:p + 1]))
                lo = 0 if spec.sliding_window is None else max(0, s.start_pos - spec.sliding_window)
                for p in range(lo, end):  # attend: every visible position holds this sequence's prefix
                    b = table[p // bs]
                    assert self.slots.get((g, b, p % bs)) == (self.salt[s.seq_id], tuple(hist[:p + 1])), (
                        f"{s.seq_id} group {g} position {p} (block {b}) holds another prefix")
            if s.sample:
                assert end == len(hist)
                tok = next_token(hist)
                hist.append(tok)
                sampled.append(SampledToken(s.seq_id, tok))
        return ModelOutput(sampled=sampled)


def reference_output(prompt: list[int], p: SamplingParams) -> tuple[list[int], str]:
    """What a sample generates alone, by the stop rules of the OpenAI / vLLM API."""
    out: list[int] = []
    while True:
        tok = next_token(prompt + out)
        out.append(tok)
        if len(out) >= p.min_tokens and ((not p.ignore_eos and tok == EOS) or tok in p.stop_token_ids):
            return out, "stop"
        if (p.max_tokens is not None and len(out) >= p.max_tokens) or len(prompt) + len(out) >= MAX_MODEL_LEN:
            return out, "length"


# ---- invariants -----------------------------------------------------------------------------------------
def check_step(core: EngineCore, sched: SchedulerOutput) -> None:
    assert core.runner.violation is None, core.runner.violation
    s = core.scheduler
    cfg = s.config
    assert sched.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(sched.seqs) <= cfg.max_num_seqs and len(s.running) <= cfg.max_num_seqs
    assert len({x.seq_id for x in sched.seqs}) == len(sched.seqs)
    check_blocks(core)


def check_blocks(core: EngineCore) -> None:
    s = core.scheduler
    kv = s.kv
    bs = kv.block_size
    assert set(kv.tables) == {q.seq_id for q in s.running}, "only running sequences hold blocks"
    for g, pool in enumerate(kv.pools):
        use = [0] * pool.num_blocks
        for table in (t[g] for t in kv.tables.values()):
            for b in table:
                if b != NULL_BLOCK_ID:
                    use[b] += 1
        free, evictable = set(pool._free), set(pool.evictable_order())
        assert len(free) == len(pool._free) and not free & evictable
        for b in range(1, pool.num_blocks):
            assert pool.ref_cnt[b] == use[b] >= 0, f"group {g} block {b}: ref {pool.ref_cnt[b]}, held {use[b]}"
            held = use[b] > 0
            assert held + (b in free) + (b in evictable) == 1, f"group {g} block {b} not in exactly one state"
            assert (pool.block_hash[b] is not None) == (b in evictable) or held, f"block {b} free but hashed"
        assert {h: b for b, h in enumerate(pool.block_hash) if h is not None} == pool._cached
        for b, h in enumerate(pool.block_hash):  # held or evictable: the hash names what the block holds
            if h is not None:
                check_block_content(core, g, b, h)
    for seq in s.running:  # a hashed block in a table is a full block of computed tokens, of these tokens
        parent = None
        for i, blocks in enumerate(zip(*kv.tables[seq.seq_id])):
            if (i + 1) * bs <= seq.num_tokens:
                extra = cache_extra_keys(kv.deployment_salt, seq.params.cache_salt) if i == 0 else b""
                parent = hash_block(parent, seq.token_slice(i * bs, (i + 1) * bs), extra)
            for g, b in enumerate(blocks):
                h = kv.pools[g].block_hash[b] if b != NULL_BLOCK_ID else None
                if h is not None:
                    assert (i + 1) * bs <= seq.num_computed_tokens, f"{seq.seq_id} block {i} hashed, not computed"
                    assert h == parent, f"{seq.seq_id} block {i} hashed with another content"


def check_block_content(core: EngineCore, g: int, b: int, h: bytes) -> None:
    """A hashed block holds K/V for all its positions (computed), of the prefix its hash names."""
    kv, slots = core.scheduler.kv, core.runner.slots
    bs = kv.block_size
    last = slots.get((g, b, bs - 1))
    assert last is not None, f"group {g} block {b} hashed before its last position was computed"
    salt, prefix = last
    assert len(prefix) % bs == 0
    for off in range(bs - 1):
        assert slots.get((g, b, off)) == (salt, prefix[:len(prefix) - bs + off + 1]), f"block {b} partly stale"
    parent = None
    for i in range(len(prefix) // bs):
        extra = cache_extra_keys(kv.deployment_salt, salt) if i == 0 else b""
        parent = hash_block(parent, prefix[i * bs:(i + 1) * bs], extra)
    assert parent == h, f"group {g} block {b}: its hash names other tokens than it holds"


# ---- strategies ---------------------------------------------------------------------------------------------
tokens = st.integers(3, VOCAB - 1)
add_op = st.tuples(
    st.just("add"), st.integers(0, 2), st.lists(tokens, max_size=10),  # shared prefix index, own suffix
    st.integers(1, 3), st.integers(0, 2),  # n, priority
    st.none() | st.integers(1, 10), st.lists(st.integers(1, VOCAB - 1), max_size=2),  # max_tokens, stop ids
    st.booleans(), st.integers(0, 2), st.sampled_from([None, None, "a", "b"]))  # ignore_eos, min_tokens, salt
abort_op = st.tuples(st.just("abort"), st.integers(0, 30), st.integers(-1, 2))  # request, sample (-1: all)
step_op = st.tuples(st.just("step"), st.integers(1, 6))
fault_op = st.tuples(st.just("fault"))
# one_of would weigh the four kinds alike (it drops repeats): draw the kind first, 3:1:3:1
_OP_KINDS = [add_op, add_op, add_op, abort_op, step_op, step_op, step_op, fault_op]
operations = st.lists(st.integers(0, len(_OP_KINDS) - 1).flatmap(_OP_KINDS.__getitem__), min_size=3, max_size=30)
engines = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4]),
    "capacity": st.integers(12, 64),  # tokens: from smaller than one sequence to a few whole sequences
    "max_num_seqs": st.integers(1, 5),
    "budget": st.integers(1, 24),
    "chunked": st.booleans(),
    "policy": st.sampled_from(["fcfs", "priority"]),
    "caching": st.booleans(),
    "window": st.sampled_from([None, None, 3, 6]),
    "salt": st.sampled_from([None, "deploy"]),
})
prefixes = st.lists(st.lists(tokens, max_size=12), min_size=3, max_size=3)


@dataclass
class Run:
    core: EngineCore
    prompts: dict[str, tuple[list[int], SamplingParams]] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)  # seq id -> tokens seen in deltas
    finishes: dict[str, list[str]] = field(default_factory=dict)  # seq id -> finish reasons seen
    errors: dict[str, str] = field(default_factory=dict)  # seq id -> error message
    aborted: set[str] = field(default_factory=set)

    def step(self) -> None:
        sched_seen: list[SchedulerOutput] = []
        core, sch = self.core, self.core.scheduler
        orig = sch.schedule

        def spy() -> SchedulerOutput:
            out = orig()
            sched_seen.append(out)
            return out

        sch.schedule = spy  # type: ignore[method-assign]
        try:
            deltas = core.step()
        finally:
            del sch.schedule
        check_step(core, sched_seen[0])
        for d in deltas:
            sid = f"{d.request_id}#{d.index}"
            assert sid not in self.aborted and not self.finishes.get(sid), f"{sid}: output after its end"
            prompt = self.prompts[sid][0]
            assert d.num_prompt_tokens == len(prompt) and 0 <= d.num_cached_tokens < len(prompt)
            assert d.num_cached_tokens % core.scheduler.kv.block_size == 0
            self.outputs.setdefault(sid, []).extend(d.new_token_ids)
            if d.finish_reason is not None:
                self.finishes.setdefault(sid, []).append(d.finish_reason)
            if d.error is not None:
                self.errors[sid] = d.error

    def abort(self, target: str) -> None:
        live = {sid for sid in self.core.scheduler.seqs if sid == target or sid.split("#")[0] == target}
        self.core.abort([target])
        assert not live & set(self.core.scheduler.seqs), f"abort of {target} left a sample alive"
        self.aborted |= live
        check_blocks(self.core)


def make_core(e: dict) -> EngineCore:
    groups = [KVCacheGroupSpec(layer_ids=[0])]
    if e["window"] is not None:
        groups.append(KVCacheGroupSpec(layer_ids=[1], sliding_window=e["window"]))
    num_blocks = -(-e["capacity"] // e["block_size"]) + 1  # + the null block
    runner = FakeRunner(groups, [num_blocks] * len(groups), e["block_size"])
    config = EngineConfig(
        cache=CacheConfig(block_size=e["block_size"], enable_prefix_caching=e["caching"], prefix_cache_salt=e["salt"]),
        scheduler=SchedulerConfig(max_num_seqs=e["max_num_seqs"], max_num_batched_tokens=e["budget"],
                                  enable_chunked_prefill=e["chunked"], policy=e["policy"]))
    return EngineCore(config, runner)


def run_ops(e: dict, prefix_lists: list[list[int]], ops: list[tuple]) -> Run:
    run = Run(make_core(e))
    added: list[str] = []
    for k, op in enumerate(ops):
        if op[0] == "add":
            _, pi, suffix, n, prio, max_tokens, stop_ids, ignore_eos, min_tokens, salt = op
            prompt = prefix_lists[pi] + suffix or [3]
            if max_tokens is not None:
                min_tokens = min(min_tokens, max_tokens)
            params = SamplingParams(n=n, max_tokens=max_tokens, stop_token_ids=stop_ids, ignore_eos=ignore_eos,
                                    min_tokens=min_tokens, temperature=0.0, cache_salt=salt)
            rid = f"r{k}"
            try:
                run.core.add_request(EngineCoreRequest(rid, prompt, params, priority=prio, arrival_time=float(k)))
            except ValueError:  # too long for max_model_len, or for the budget without chunking
                assert len(prompt) > MAX_MODEL_LEN or (not e["chunked"] and len(prompt) > e["budget"])
                continue
            added.append(rid)
            for i in range(n):
                run.prompts[f"{rid}#{i}"] = (prompt, params)
        elif op[0] == "abort" and added:
            rid = added[op[1] % len(added)]
            run.abort(rid if op[2] < 0 else f"{rid}#{op[2]}")
        elif op[0] == "fault":
            run.core.runner.fail_next = True
        elif op[0] == "step":
            for _ in range(op[1]):
                run.step()
    for _ in range(3000):
        if not run.core.has_unfinished():
            break
        run.step()
    assert not run.core.has_unfinished(), "engine did not go idle"
    return run


def check_end(run: Run) -> None:
    core = run.core
    capacity = core.scheduler.kv.capacity_tokens()
    for sid, (prompt, params) in run.prompts.items():
        got = run.outputs.get(sid, [])
        reasons = run.finishes.get(sid, [])
        want, want_reason = reference_output(prompt, params)
        assert got == want[:len(got)], f"{sid}: tokens {got} differ from its solo run {want}"
        if sid in run.aborted:
            assert reasons == [], f"{sid}: aborted and finished"
        elif reasons == ["error"] and sid in core.runner.failed:
            assert "injected runner fault" in run.errors[sid]
        elif reasons == ["error"]:  # only a sequence the whole cache cannot hold may fail
            assert "more than the cache holds" in run.errors[sid], run.errors[sid]
            assert len(prompt) + len(got) > capacity, f"{sid} failed though {len(prompt) + len(got)} tokens fit"
        else:
            assert reasons == [want_reason] and got == want, f"{sid}: {reasons} {got}, alone {want_reason} {want}"
    assert core.scheduler.kv.all_free() and not core.scheduler.requests and not core.scheduler.running
    assert not core.scheduler.waiting
    check_blocks(core)


# ---- the properties -----------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(engines, prefixes, operations)
def test_random_interleavings_keep_the_engine_invariants(e, prefix_lists, ops):
    check_end(run_ops(e, prefix_lists, ops))
