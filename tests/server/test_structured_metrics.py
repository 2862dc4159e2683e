"""Structured-output metrics: constrained requests by kind (counted by the front end at admission) and the
core's grammar compile-time histogram, exposed at /metrics."""

from __future__ import annotations

import re

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.engine.stats import GRAMMAR_COMPILE_BUCKETS_S, SchedulerStats
from tokenmill.server.metrics import CONSTRAINT_KINDS, ServerMetrics


def samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def grammar_stats(compile_times: list[float], failures: int = 0, waiting: int = 0) -> SchedulerStats:
    buckets = [sum(1 for t in compile_times if t <= le) for le in GRAMMAR_COMPILE_BUCKETS_S]
    return SchedulerStats(num_constrained_requests=len(compile_times) + failures, num_waiting_for_grammar=waiting,
                          num_grammar_compiles=len(compile_times), num_grammar_compile_failures=failures,
                          grammar_compile_seconds_sum=sum(compile_times), grammar_compile_seconds_buckets=buckets)


def test_compile_histogram_mirrors_the_core_buckets():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m")
    text = generate_latest(reg).decode()
    assert samples(text, "tokenmill_grammar_compile_seconds_count") == {(("model_name", "m"),): 0.0}
    for kind in CONSTRAINT_KINDS:  # zeros from the start, so rate() works from the first request
        assert f'tokenmill_constrained_requests_total{{kind="{kind}",model_name="m"}} 0.0' in text
    m.update_grammar(grammar_stats([0.003, 0.2, 2.0], failures=1, waiting=2))
    m.update_grammar(grammar_stats([0.003, 0.2, 2.0, 0.0004], failures=2))
    text = generate_latest(reg).decode()
    b = {dict(k)["le"]: v for k, v in samples(text, "tokenmill_grammar_compile_seconds_bucket").items()}
    assert b["0.001"] == 1.0 and b["0.005"] == 2.0 and b["0.25"] == 3.0 and b["2.5"] == 4.0 and b["+Inf"] == 4.0
    assert samples(text, "tokenmill_grammar_compile_seconds_sum")[(("model_name", "m"),)] == 2.2034
    assert samples(text, "tokenmill_grammar_compile_failures_total")[(("model_name", "m"),)] == 2.0
    assert samples(text, "tokenmill_num_requests_waiting_for_grammar")[(("model_name", "m"),)] == 0.0
    m.update_grammar(grammar_stats([0.1]))  # a stale snapshot (fewer compiles) never steps the histogram back
    assert samples(generate_latest(reg).decode(), "tokenmill_grammar_compile_seconds_count") == {
        (("model_name", "m"),): 4.0}


def test_constrained_requests_by_kind():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m")
    for kind in ("json", "json", "tools", "choice"):
        m.observe_constrained(kind)
    got = samples(generate_latest(reg).decode(), "tokenmill_constrained_requests_total")
    assert {dict(k)["kind"]: v for k, v in got.items()} == {
        "json": 2.0, "regex": 0.0, "choice": 1.0, "grammar": 0.0, "json_object": 0.0, "tools": 1.0}


def test_live_server_counts_constrained_requests_and_compiles(tiny_server):
    url = tiny_server.url

    def scrape() -> str:
        return httpx.get(url + "/metrics", timeout=30).text

    def kind_count(text: str, kind: str) -> float:
        m = re.search(rf'tokenmill_constrained_requests_total{{kind="{kind}",model_name="[^"]+"}} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    def compile_count(text: str) -> float:
        m = re.search(r'tokenmill_grammar_compile_seconds_count{model_name="[^"]+"} (\S+)', text)
        return float(m.group(1)) if m else -1.0

    before = scrape()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    msgs = [{"role": "user", "content": "ok?"}]
    bodies = [
        ("/v1/chat/completions", {"messages": msgs, "max_tokens": 40, "response_format": {
            "type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}}),
        ("/v1/completions", {"prompt": "pick", "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}}),
        ("/v1/completions", {"prompt": "plain", "max_tokens": 4}),  # unconstrained: not counted
    ]
    for path, body in bodies:
        r = httpx.post(url + path, json={"model": "tiny", **body}, timeout=120)
        assert r.status_code == 200, r.text
    after = scrape()
    assert kind_count(after, "json") == kind_count(before, "json") + 1
    assert kind_count(after, "choice") == kind_count(before, "choice") + 1
    assert kind_count(after, "regex") == kind_count(before, "regex")
    # both grammars compiled (or came from the cache) in the core before their requests ran
    assert compile_count(after) >= compile_count(before) + 2
