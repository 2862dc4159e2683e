"""OpenAI's Batches API: /v1/batches create, retrieve, list (after / limit), cancel.

Creating a batch only records it (status `validating`); the job loop (batch/worker.py) validates the input
file and runs it. Field checks here are the request's own (endpoint, window, file, metadata); the file's
lines are checked by the job, whose failures land in the batch's `errors`, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr

from tokenmill.batch.validate import SUPPORTED_ENDPOINTS
from tokenmill.server.errors import APIError, invalid_param
from tokenmill.server.files_api import batch_store, not_found, page
from tokenmill.server.serving_engine import read_body
from tokenmill.server.state import ServerState

COMPLETION_WINDOWS = {"24h": 24 * 3600}  # the only window OpenAI offers
_MAX_METADATA = 16  # OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512
_CANCELLABLE = ("validating", "in_progress")


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None


def _check(body: CreateBatchRequest) -> None:
    if body.endpoint not in SUPPORTED_ENDPOINTS:
        raise invalid_param("endpoint", f"invalid endpoint {body.endpoint!r}: must be one of "
                            f"{', '.join(SUPPORTED_ENDPOINTS)}")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise invalid_param("completion_window", f"invalid completion_window {body.completion_window!r}: must be "
                            f"{' or '.join(COMPLETION_WINDOWS)}")
    meta = body.metadata or {}
    if len(meta) > _MAX_METADATA:
        raise invalid_param("metadata", f"invalid metadata: {len(meta)} pairs, at most {_MAX_METADATA} allowed")
    for k, v in meta.items():
        if len(k) > 64 or len(v) > 512:
            raise invalid_param("metadata", f"invalid metadata key {k[:64]!r}: keys may have up to 64 characters "
                                "and values up to 512")


def batches_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        body = await read_body(request, CreateBatchRequest, state.server_config.max_body_bytes)
        store = batch_store(state)
        _check(body)
        found = await asyncio.to_thread(store.get_file, body.input_file_id)
        if found is None:
            raise not_found("file", "input_file_id", body.input_file_id)
        if found["purpose"] != "batch":
            raise invalid_param("input_file_id", f"invalid input_file_id {body.input_file_id!r}: its purpose is "
                                f"{found['purpose']!r}; a batch input file must be uploaded with purpose 'batch'")
        batch = await asyncio.to_thread(store.create_batch, body.endpoint, body.input_file_id,
                                        COMPLETION_WINDOWS[body.completion_window], body.completion_window,
                                        body.metadata)
        state.batch.wake()
        return JSONResponse(batch)

    @router.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        data, more = await asyncio.to_thread(batch_store(state).list_batches, after, limit)
        return JSONResponse(page(data, more))

    @router.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str) -> Response:
        found = await asyncio.to_thread(batch_store(state).get_batch, batch_id)
        if found is None:
            raise not_found("batch", "batch_id", batch_id)
        return JSONResponse(found)

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str) -> Response:
        store = batch_store(state)
        moved = await asyncio.to_thread(store.update_batch, batch_id, status="cancelling",
                                        cancelling_at=int(time.time()), only_from=_CANCELLABLE)
        found = await asyncio.to_thread(store.get_batch, batch_id)
        if found is None:
            raise not_found("batch", "batch_id", batch_id)
        if not moved and found["status"] not in ("cancelling", "cancelled"):
            raise APIError(409, f"Cannot cancel batch {batch_id!r}: its status is {found['status']!r}; only a "
                           f"batch that is {' or '.join(_CANCELLABLE)} can be cancelled.", param="batch_id",
                           code="batch_not_cancellable")
        state.batch.cancel(batch_id)
        return JSONResponse(found)

    return router
