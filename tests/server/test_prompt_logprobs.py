"""Prompt logprobs over HTTP on the shared tiny server: echo + logprobs (OpenAI legacy / lm-eval scoring),
vLLM's `prompt_logprobs` field on completions and chat, and their validation errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

MODEL = "tiny"
PROMPT = [1, 17, 42, 99, 7, 300, 12, 5, 8, 250, 13, 77]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    """(tokenizer, [len(PROMPT), V] log_softmax of transformers' logits at each prompt position)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir)), lps


def _check_echoed_prompt(lp, hf, k: int) -> None:
    tok, want = hf
    n = len(PROMPT)
    assert lp.tokens[:n] == [tok.decode([t]) for t in PROMPT]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(want[i - 1, PROMPT[i]].item(), abs=1e-4)
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= k + 1  # the top k, and the prompt token when outside them (as OpenAI's)
        assert max(top.values()) == pytest.approx(want[i - 1].max().item(), abs=1e-4)
        assert top[lp.tokens[i]] == pytest.approx(lp.token_logprobs[i]) or lp.tokens[i] == "\ufffd"
    assert lp.text_offset[0] == 0
    for i in range(1, len(lp.tokens)):  # cumulative token lengths (vLLM's convention), prompt and completion
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


def test_echo_logprobs_max_tokens_zero_scores_the_prompt(client, hf):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0)
    c = r.choices[0]
    assert c.text == hf[0].decode(PROMPT)  # the prompt alone: the generated token is left out
    assert c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(PROMPT)
    _check_echoed_prompt(c.logprobs, hf, 2)
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 0


def test_echo_logprobs_with_generation_appends_the_completion(client, hf):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, logprobs=1, temperature=0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, temperature=0)
    c, p = r.choices[0], plain.choices[0]
    assert c.text == hf[0].decode(PROMPT) + p.text
    assert len(c.logprobs.tokens) == len(PROMPT) + 3
    _check_echoed_prompt(c.logprobs, hf, 1)
    assert c.logprobs.tokens[len(PROMPT):] == p.logprobs.tokens
    assert c.logprobs.token_logprobs[len(PROMPT):] == pytest.approx(p.logprobs.token_logprobs, abs=1e-5)
    assert c.logprobs.top_logprobs[len(PROMPT):] == p.logprobs.top_logprobs


def test_echo_logprobs_streaming_sends_the_prompt_first(tiny_server, hf):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True}
    r = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == hf[0].decode(PROMPT)
    assert chunks[-1]["finish_reason"] == "length"
    tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert tokens[0] is None and len(tokens) == len(PROMPT)
    assert tokens[1] == pytest.approx(hf[1][0, PROMPT[1]].item(), abs=1e-4)


def test_vllm_prompt_logprobs_field_on_completions(tiny_server, hf):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    r = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None  # sample logprobs were not asked for
    plps = choice["prompt_logprobs"]
    tok, want = hf
    assert len(plps) == len(PROMPT) and plps[0] is None
    for i in range(1, len(PROMPT)):
        entry = plps[i]
        first = next(iter(entry))
        assert first == str(PROMPT[i])  # the prompt token first, then the top 2
        got = entry[first]
        assert got["logprob"] == pytest.approx(want[i - 1, PROMPT[i]].item(), abs=1e-4)
        assert got["rank"] == int((want[i - 1] > want[i - 1, PROMPT[i]]).sum()) + 1
        assert got["decoded_token"] == tok.decode([PROMPT[i]])
        assert sorted(v["rank"] for v in entry.values() if v["rank"] <= 2) == [1, 2]


def test_vllm_prompt_logprobs_on_chat(tiny_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2,
            "prompt_logprobs": 0}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    plps = out["prompt_logprobs"]
    assert len(plps) == out["usage"]["prompt_tokens"] and plps[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in plps[1:])


def test_vllm_prompt_logprobs_field_streamed_on_completions(tiny_server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": 1, "stream": True}
    r = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    chunks = [json.loads(e[len("data: "):])["choices"][0] for e in r.text.split("\n\n") if e and "[DONE]" not in e]
    with_plps = [c["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c]
    assert len(with_plps) == 1  # once, on the first chunk
    assert "prompt_logprobs" in chunks[0] and len(with_plps[0]) == len(PROMPT) and with_plps[0][0] is None


def test_chat_prompt_logprobs_refused_when_streaming(tiny_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1, "stream": True}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
    ({"prompt": PROMPT, "prompt_logprobs": -1}, "prompt_logprobs", "[0, 20]"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "echo=true"),
])
def test_prompt_logprobs_errors_name_the_field(tiny_server, body, param, words):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
