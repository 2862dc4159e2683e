"""Server parts without a live server: wire format, validation messages, metrics, SSE framing, admission."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tokenmill.config import EngineConfig, SchedulerConfig, ServerConfig
from tokenmill.engine.core_proc import delta_from_row, delta_to_row, pack, stats_from_wire, stats_to_wire, unpack
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
])
def test_validation_messages_name_the_field(body, param, needle):
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate(body)
    msg, got = validation_message(info.value)
    assert got == param and needle in msg


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
