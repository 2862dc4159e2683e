"""Files / Batches API edges that need no model: they work while the engine loads; limits, auth, busy dirs."""

from __future__ import annotations

import asyncio
import json

from fastapi.testclient import TestClient

from tokenmill.config import BatchConfig, EngineConfig, ServerConfig
from tokenmill.server.app import create_app


async def _never_ready(_config):  # the engine is still loading for the whole test
    await asyncio.Event().wait()


def _app(tmp_path, **server):
    batch = BatchConfig(batch_dir=str(tmp_path / "batches"), max_file_bytes=2048)
    return create_app(EngineConfig(), ServerConfig(batch=batch, **server), engine_factory=_never_ready)


LINE = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}) + "\n"


def test_files_and_batches_work_while_the_model_loads(tmp_path):
    with TestClient(_app(tmp_path)) as http:
        up = http.post("/v1/files", files={"file": ("in.jsonl", LINE.encode())}, data={"purpose": "batch"})
        assert up.status_code == 200, up.text
        f = up.json()
        assert f["object"] == "file" and f["id"].startswith("file-") and f["bytes"] == len(LINE)
        assert http.get(f"/v1/files/{f['id']}/content").content == LINE.encode()
        b = http.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                           "completion_window": "24h"})
        assert b.status_code == 200 and b.json()["status"] in ("validating", "in_progress")
        listed = http.get("/v1/batches", params={"limit": 1}).json()
        assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == [b.json()["id"]]
        assert http.post(f"/v1/batches/{b.json()['id']}/cancel").json()["id"] == b.json()["id"]


def test_upload_limits_and_field_errors(tmp_path):
    with TestClient(_app(tmp_path)) as http:
        big = http.post("/v1/files", files={"file": ("in.jsonl", b"x" * 4096)}, data={"purpose": "batch"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"
        assert list((tmp_path / "batches" / "tmp").iterdir()) == []  # the partial upload is gone
        missing = http.post("/v1/files", data={"purpose": "batch"})
        assert missing.status_code == 400 and "file" in missing.text
        extra = http.post("/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/completions",
                                               "completion_window": "24h", "priority": 3})
        assert extra.status_code == 400 and extra.json()["error"]["param"] == "priority"
        meta = http.post("/v1/batches", json={"input_file_id": "f", "endpoint": "/v1/completions",
                                              "completion_window": "24h", "metadata": {str(i): "v" for i in range(17)}})
        assert meta.status_code == 400 and meta.json()["error"]["param"] == "metadata"
        gone = http.delete("/v1/files/file-nope")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "file_id"


def test_api_key_guards_files_and_batches(tmp_path):
    with TestClient(_app(tmp_path, api_key="k")) as http:
        assert http.get("/v1/files").status_code == 401
        assert http.get("/v1/batches").status_code == 401
        assert http.get("/v1/files", headers={"Authorization": "Bearer k"}).status_code == 200


def test_a_second_server_on_the_same_dir_answers_503_naming_it(tmp_path):
    with TestClient(_app(tmp_path)), TestClient(_app(tmp_path)) as second:
        r = second.get("/v1/batches")
        assert r.status_code == 503 and "--batch-dir" in r.json()["error"]["message"]
        assert second.get("/health").status_code == 503  # only loading: the rest of the server is unaffected
