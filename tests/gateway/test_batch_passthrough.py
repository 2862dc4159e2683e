"""/v1/files and /v1/batches through the gateway: id wrapping and list merging (properties), then the
official `openai` client through a real gateway in front of two real `tokenmill serve` replicas (tiny
Llama, each with its own --batch-dir): upload, create, poll to completed, download, pinned to one replica;
lists merged across replicas; the gateway's API keys enforced."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.servers import TINY_SERVER_FLAGS, start_server
from tests.gateway.conftest import start_gateway, wait_until
from tokenmill.gateway.config import (
    ApiKeyConfig,
    GatewayConfig,
    HealthConfig,
    PoolConfig,
    ReplicaConfig,
)
from tokenmill.gateway.files_passthrough import (
    merge_lists,
    replica_tag,
    unwrap_id,
    wrap_id,
    wrap_object,
)

_ID = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(raw=_ID, url=st.sampled_from(["http://127.0.0.1:8001", "http://10.0.0.2:9000/", "http://h:1"]))
def test_wrapped_ids_round_trip(raw, url):
    """Any replica id (even one containing the separator) comes back unchanged, with its replica's tag."""
    assert unwrap_id(wrap_id(raw, url)) == (raw, replica_tag(url))


def test_foreign_ids_are_not_unwrapped():
    for gw_id in ("file-abc", "file~xyz", "~0123456789", "batch_1~0123456789a", "a~ABCDEF0123"):
        assert unwrap_id(gw_id) is None


def test_wrap_object_rewrites_every_id_field():
    batch = {"id": "batch_1", "object": "batch", "input_file_id": "file-1", "output_file_id": "file-2",
             "error_file_id": None, "metadata": {"id": "mine"}}
    out = wrap_object({"object": "list", "data": [batch]}, "http://r:1")["data"][0]
    tag = replica_tag("http://r:1")
    assert out == {**batch, "id": f"batch_1~{tag}", "input_file_id": f"file-1~{tag}",
                   "output_file_id": f"file-2~{tag}"}  # null ids and metadata untouched


@settings(max_examples=100, deadline=None)
@given(created=st.lists(st.lists(st.integers(0, 20), max_size=8), min_size=1, max_size=3),
       limit=st.integers(1, 5), ascending=st.booleans())
def test_paging_a_merged_list_visits_every_object_once(created, limit, ascending):
    """Following `after` cursors through merged replica lists yields each object exactly once, in order."""
    pages = [[{"id": f"r{r}-{i}", "created_at": c} for i, c in enumerate(cs)] for r, cs in enumerate(created)]
    seen, after = [], None
    for _ in range(100):
        page = merge_lists(pages, after, limit, ascending)
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(o["id"] for o in seen) == sorted(o["id"] for p in pages for o in p)
    keys = [o["created_at"] for o in seen]
    assert keys == sorted(keys, reverse=not ascending)


# -- live: real replicas, real gateway, the openai client ---------------------------------------------------

KEY = "sk-gw-test"


@pytest.fixture(scope="module")
def two_replicas(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw_batch")
    servers = [start_server(tiny_llama_dir, *TINY_SERVER_FLAGS, "--batch-dir", str(tmp / f"b{i}"),
                            tmp_dir=tmp, wait_ready=False) for i in range(2)]
    try:
        from tests.fixtures.servers import wait_healthy

        for s in servers:
            wait_healthy(s)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def gateway(two_replicas, gateways):
    pool = PoolConfig(name="tiny", model="tiny", replicas=tuple(ReplicaConfig(url=s.url) for s in two_replicas))
    health = HealthConfig(interval_s=0.5, timeout_s=10.0, failure_threshold=5, eject_s=0.5, scrape_interval_s=1.0)
    g = start_gateway(GatewayConfig(pools=(pool,), health=health, api_keys=(ApiKeyConfig(key=KEY, name="t"),)))
    gateways.append(g)
    wait_until(lambda: len(g.gateway.pools["tiny"].ready_replicas()) == 2, 30, "both replicas ready")
    return g


def _lines(n: int) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}"}],
                      "max_tokens": 6, "temperature": 0}} for i in range(n)]


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def test_openai_client_through_the_gateway(gateway, two_replicas):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    lines = _lines(6)
    f = client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    raw_id, tag = unwrap_id(f.id)
    home = next(s for s in two_replicas if replica_tag(s.url) == tag)
    other = next(s for s in two_replicas if s is not home)
    # The file lives on exactly one replica, under the replica's own id.
    assert httpx.get(f"{home.url}/v1/files/{raw_id}").status_code == 200
    assert httpx.get(f"{other.url}/v1/files/{raw_id}").status_code == 404
    assert client.files.retrieve(f.id).id == f.id

    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert unwrap_id(batch.id)[1] == tag and batch.input_file_id == f.id  # pinned to the file's replica
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(lines) and unwrap_id(batch.output_file_id)[1] == tag
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(x["custom_id"] for x in lines)
    assert all(r["response"]["status_code"] == 200 for r in out)

    # A file uploaded straight to the other replica shows up in the gateway's merged list, wrapped.
    direct = httpx.post(f"{other.url}/v1/files", files={"file": ("d.jsonl", _jsonl(lines[:1]))},
                        data={"purpose": "batch"}).json()
    listed = {x.id for x in client.files.list()}
    assert {f.id, batch.output_file_id, wrap_id(direct["id"], other.url)} <= listed
    assert batch.id in {b.id for b in client.batches.list()}
    page = client.batches.list(limit=1)
    assert len(page.data) == 1

    deleted = client.files.delete(wrap_id(direct["id"], other.url))
    assert deleted.deleted and httpx.get(f"{other.url}/v1/files/{direct['id']}").status_code == 404


def test_gateway_keys_and_unknown_ids(gateway):
    assert httpx.get(f"{gateway.url}/v1/batches").status_code == 401
    r = httpx.post(f"{gateway.url}/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"},
                   headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{gateway.url}/v1/files/file-not-from-here", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["param"] == "file_id"
    r = httpx.post(f"{gateway.url}/v1/batches", headers=auth, json={"input_file_id": "file-x~0123456789",
                                                                     "endpoint": "/v1/chat/completions"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "replica_gone"
