"""Constrained and tool requests through the gateway: the body reaches the replica byte for byte, and the
answer (streamed or not, tool-call deltas included) reaches the client byte for byte."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.gateway.conftest import start_gateway
from tokenmill.gateway.config import (
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    ReplicaConfig,
    RouteConfig,
)

FAST_HEALTH = HealthConfig(interval_s=0.2, timeout_s=1.0, failure_threshold=2, eject_s=0.5, scrape_interval_s=0.2)
SCHEMA = {"type": "object", "properties": {"naïve": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "n": {"type": "integer", "minimum": 0}},
          "required": ["n", "naïve"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Weather in Zürich?"}], "max_tokens": 8}
BODIES = {
    "json_schema": ("/v1/chat/completions", {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}),
    "tools_required": ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "required",
                                                "parallel_tool_calls": False}),
    "tools_named": ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}),
    "structured_outputs": ("/v1/completions", {"model": "m", "prompt": "yes or no?", "structured_outputs": {
        "choice": ["yes", "no"], "disable_any_whitespace": True}}),
}


def encode(body: dict) -> bytes:
    # Unusual but valid formatting (indent, key order, raw UTF-8) that a re-serializing proxy would change.
    return json.dumps(body, indent=1, ensure_ascii=False).encode()


@pytest.fixture
def replica_and_gateway(procs, gateways):
    rep = procs.test_replica(model="m")
    pools = (PoolConfig(name="small", replicas=(ReplicaConfig(url=rep.url),)),
             PoolConfig(name="large", replicas=(ReplicaConfig(url=rep.url),)))
    gw = start_gateway(GatewayConfig(pools=pools, health=FAST_HEALTH,
                                     routes=(RouteConfig(alias="auto", small="small", large="large"),)))
    gateways.append(gw)
    return rep, gw


def send(base: str, path: str, raw: bytes) -> tuple[int, bytes, dict[str, str]]:
    r = httpx.post(f"{base}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
    return r.status_code, r.content, dict(r.headers)


def sse_events(data: bytes) -> list[dict]:
    lines = [ln[len("data: "):] for ln in data.decode().split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_body_and_answer_relayed_unchanged(replica_and_gateway, name, stream):
    rep, gw = replica_and_gateway
    path, body = BODIES[name]
    raw = encode({**body, "stream": stream})
    direct_status, direct, _ = send(rep.url, path, raw)
    status, relayed, headers = send(gw.url, path, raw)
    assert status == direct_status == 200
    assert relayed == direct  # the answer, byte for byte
    chat = path.endswith("chat/completions")
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        events = sse_events(relayed)
        key = "delta" if chat else None
        text = "".join((e["choices"][0][key].get("content") or "") if key else e["choices"][0]["text"]
                       for e in events)
    else:
        choice = json.loads(relayed)["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    assert text.encode() == raw  # what the replica received is what the client sent


def test_streamed_tool_call_deltas_assemble_to_the_whole_call(replica_and_gateway):
    _, gw = replica_and_gateway
    path, body = BODIES["tools_required"]
    raw = encode({**body, "stream": True})
    whole = json.loads(send(gw.url, path, encode(body))[1])["choices"][0]["message"]["tool_calls"]
    calls: dict[int, dict] = {}
    reasons = []
    for e in sse_events(send(gw.url, path, raw)[1]):
        ch = e["choices"][0]
        reasons.append(ch["finish_reason"])
        for d in ch["delta"].get("tool_calls", []):
            c = calls.setdefault(d["index"], {"id": None, "type": None, "function": {"name": None, "arguments": ""}})
            c["id"] = d.get("id", c["id"])
            c["type"] = d.get("type", c["type"])
            fn = d.get("function", {})
            c["function"]["name"] = fn.get("name", c["function"]["name"])
            c["function"]["arguments"] += fn.get("arguments", "")
    assert [calls[i] for i in sorted(calls)] == whole
    assert whole[0]["function"] == {"name": "get_weather", "arguments": '{"num_tools": 1}'}
    assert reasons[-1] == "tool_calls" and len(calls) == 1


def test_alias_sends_constrained_requests_to_the_large_pool_with_the_constraint_intact(replica_and_gateway):
    _, gw = replica_and_gateway
    for name in sorted(BODIES):
        path, body = BODIES[name]
        status, data, headers = send(gw.url, path, encode({**body, "model": "auto"}))
        assert status == 200 and headers["x-tokenmill-pool"] == "large"
        choice = json.loads(data)["choices"][0]
        received = json.loads(choice["message"]["content"] if "message" in choice else choice["text"])
        # the gateway names the served model instead of the alias; every other field is as sent
        assert received == {**body, "model": "m"}
    plain = send(gw.url, "/v1/chat/completions", json.dumps({**CHAT, "model": "auto"}).encode())
    assert plain[0] == 200 and plain[2]["x-tokenmill-pool"] == "small"
