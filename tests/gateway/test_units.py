"""Config loading errors, API keys and rate limits, complexity scorer, /metrics parsing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tokenmill.gateway.config import ApiKeyConfig, config_from_dict, load_config
from tokenmill.gateway.limits import AuthError, KeyRing, RateLimiter
from tokenmill.gateway.model_router import HeuristicScorer
from tokenmill.gateway.scraper import parse_load

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads():
    cfg = load_config(REPO / "examples" / "gateway.yaml")
    assert {p.name for p in cfg.pools} >= {"small", "large"}
    assert cfg.routes and cfg.routes[0].alias == "auto"


@pytest.mark.parametrize("data, message", [
    ({"pools": [{"name": "a", "replicas": ["http://x"], "policy": "random"}]}, "pools[0].policy: 'random'"),
    ({"pools": [{"name": "a", "replicas": ["http://x"], "colour": 1}]}, "pools[0]: unknown field(s) colour"),
    ({"pools": [{"name": "a", "replicas": ["ftp://x"]}]}, "pools[0].replicas[0].url"),
    ({"pools": [{"name": "a", "replicas": ["http://x"], "max_concurrency": "lots"}]},
     "pools[0].max_concurrency: expected int"),
    ({"pools": [{"name": "a"}]}, "pools[0].replicas"),
    ({"pools": [{"name": "a", "autoscale": {"max_replicas": 2}}]}, "pools[0].spec"),
    ({"pools": [{"name": "a", "replicas": ["http://x"]}], "routes": [{"alias": "auto", "small": "a", "large": "b"}]},
     "routes[0].large: 'b'"),
    ({"pools": []}, "pools"),
    ({"port": 0, "pools": [{"name": "a", "replicas": ["http://x"]}]}, "port: 0"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ValueError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)


def test_keys_and_limits():
    ring = KeyRing((ApiKeyConfig(key="k1", name="gold", priority=-1, requests_per_minute=2),
                    ApiKeyConfig(key="k2", tokens_per_minute=100)))
    with pytest.raises(AuthError):
        ring.authenticate(None)
    with pytest.raises(AuthError):
        ring.authenticate("Bearer wrong")
    gold = ring.authenticate("Bearer k1")
    assert gold.name == "gold" and gold.priority == -1
    lim = RateLimiter()
    assert lim.check(gold, 10, 0.0) is None and lim.check(gold, 10, 1.0) is None
    assert lim.check(gold, 10, 2.0) == pytest.approx(58.0)
    assert lim.check(gold, 10, 60.5) is None  # the first one left the window
    other = ring.authenticate(None, x_api_key="k2")
    assert lim.check(other, 60, 0.0) is None
    assert lim.check(other, 60, 10.0) == pytest.approx(50.0)
    assert lim.check(other, 500, 10.0) == 60.0  # never fits
    assert KeyRing(()).authenticate(None).name == ""  # keys off: everyone allowed


def score(body: dict) -> float:
    return asyncio.run(HeuristicScorer().score(body)).value


def test_heuristic_scorer_orders_by_complexity():
    greeting = score({"messages": [{"role": "user", "content": "Hi there! How are you?"}], "max_tokens": 32})
    code_task = score({"messages": [{"role": "user", "content": (
        "Implement a Python function that parses a CSV file, then validates every row, and finally writes "
        "the results to a SQL table. Explain step by step:\n1. design the schema\n2. write `def load(path):`\n"
        "3. handle errors and return a summary. Compare the trade-offs of batching. " * 3)}], "max_tokens": 1024})
    math_q = score({"prompt": "Prove that the integral of x^2 from 0 to 1 equals 1/3, step by step.",
                    "max_tokens": 256})
    assert greeting < 0.25 and code_task > 0.7
    assert greeting < math_q < code_task
    deep = score({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}] * 6})
    assert deep > score({"messages": [{"role": "user", "content": "ok"}]})


def test_parse_load_tokenmill_and_vllm_names():
    tm = ('# TYPE tokenmill_num_requests_waiting gauge\n'
          'tokenmill_num_requests_waiting{model_name="a"} 3\n'
          'tokenmill_num_requests_waiting{model_name="b"} 2\n'
          'tokenmill_num_requests_running{model_name="a"} 4\n'
          'tokenmill_kv_cache_usage_perc{model_name="a"} 0.25\n'
          'tokenmill_kv_cache_usage_perc{model_name="b"} 0.5\n')
    load = parse_load(tm, now=1.0)
    assert (load.num_waiting, load.num_running, load.kv_usage, load.scraped_at) == (5.0, 4.0, 0.5, 1.0)
    vl = ('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 7.0\n'
          '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.9\n')
    load = parse_load(vl)
    assert load.num_waiting == 7.0 and load.kv_usage == 0.9


def test_embedding_scorer_failure_falls_back_to_the_heuristic():
    import httpx

    from tokenmill.gateway.actuators import free_port
    from tokenmill.gateway.config import (
        EmbeddingScorerConfig,
        RouteConfig,
        RouteExample,
    )
    from tokenmill.gateway.model_router import ModelRouter

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    route = RouteConfig(alias="auto", small="s", large="l", scorer="embedding",
                        embedding=EmbeddingScorerConfig(url=dead, examples=(RouteExample("hi", "small"),)))

    async def main():
        async with httpx.AsyncClient() as client:
            return await ModelRouter((route,), client).route("auto", {"prompt": "hello"})

    d = asyncio.run(main())
    assert d.pool == "s" and d.score.features["fallback"] == 1.0


GREETING_BODY = {"model": "auto", "messages": [{"role": "user", "content": "Hi there!"}], "max_tokens": 16}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize(("extra", "kind"), [
    ({}, None),
    ({"tools": [WEATHER_TOOL]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, None),  # the model writes free text
    ({"tools": []}, None),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": True}}, "structured_outputs"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, None),  # no constraint kind set
    ({"guided_choice": ["yes", "no"]}, "guided"),
])
def test_constraint_kind(extra, kind):
    from tokenmill.gateway.model_router import constraint_kind

    assert constraint_kind({**GREETING_BODY, **extra}) == kind


def test_constrained_requests_route_to_the_large_pool():
    import httpx

    from tokenmill.gateway.config import RouteConfig
    from tokenmill.gateway.model_router import ModelRouter

    route = RouteConfig(alias="auto", small="s", large="l", threshold=0.5)

    async def main(body: dict):
        async with httpx.AsyncClient() as client:
            return await ModelRouter((route,), client).route("auto", body)

    plain = asyncio.run(main(GREETING_BODY))
    assert plain.pool == "s" and "constrained" not in plain.score.features
    for extra in ({"tools": [WEATHER_TOOL]}, {"response_format": {"type": "json_object"}},
                  {"structured_outputs": {"choice": ["a", "b"]}}):
        d = asyncio.run(main({**GREETING_BODY, **extra}))
        # the text alone scores low; the constraint alone sends it to the large pool
        assert d.pool == "l" and d.score.value == plain.score.value and d.score.features["constrained"] == 1.0
    off = asyncio.run(main({**GREETING_BODY, "tools": [WEATHER_TOOL], "tool_choice": "none"}))
    assert off.pool == "s"
