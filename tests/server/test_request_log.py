"""Server logs: one summary line per finished request (no prompt text unless --log-requests), the
periodic stats line, and the dashboard's process info (model, dtype, CPU, uptime)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.fixtures.servers import TINY_SERVER_FLAGS, LiveServer, start_server
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.request_log import RequestSummary, describe_params

_SECRET = "zebra quartz marmalade"  # prompt text that must not reach the log by default


def wait_for_log(server: LiveServer, pattern: str, timeout_s: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, server.log())
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log()[-3000:]}")


def test_summary_line_fields() -> None:
    s = RequestSummary("cmpl-1-0", "length", 200, 7, 4, 0, 0.0123, 0.5)
    assert s.line() == ("finished request cmpl-1-0: status=length http=200 prompt_tokens=7 completion_tokens=4 "
                        "cached_tokens=0 ttft=0.012s total=0.500s")
    unknown = RequestSummary("r", "abort", None, 3, 0, 0, None, 1.0).line()
    assert "http=- " in unknown and "ttft=- " in unknown


def test_describe_params_names_only_what_differs_from_defaults() -> None:
    assert describe_params(SamplingParams()) == "SamplingParams()"
    text = describe_params(SamplingParams(max_tokens=5, temperature=0.0, stop=["x"]))
    assert "max_tokens=5" in text and "temperature=0.0" in text and "stop=['x']" in text and "top_p" not in text


def test_describe_params_hides_the_cache_salt() -> None:
    text = describe_params(SamplingParams(cache_salt="tenant-secret-42"))
    assert "cache_salt=<redacted>" in text and "tenant-secret-42" not in text


def test_one_line_per_request_without_prompt_text(tiny_server: LiveServer) -> None:
    r = httpx.post(tiny_server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": _SECRET, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    rid, usage = body["id"], body["usage"]
    m = wait_for_log(tiny_server, rf"finished request {rid}-0: (.*)")
    assert m.group(1).startswith(
        f"status=length http=200 prompt_tokens={usage['prompt_tokens']} completion_tokens=4 cached_tokens=")
    assert re.search(r"ttft=\d+\.\d{3}s total=\d+\.\d{3}s$", m.group(1))
    assert _SECRET not in tiny_server.log() and "received request" not in tiny_server.log()


def test_rejected_request_is_logged_once(tiny_server: LiveServer) -> None:
    r = httpx.post(tiny_server.url + "/v1/completions", timeout=60,
                   json={"model": "no-such-model", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404, r.text
    wait_for_log(tiny_server, r"rejected request POST /v1/completions: http=404 total=\d+\.\d{3}s")
    before = tiny_server.log().count("rejected request")
    ok = httpx.post(tiny_server.url + "/v1/completions", timeout=60,
                    json={"model": "tiny", "prompt": "fine", "max_tokens": 2})
    assert ok.status_code == 200
    wait_for_log(tiny_server, rf"finished request {ok.json()['id']}-0: ")
    assert tiny_server.log().count("rejected request") == before  # a served request gets its summary only


def test_server_dashboard_shows_model_dtype_cpu_uptime(tiny_server: LiveServer) -> None:
    extra = httpx.get(tiny_server.url + "/dashboard/stats", timeout=30).json()["extra"]
    assert extra["model"] == "tiny" and extra["dtype"] == "float32"
    assert extra["quantization"] and extra["kv_cache_dtype"] == "float32"
    assert extra["cpu"] and extra["uptime_s"] >= 0


@pytest.fixture(scope="module")
def logging_server(tiny_llama_dir, tmp_path_factory):
    server = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--log-requests", "--log-stats-interval", "0.2",
                          tmp_dir=tmp_path_factory.mktemp("logging-server"))
    yield server
    server.stop()


def test_log_requests_logs_prompt_and_params(logging_server: LiveServer) -> None:
    r = httpx.post(logging_server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": _SECRET, "max_tokens": 3, "temperature": 0, "seed": 11})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    m = wait_for_log(logging_server, rf"received request {rid}-0: prompt: (.*)")
    assert _SECRET in m.group(1) and "max_tokens=3" in m.group(1) and "seed=11" in m.group(1)
    wait_for_log(logging_server, rf"finished request {rid}-0: status=")


def test_periodic_stats_line_while_busy_then_one_idle_line(logging_server: LiveServer) -> None:
    r = httpx.post(logging_server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "count with me", "max_tokens": 40, "ignore_eos": True})
    assert r.status_code == 200, r.text
    busy = wait_for_log(logging_server, r"Avg prompt throughput: ([\d.]+) tokens/s, Avg generation throughput: "
                                        r"([1-9][\d.]*) tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, "
                                        r"KV cache usage: [\d.]+%, Prefix cache hit rate: [\d.]+%")
    assert float(busy.group(2)) > 0
    idle = r"Avg prompt throughput: 0\.0 tokens/s, Avg generation throughput: 0\.0 tokens/s, Running: 0 reqs"
    wait_for_log(logging_server, idle)
    # Idle: the count of idle lines stops growing (bounded check over several intervals).
    first = len(re.findall(idle, logging_server.log()))
    time.sleep(1.0)
    assert len(re.findall(idle, logging_server.log())) == first
