"""Multi-LoRA over HTTP on a tiny Llama with random PEFT adapters: the `openai` client picks adapters by
`model`, /v1/models lists them, /v1/load_lora_adapter and /v1/unload_lora_adapter change them at run time,
and outputs through an adapter equal the offline LLM.generate with the same adapter."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server
from tests.lora.conftest import SPECS, make_adapter
from tokenmill.lora.request import LoRARequest

from .test_live import metric

PROMPTS = ["Hello world", "The quick brown fox"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server_adapters")
    return {s.name: str(make_adapter(tiny_llama_dir, root / s.name, s, seed=i + 11)) for i, s in enumerate(SPECS[:3])}


@pytest.fixture(scope="module")
def lora_server(tiny_llama_dir, adapters, tmp_path_factory):
    server = start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--enable-lora", "--max-loras", "2",
                          "--max-lora-rank", "16", "--max-cpu-loras", "3",
                          "--lora-modules", f"static={adapters['attn-r4']}", "--allow-runtime-lora-updating",
                          tmp_dir=tmp_path_factory.mktemp("lora_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lora_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_llama_dir, adapters):
    """Greedy texts of the offline LLM per adapter name (None: the base model)."""
    import tokenmill

    llm = tokenmill.LLM(str(tiny_llama_dir), max_model_len=256, kv_cache_memory=0.02, dtype="float32",
                        enable_lora=True, max_loras=2, max_lora_rank=16)
    params = tokenmill.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {None: [o.outputs[0].text for o in llm.generate(PROMPTS, params)]}
    for i, (name, path) in enumerate(adapters.items()):
        lora = LoRARequest(name, 100 + i, path)
        out[name] = [o.outputs[0].text for o in llm.generate(PROMPTS, params, lora_request=lora)]
    return out


def complete(client: openai.OpenAI, model: str) -> list[str]:
    r = client.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.model == model
    return [c.text for c in sorted(r.choices, key=lambda c: c.index)]


def load(server, name: str, path: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)


def unload(server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def test_static_adapter_listed_and_served(client, offline, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "static"}
    assert cards["static"].parent == "tiny" and cards["static"].root == adapters["attn-r4"]
    assert cards["tiny"].parent is None
    assert complete(client, "static") == offline["attn-r4"]
    assert complete(client, "tiny") == offline[None]
    assert offline["attn-r4"] != offline[None]  # the adapter changes the output


def test_load_complete_unload(lora_server, client, offline, adapters):
    r = load(lora_server, "mlp", adapters["mlp-r8"])
    assert r.status_code == 200, r.text
    assert "mlp" in {m.id for m in client.models.list().data}
    assert complete(client, "mlp") == offline["mlp-r8"] != offline[None]
    dup = load(lora_server, "mlp", adapters["mlp-r8"])
    assert dup.status_code == 400 and "already been loaded" in dup.json()["error"]["message"]
    base_name = load(lora_server, "tiny", adapters["mlp-r8"])
    assert base_name.status_code == 400 and base_name.json()["error"]["param"] == "lora_name"
    assert unload(lora_server, "mlp").status_code == 200
    assert "mlp" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        complete(client, "mlp")
    again = unload(lora_server, "mlp")
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"


def test_unknown_adapter_is_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "static" in err["message"]  # the served names are listed, adapters included


@pytest.mark.parametrize(("breakage", "file", "problem"), [
    ("no_weights", "adapter_model.safetensors", "missing"),
    ("rank_too_high", "adapter_config.json", "exceeds max_lora_rank=16"),
    ("other_base", "adapter_model.safetensors", "layer 99 is beyond"),  # needs the model's shapes: the core checks
])
def test_malformed_adapter_is_400_naming_file_and_problem(lora_server, client, offline, adapters, tmp_path,
                                                          breakage, file, problem):
    bad = tmp_path / "bad"
    shutil.copytree(adapters["attn-r4"], bad)
    cfg_file, weights = bad / "adapter_config.json", bad / "adapter_model.safetensors"
    if breakage == "no_weights":
        weights.unlink()
    elif breakage == "rank_too_high":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "r": 64}))
    else:  # a tensor of a layer the 2-layer tiny model does not have
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors = {k.replace("layers.0.", "layers.99."): v for k, v in tensors.items()}
        save_file(tensors, str(weights))
    r = load(lora_server, f"bad-{breakage}", str(bad))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "lora_path" and file in err["message"] and problem in err["message"]
    assert f"bad-{breakage}" not in {m.id for m in client.models.list().data}
    assert complete(client, "static") == offline["attn-r4"]  # the server keeps serving


def test_three_adapters_and_base_concurrently_over_two_slots(lora_server, offline, adapters):
    """More adapters than --max-loras at once: cold ones wait for a slot, all outputs stay exact."""
    for name in ("attn-r4", "mlp-r8", "all-r16-rslora"):
        if name != "attn-r4":
            assert load(lora_server, name, adapters[name]).status_code == 200
    models = {"tiny": None, "static": "attn-r4", "mlp-r8": "mlp-r8", "all-r16-rslora": "all-r16-rslora"}

    async def run() -> dict[str, list[str]]:
        c = openai.AsyncOpenAI(base_url=lora_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async def one(model: str) -> list[str]:
            r = await c.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
            return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
        outs = await asyncio.gather(*(one(m) for m in models for _ in range(2)))
        await c.close()
        return dict(zip([m for m in models for _ in range(2)], outs))

    got = asyncio.run(run())
    for model, ref in models.items():
        assert got[model] == offline[ref], model
    text = httpx.get(lora_server.url + "/metrics").text
    assert metric(text, "tokenmill_lora_requests_total", lora_name="mlp-r8") >= 2
    assert metric(text, "tokenmill_lora_swaps_total") >= 3  # three adapters through two slots
    assert metric(text, "tokenmill_lora_adapters_served") == 3
    assert 1 <= metric(text, "tokenmill_lora_adapters_loaded") <= 3
    info = [ln for ln in text.splitlines() if ln.startswith("tokenmill_lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0]
    for name in ("mlp-r8", "all-r16-rslora"):
        assert unload(lora_server, name).status_code == 200


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(name=st.text(min_size=1, max_size=12),
       path=st.one_of(st.text(min_size=1, max_size=64), st.integers(250, 600).map(lambda n: "d" * n),
                      st.sampled_from(["/", "/etc/hostname", "/proc/self", "/dev/null", ".", "..", "~", "a/../../b"])))
def test_fuzz_load_endpoint_answers_4xx_never_5xx(lora_server, client, offline, name, path):
    """Any name and path: a 400 (or 200 for a real adapter folder), never a server error; still serving."""
    r = load(lora_server, name, path)
    assert r.status_code in (200, 400), (name, path, r.status_code, r.text)
    if r.status_code == 200:
        assert unload(lora_server, name).status_code == 200
    else:
        assert r.json()["error"]["message"]


def test_server_still_serves_after_the_fuzzing(client, offline):
    assert complete(client, "static") == offline["attn-r4"]
