"""Security at the HTTP edge: the API key guards every path but the documented open ones and is never
logged; chat templates run in jinja's sandbox; big prompts are refused before tokenization and tokenized
off the event loop, so /health keeps answering."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import jinja2.exceptions
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from tokenmill.config import BatchConfig, EngineConfig, ServerConfig
from tokenmill.engine.args import engine_config
from tokenmill.server.access import OPEN_PATHS
from tokenmill.server.app import create_app

KEY = "sk-test-0123456789abcdef"


async def _never_ready(_config):  # the engine stays "loading": auth must answer before any handler
    await asyncio.Event().wait()


def _guarded_app(tmp_path, **server_kw):
    cfg = ServerConfig(api_key=KEY, log_requests=True, batch=BatchConfig(batch_dir=str(tmp_path)), **server_kw)
    return create_app(EngineConfig(), cfg, engine_factory=_never_ready)


def _every_route(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, concrete path) for every route served, path parameters filled in, included routers too."""
    out = []
    for route in routes:
        if isinstance(route, APIRoute | Route):
            path = prefix + re.sub(r"\{[^}]+\}", "x", route.path)
            out += [(m, path) for m in sorted(route.methods or {"GET"}) if m != "HEAD"]
        elif hasattr(route, "original_router"):  # FastAPI keeps included routers whole
            out += _every_route(route.original_router.routes, prefix + route.include_context.prefix)
    return out


def test_the_key_guards_every_path_but_the_open_ones(tmp_path):
    app = _guarded_app(tmp_path)
    http = TestClient(app)  # no lifespan: the engine never loads, auth answers first
    routes = _every_route(app.routes)
    paths = {p for _, p in routes}
    # the routes the issue names are among them (a new route is guarded without being listed anywhere)
    assert {"/v1/completions", "/tokenize", "/detokenize", "/debug/stats", "/openapi.json", "/v1/files",
            "/v1/batches"} <= paths
    for method, path in [*routes, ("GET", "/no/such/route"), ("POST", "/v1/unknown")]:
        open_path = path in OPEN_PATHS or path == "/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"}):
            r = http.request(method, path, headers=headers)
            if open_path:
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, headers, r.text)
                err = r.json()["error"]
                assert err["type"] == "authentication_error" and KEY not in err["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        r = http.request(method, path, headers={"Authorization": f"bearer  {KEY} "})  # scheme case, spaces
        assert r.status_code != 401, (method, path, r.text)


def test_metrics_can_be_closed(tmp_path):
    http = TestClient(_guarded_app(tmp_path, metrics_open=False))
    assert http.get("/metrics").status_code == 401
    assert http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert http.get("/health").status_code == 503  # open, and loading
    assert http.get("/version").status_code == 200


def test_a_non_ascii_authorization_header_is_a_401_not_a_500(tmp_path):
    http = TestClient(_guarded_app(tmp_path))
    r = http.post("/v1/completions", headers={"Authorization": "Bearer caf\xe9".encode("latin-1")}, json={"prompt": "hi"})
    assert r.status_code == 401


def test_the_key_is_never_logged(tmp_path, caplog):
    assert KEY not in repr(ServerConfig(api_key=KEY))  # a logged config shows no key
    http = TestClient(_guarded_app(tmp_path))
    with caplog.at_level(logging.DEBUG):
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {KEY}-wrong"}):
            http.post("/v1/completions", headers=headers, json={"prompt": "hi"})
            http.get("/v1/models", headers=headers)
    assert caplog.records, "the requests logged nothing: the check would be empty"
    assert KEY not in caplog.text


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
])
def test_a_template_from_the_model_files_runs_sandboxed(tiny_llama_dir, tmp_path, template):
    """The server renders every template (model file, --chat-template, request) through transformers'
    apply_chat_template, which compiles it in jinja's ImmutableSandboxedEnvironment."""
    from transformers import AutoTokenizer

    marker = tmp_path / "pwned"
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = template.replace("{marker}", str(marker))  # as if read from tokenizer_config.json
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert not marker.exists()


def test_big_prompts_are_tokenized_off_the_event_loop(tiny_llama_dir):
    """A 1 MB prompt without spaces takes seconds to tokenize; /health answers all the while."""
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.inproc_client import InProcessCoreClient
    from tokenmill.executor.model_runner import ModelRunner

    num_chars = 1_000_000
    cfg = engine_config(str(tiny_llama_dir), block_size=4, num_gpu_blocks_override=64, max_model_len=256,
                        served_model_name="tiny")
    app = create_app(cfg, ServerConfig(max_prompt_chars=2 * num_chars), engine_factory=_never_ready)
    state = app.state.tokenmill

    async def main() -> tuple[httpx.Response, int]:
        state.engine = AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=300) as client:
                big = asyncio.create_task(client.post("/tokenize", json={"prompt": "q" * num_chars}))
                answered = 0
                while not big.done():
                    health = await asyncio.wait_for(client.get("/health"), timeout=60)
                    assert health.status_code == 200
                    answered += not big.done()
                    await asyncio.sleep(0.01)
                return await big, answered
        finally:
            await state.engine.shutdown()

    r, answered_meanwhile = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert r.json()["count"] >= num_chars // 4  # it really tokenized the megabyte
    assert answered_meanwhile >= 3, "the event loop was blocked while the prompt was tokenized"
