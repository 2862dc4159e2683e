"""`tokenmill serve --speculative-config`: the openai client streams and completes with speculation on, with the
same tokens (and logprobs) as the same server without it; the acceptance counters reach /metrics."""

import json

import httpx
import openai
import pytest

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3})
# A prompt whose text repeats: the tiny model's greedy output copies some of it, so drafts get accepted.
PROMPT = [11, 45, 301, 7, 99, 402] * 2 + [11, 45, 301]


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec_servers")
    spec = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--speculative-config", SPEC, tmp_dir=tmp)
    try:
        base = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, tmp_dir=tmp)
    except BaseException:
        spec.stop()
        raise
    yield spec, base
    spec.stop()
    base.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_completions_identical_with_and_without_speculation(servers):
    spec, base = servers
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0.0, "logprobs": 2,
          "extra_body": {"ignore_eos": True}}
    a = _client(base).completions.create(**kw).choices[0]
    b = _client(spec).completions.create(**kw).choices[0]
    assert b.text == a.text and b.logprobs.tokens == a.logprobs.tokens
    assert all(abs(x - y) < 1e-4 for x, y in zip(a.logprobs.token_logprobs, b.logprobs.token_logprobs))
    chunks = list(_client(spec).completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == a.logprobs.tokens  # every emitted token has its logprob, several per chunk included
    metrics = httpx.get(spec.url + "/metrics", timeout=10).text
    accepted = [line for line in metrics.splitlines() if line.startswith("tokenmill_spec_decode_num_accepted_tokens")]
    assert accepted and float(accepted[0].split()[-1]) > 0, accepted
