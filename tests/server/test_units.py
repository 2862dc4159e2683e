"""Server parts without a live server: wire format, validation messages, metrics, SSE framing, admission."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenmill.config import EngineConfig, SchedulerConfig, ServerConfig
from tokenmill.engine.core_proc import (
    delta_from_row,
    delta_to_row,
    pack,
    stats_from_wire,
    stats_to_wire,
    unpack,
)
from tokenmill.engine.outputs import SeqOutputDelta
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.engine.stats import SchedulerStats
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, validation_message
from tokenmill.server.metrics import RequestTiming, ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.serving_engine import admit
from tokenmill.server.state import ServerState
from tokenmill.server.streaming import merge, sse_stream


def test_wire_round_trip():
    d = SeqOutputDelta(request_id="r", index=1, new_token_ids=[5, 6], new_logprobs=[-0.1, -0.2],
                       new_top_logprobs=[[(5, -0.1), (9, -1.5)], [(6, -0.2)]], finish_reason="stop", stop_reason=6,
                       num_prompt_tokens=3, num_cached_tokens=2)
    back = delta_from_row(unpack(pack(delta_to_row(d))))
    assert back == d
    s = SchedulerStats(num_running=2, kv_cache_usage=0.25, prefix_cache_hits=7)
    assert stats_from_wire(unpack(pack(stats_to_wire(s)))) == s
    req = EngineCoreRequest("r", [1, 2], SamplingParams(n=2, logit_bias={3: 1.5}, stop=["x"], seed=4))
    again = EngineCoreRequest.from_wire(unpack(pack(req.to_wire())))
    assert again.params.logit_bias == {3: 1.5} and again.params.n == 2 and again.prompt_token_ids == [1, 2]


@pytest.mark.parametrize("body,param,needle", [
    ({"prompt": "x", "bogus": 1}, "bogus", "Unrecognized request argument"),
    ({"prompt": "x", "n": "3"}, "n", "Invalid value for n"),
    ({"prompt": {"a": 1}}, "prompt", "Invalid value for prompt"),
    ({}, "prompt", "Missing required parameter: prompt"),
    ({"prompt": "x", "stop": 7}, "stop", "expected a string or a list of strings, got an integer"),
    ({"prompt": [[1, 2], [3, "a"]]}, "prompt[1][1]", "Input should be a valid integer"),
    ({"prompt": [1, None]}, "prompt", "got a list of integers and nulls"),
])
def test_validation_messages_name_the_field(body, param, needle):
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate(body)
    msg, got = validation_message(info.value)
    assert got == param and needle in msg, msg
    assert "more error" not in msg and "\n" not in msg


def test_validation_message_lists_every_error():
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate({"prompt": "hi", "n": "2", "messages": [{"role": "user", "content": 5}]})
    msg, param = validation_message(info.value)
    assert param == "n"
    assert msg.split("; ") == ['Invalid value for n: Input should be a valid integer (got "2")',
                               "Invalid value for messages[0].content: expected a string or a list, got an integer",
                               "Unrecognized request argument supplied: prompt"]


def test_chat_message_parts():
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.messages[0].text() == "ab"


def test_metrics_counters_follow_cumulative_stats():
    reg = CollectorRegistry()
    m = ServerMetrics(reg, "m")
    m.update_engine(3, 1, 0.5, prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=2)
    m.update_engine(0, 0, 0.0, prefix_cache_queries=150, prefix_cache_hits=40, num_preemptions=2)
    text = generate_latest(reg).decode()
    assert 'tokenmill_prefix_cache_queries_total{model_name="m"} 150.0' in text
    assert 'tokenmill_prefix_cache_hits_total{model_name="m"} 40.0' in text
    assert 'tokenmill_num_preemptions_total{model_name="m"} 2.0' in text
    assert 'tokenmill_num_requests_running{model_name="m"} 0.0' in text
    t = RequestTiming(arrival=0.0, scheduled=0.5)
    m.observe_token(1.0, None, 1, t)
    m.observe_token(2.0, 1.0, 4, t)  # four tokens in one step: four ITL samples of 0.25 s
    t.first_token, t.last_token = 1.0, 2.0
    m.observe_finished(t, "length", 7, now=2.5)
    text = generate_latest(reg).decode()
    assert 'tokenmill_generation_tokens_total{model_name="m"} 5.0' in text
    assert 'tokenmill_inter_token_latency_seconds_count{model_name="m"} 4.0' in text
    assert 'tokenmill_inter_token_latency_seconds_sum{model_name="m"} 1.0' in text
    assert 'tokenmill_request_queue_time_seconds_sum{model_name="m"} 0.5' in text
    assert 'tokenmill_request_prefill_time_seconds_sum{model_name="m"} 0.5' in text
    assert 'tokenmill_request_decode_time_seconds_sum{model_name="m"} 1.0' in text
    assert 'tokenmill_request_success_total{finished_reason="length",model_name="m"} 1.0' in text
    assert 'tokenmill_prompt_tokens_total{model_name="m"} 7.0' in text


def test_sse_error_mid_stream_then_done():
    async def chunks():
        yield {"a": 1}
        raise APIError(503, "core died", "engine_error", code="engine_dead")

    async def collect():
        return [b async for b in sse_stream(chunks())]

    out = asyncio.run(collect())
    assert out[0] == b'data: {"a":1}\n\n'
    assert json.loads(out[1][6:])["error"]["code"] == "engine_dead"
    assert out[2] == b"data: [DONE]\n\n"


def test_sse_error_for_an_unexpected_failure_has_a_string_code():
    async def chunks():
        yield {"a": 1}
        raise RuntimeError("boom")

    async def collect():
        return [b async for b in sse_stream(chunks())]

    error = json.loads(asyncio.run(collect())[1][6:])["error"]
    assert error == {"message": "RuntimeError: boom", "type": "internal_error", "param": None,
                     "code": "internal_error"}


def test_merge_interleaves_and_propagates_errors():
    async def gen(tag, n, fail=False):
        for i in range(n):
            await asyncio.sleep(0)
            yield f"{tag}{i}"
        if fail:
            raise ValueError("boom")

    async def run(fail):
        return [x async for x in merge([gen("a", 3), gen("b", 2, fail)])]

    got = asyncio.run(run(False))
    assert sorted(got) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]
    with pytest.raises(ValueError):
        asyncio.run(run(True))


def _state(max_seqs: int, limit: int | None) -> ServerState:
    reg = CollectorRegistry()
    return ServerState(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=max_seqs)),
                       ServerConfig(max_queued_requests=limit), ["m"], reg, ServerMetrics(reg, "m"))


def test_admission_limits_waiting_sequences():
    st = _state(max_seqs=2, limit=1)
    held = [admit(st, 1)[0] for _ in range(3)]  # 2 running + 1 queued
    assert st.in_flight_seqs == 3
    with pytest.raises(APIError) as info:
        admit(st, 1)
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    held[0].release()
    held[0].release()  # idempotent
    assert st.in_flight_seqs == 2
    extra = admit(st, 1)
    del extra  # a reservation never handed to a generator frees itself
    assert st.in_flight_seqs == 2
    st.last_num_waiting = 1  # the core reports waiting sequences (KV-bound): nothing more may queue
    for r in held:
        r.release()
    with pytest.raises(APIError):
        admit(st, 2)
    assert _state(1, None) and admit(_state(1, None), 100)  # no limit configured: always admitted


def test_model_endpoints_503_until_the_engine_is_ready():
    """docs/server.md: /v1/models answers 503 (not 200 with max_model_len null) while the model loads."""
    from fastapi.testclient import TestClient

    from tokenmill.server.app import create_app

    async def never_ready(_config):  # the engine is still loading for the whole test
        await asyncio.Event().wait()

    app = create_app(EngineConfig(), ServerConfig(), engine_factory=never_ready)
    with TestClient(app) as http:
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "hi"}),
                                   ("POST", "/tokenize", {"prompt": "hi"})):
            r = http.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "service_unavailable"
        wrong = http.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("num_prompt,max_tokens,param", [
    (10, 300, "max_tokens"),  # the prompt fits, the completion does not
    (300, 5, "prompt"),  # the prompt alone is too long
    (256, None, "prompt"),
])
def test_context_length_error_names_the_cause(num_prompt, max_tokens, param):
    from tokenmill.server.errors import context_length_exceeded

    err = context_length_exceeded(num_prompt, max_tokens, 256, "prompt")
    assert err.param == param and err.code == "context_length_exceeded" and "256" in err.message


def test_completion_top_logprobs_add_the_sampled_token():
    from tokenmill.engine.outputs import CompletionOutput, Logprob
    from tokenmill.server.logprobs import chat_logprobs, completion_logprobs

    step = {7: Logprob(-0.5, 1, "a"), 8: Logprob(-1.0, 2, "b"), 9: Logprob(-4.0, 5, "z")}  # 9 sampled, rank 5
    inside = {7: Logprob(-0.5, 1, "a"), 8: Logprob(-1.0, 2, "b")}  # 7 sampled, already in the top 2
    c = CompletionOutput(index=0, text="za", token_ids=[9, 7], cumulative_logprob=-4.5, logprobs=[step, inside])
    acc: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    completion_logprobs(acc, c, None, 2, 0)
    assert acc["top_logprobs"] == [{"a": -0.5, "b": -1.0, "z": -4.0}, {"a": -0.5, "b": -1.0}]
    assert [[t["token"] for t in e["top_logprobs"]] for e in chat_logprobs(c, None, 2)] == [["a", "b"], ["a", "b"]]
