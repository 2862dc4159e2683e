"""OpenAI's Files API, as the Batch API needs it: /v1/files upload (multipart), list, retrieve, content, delete.

The bytes live under the batch directory (batch/store.py); an upload is copied in chunks to a temporary
file and only recorded once complete, so a crash mid-upload leaves no file behind.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from tokenmill.batch.store import BatchStore
from tokenmill.server.errors import APIError, invalid_param, unavailable
from tokenmill.server.state import ServerState

PURPOSES = ("batch",)  # what this server's files are for; batch_output files are written by the server itself
_CHUNK = 1 << 20


def batch_store(state: ServerState) -> BatchStore:
    """The store, or 503 when this server runs without the Batch API (its directory is owned by another)."""
    if state.batch is None:
        raise unavailable(state.extra.get("batch_error") or "The Batch API is not running (the server is "
                          "starting or shutting down).")
    return state.batch.store


def not_found(kind: str, param: str, rid: str) -> APIError:
    return APIError(404, f"No {kind} found with id {rid!r}.", param=param, code="not_found")


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: the client asks for `after=last_id` while `has_more`."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


async def _save_upload(store: BatchStore, upload: UploadFile, max_bytes: int) -> Any:
    tmp = store.tmp_path()
    size = 0
    out = await asyncio.to_thread(open, tmp, "wb")
    try:
        with out:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"invalid file: larger than the limit of {max_bytes} bytes for a batch "
                                   "input file.", param="file", code="file_too_large")
                await asyncio.to_thread(out.write, chunk)
        return await asyncio.to_thread(store.add_file, tmp, upload.filename or "upload.jsonl", "batch")
    finally:
        tmp.unlink(missing_ok=True)


def files_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/files")
    async def create_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> Response:
        store = batch_store(state)
        if purpose not in PURPOSES:
            raise invalid_param("purpose", f"invalid purpose {purpose!r}: this server accepts files with purpose "
                                f"{', '.join(PURPOSES)} (inputs of the Batch API)")
        return JSONResponse(await _save_upload(store, file, state.server_config.batch.max_file_bytes))

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc") -> Response:
        data, more = await asyncio.to_thread(batch_store(state).list_files, purpose, after, limit, order)
        return JSONResponse(page(data, more))

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        found = await asyncio.to_thread(batch_store(state).get_file, file_id)
        if found is None:
            raise not_found("file", "file_id", file_id)
        return JSONResponse(found)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        store = batch_store(state)
        found = await asyncio.to_thread(store.get_file, file_id)
        if found is None:
            raise not_found("file", "file_id", file_id)
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream",
                            filename=found["filename"])

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        store = batch_store(state)
        users = await asyncio.to_thread(store.active_batches_using, file_id)
        if users:
            raise APIError(409, f"File {file_id!r} is the input of batch {users[0]!r}, which is still running; "
                           "cancel it or wait for it to end first.", param="file_id", code="file_in_use")
        if not await asyncio.to_thread(store.delete_file, file_id):
            raise not_found("file", "file_id", file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    return router
