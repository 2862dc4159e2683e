"""Server metrics (`tokenmill_*`, vLLM's meanings; see docs/metrics.md) in a per-process registry.

Gauges and cumulative engine counters come from the core's SchedulerStats; token counters and latency
histograms are recorded by the front end as requests stream. Every metric carries `model_name`.
Constrained requests are counted by kind when the front end admits them; the grammar compile-time
histogram is the core's own cumulative buckets, exposed as they are (the compiles happen in the core).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenmill.engine.stats import GRAMMAR_COMPILE_BUCKETS_S, SchedulerStats

# vLLM's buckets, so dashboards built on its histograms read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class RequestTiming:
    """Monotonic timestamps of one request (seconds); None where the request never got that far."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


# Labels of tokenmill_constrained_requests: the constraint kinds, and "tools" for a constraint built from
# `tools` / `tool_choice` (required or a named function).
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "tools")


class _GrammarCompileCollector(Collector):
    """tokenmill_grammar_compile_seconds from the core's cumulative buckets (a prometheus Histogram cannot
    be set from outside, and re-observing a bucket count would lose the times)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.buckets = [0] * len(GRAMMAR_COMPILE_BUCKETS_S)
        self.count = 0
        self.sum = 0.0

    def collect(self) -> Iterator[HistogramMetricFamily]:
        h = HistogramMetricFamily("tokenmill_grammar_compile_seconds",
                                  "Grammar compile time in the engine core (a grammar-cache hit counts, with its "
                                  "short time).", labels=["model_name"])
        pairs = [(str(le), float(n)) for le, n in zip(GRAMMAR_COMPILE_BUCKETS_S, self.buckets)]
        h.add_metric([self.model_name], pairs + [("+Inf", float(self.count))], self.sum)
        yield h


class CoreCounts:
    """The engine core's cumulative figures (SchedulerStats) as increments of server-lifetime counters: a snapshot
    at or below the last one (stale) adds nothing; reset() when a new core counts from zero again."""

    def __init__(self) -> None:
        self._last: dict[object, int] = {}

    def delta(self, key: object, value: int) -> int:
        last = self._last.get(key, 0)
        if value <= last:
            return 0
        self._last[key] = value
        return value - last

    def reset(self) -> None:
        self._last.clear()


class ServerMetrics:
    """All server metrics of one process, registered in `registry`. `core_counts` turns every cumulative figure
    of the core into increments (spec decoding's and LoRA's collectors share it: one reset at a core restart)."""

    def __init__(self, registry: CollectorRegistry, model_name: str, num_speculative_tokens: int = 0) -> None:
        self.registry = registry
        self.model_name = model_name
        self.core_counts = CoreCounts()
        # Only with speculative decoding configured, as vLLM (no spec_decode series on a server without it).
        self.spec = SpecDecodeMetrics(registry, model_name, num_speculative_tokens,
                                      self.core_counts) if num_speculative_tokens else None
        lbl = ["model_name"]
        r = registry
        self._running = Gauge("tokenmill_num_requests_running", "Requests in the running batch.", lbl, registry=r)
        self._waiting = Gauge("tokenmill_num_requests_waiting", "Requests waiting to be scheduled.", lbl, registry=r)
        self._kv = Gauge("tokenmill_kv_cache_usage_perc", "KV cache usage fraction (0..1).", lbl, registry=r)
        self._pc_queries = Counter("tokenmill_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", lbl, registry=r)
        self._pc_hits = Counter("tokenmill_prefix_cache_hits", "Prompt tokens found in the prefix cache.", lbl, registry=r)
        self._preempt = Counter("tokenmill_num_preemptions", "Cumulative preemptions.", lbl, registry=r)
        self._prompt = Counter("tokenmill_prompt_tokens", "Prefilled prompt tokens.", lbl, registry=r)
        self._gen = Counter("tokenmill_generation_tokens", "Generated tokens.", lbl, registry=r)
        self._success = Counter("tokenmill_request_success", "Finished requests by finish reason.",
                                lbl + ["finished_reason"], registry=r)
        self._ttft = Histogram("tokenmill_time_to_first_token_seconds", "Time to first token.", lbl,
                               buckets=_TTFT_BUCKETS, registry=r)
        self._itl = Histogram("tokenmill_inter_token_latency_seconds", "Time between output tokens.", lbl,
                              buckets=_ITL_BUCKETS, registry=r)
        self._e2e = Histogram("tokenmill_e2e_request_latency_seconds", "End-to-end request latency.", lbl,
                              buckets=_REQUEST_BUCKETS, registry=r)
        self._queue = Histogram("tokenmill_request_queue_time_seconds", "Time waiting before first scheduled.", lbl,
                                buckets=_REQUEST_BUCKETS, registry=r)
        self._prefill = Histogram("tokenmill_request_prefill_time_seconds", "Time from first scheduled to first token.", lbl,
                                  buckets=_REQUEST_BUCKETS, registry=r)
        self._decode = Histogram("tokenmill_request_decode_time_seconds", "Time from first to last token.", lbl,
                                 buckets=_REQUEST_BUCKETS, registry=r)
        self._constrained = Counter("tokenmill_constrained_requests", "Admitted requests with a decoding "
                                    "constraint, by kind.", lbl + ["kind"], registry=r)
        self._grammar_waiting = Gauge("tokenmill_num_requests_waiting_for_grammar", "Sequences parked until "
                                      "their grammar compiles.", lbl, registry=r)
        self._grammar_failures = Counter("tokenmill_grammar_compile_failures", "Grammar compiles that failed "
                                         "(invalid or over the compile timeout).", lbl, registry=r)
        self._compile = _GrammarCompileCollector(model_name)
        r.register(self._compile)
        self._core_restarts = Counter("tokenmill_engine_core_restarts", "Engine core processes restarted "
                                      "after the previous one died.", lbl, registry=r)
        self._core_restarts.labels(model_name)  # 0 from the start: "never restarted" is a value
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)  # expose zeros from the start, as vLLM does
        for kind in CONSTRAINT_KINDS:
            self._constrained.labels(model_name, kind)

    def update_engine(self, num_running: int, num_waiting: int, kv_cache_usage: float,
                      prefix_cache_queries: int, prefix_cache_hits: int, num_preemptions: int) -> None:
        m = self.model_name
        self._running.labels(m).set(num_running)
        self._waiting.labels(m).set(num_waiting)
        self._kv.labels(m).set(kv_cache_usage)
        for key, counter, value in (("q", self._pc_queries, prefix_cache_queries),
                                    ("h", self._pc_hits, prefix_cache_hits),
                                    ("p", self._preempt, num_preemptions)):
            delta = self.core_counts.delta(key, value)
            if delta:
                counter.labels(m).inc(delta)

    def engine_restarted(self) -> None:
        """The engine core died: a new one counts from zero, so the cumulative baselines restart at zero
        and the gauges read zero until it reports (the dead core's requests have all failed)."""
        self.core_counts.reset()
        self.update_engine(0, 0, 0.0, 0, 0, 0)

    def observe_core_restart(self) -> None:
        self._core_restarts.labels(self.model_name).inc()

    def update_grammar(self, stats: SchedulerStats) -> None:
        """Copy the core's structured-output figures (cumulative, except the waiting gauge)."""
        m = self.model_name
        self._grammar_waiting.labels(m).set(stats.num_waiting_for_grammar)
        delta = self.core_counts.delta("gf", stats.num_grammar_compile_failures)
        if delta:
            self._grammar_failures.labels(m).inc(delta)
        if stats.num_grammar_compiles >= self._compile.count:  # counts only grow; never step back
            self._compile.buckets = list(stats.grammar_compile_seconds_buckets)
            self._compile.count = stats.num_grammar_compiles
            self._compile.sum = stats.grammar_compile_seconds_sum

    def update_spec(self, stats: SchedulerStats) -> None:
        """Copy the core's cumulative speculative-decoding counts (nothing without speculative decoding)."""
        if self.spec is not None:
            self.spec.update(stats)

    def observe_constrained(self, kind: str) -> None:
        """One admitted request decoding under a constraint of `kind` (one of CONSTRAINT_KINDS)."""
        assert kind in CONSTRAINT_KINDS, kind
        self._constrained.labels(self.model_name, kind).inc()

    def observe_token(self, now: float, prev: float | None, num_tokens: int, timing: RequestTiming) -> None:
        """Record `num_tokens` new output tokens arriving at `now` (prev: the previous arrival)."""
        if num_tokens <= 0:
            return
        self._gen.labels(self.model_name).inc(num_tokens)
        if prev is None:
            self._ttft.labels(self.model_name).observe(now - timing.arrival)
        else:
            # Tokens arriving together share the gap, like vLLM's per-token ITL.
            gap = (now - prev) / num_tokens
            for _ in range(num_tokens):
                self._itl.labels(self.model_name).observe(gap)

    def observe_finished(self, timing: RequestTiming, finish_reason: str, num_prompt_tokens: int, now: float) -> None:
        m = self.model_name
        self._prompt.labels(m).inc(num_prompt_tokens)
        self._success.labels(m, finish_reason).inc()
        self._e2e.labels(m).observe(now - timing.arrival)
        if timing.scheduled is not None:
            self._queue.labels(m).observe(max(0.0, timing.scheduled - timing.arrival))
            if timing.first_token is not None:
                self._prefill.labels(m).observe(max(0.0, timing.first_token - timing.scheduled))
        if timing.first_token is not None and timing.last_token is not None:
            self._decode.labels(m).observe(max(0.0, timing.last_token - timing.first_token))


class SpecDecodeMetrics:
    """tokenmill_spec_decode_* (vLLM's vllm:spec_decode_*): counters fed from the core's cumulative
    SchedulerStats.spec_* figures, turned into increments so a core restart never steps them back."""

    def __init__(self, registry: CollectorRegistry, model_name: str, num_speculative_tokens: int,
                 counts: CoreCounts) -> None:
        lbl, r = ["model_name"], registry
        self.model_name = model_name
        self.counts = counts
        self._drafts = Counter("tokenmill_spec_decode_num_drafts", "Speculative drafts verified (one per "
                               "sequence per step that verified proposed tokens).", lbl, registry=r)
        self._draft_tokens = Counter("tokenmill_spec_decode_num_draft_tokens", "Proposed tokens verified.", lbl,
                                     registry=r)
        self._accepted = Counter("tokenmill_spec_decode_num_accepted_tokens", "Proposed tokens accepted.", lbl,
                                 registry=r)
        self._per_pos = Counter("tokenmill_spec_decode_num_accepted_tokens_per_pos", "Proposed tokens accepted, "
                                "by position in the draft (0: the first proposed token).", lbl + ["position"],
                                registry=r)
        for c in (self._drafts, self._draft_tokens, self._accepted):
            c.labels(model_name)  # zeros from the start, so rate() works from the first draft
        for pos in range(num_speculative_tokens):
            self._per_pos.labels(model_name, str(pos))

    def update(self, stats: SchedulerStats) -> None:
        m = self.model_name
        for key, counter, value in (("spec_drafts", self._drafts, stats.spec_num_drafts),
                                    ("spec_draft_tokens", self._draft_tokens, stats.spec_num_draft_tokens),
                                    ("spec_accepted", self._accepted, stats.spec_num_accepted_tokens)):
            delta = self.counts.delta(key, value)
            if delta:
                counter.labels(m).inc(delta)
        for pos, value in enumerate(stats.spec_accepted_per_pos):
            delta = self.counts.delta(("spec_pos", pos), value)
            if delta:
                self._per_pos.labels(m, str(pos)).inc(delta)
