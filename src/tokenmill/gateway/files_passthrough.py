"""/v1/files and /v1/batches through the gateway: each file and batch lives on the one replica that created it.

A replica keeps its files and batch jobs in its own store, so a batch must run where its input file is.
The gateway stays stateless about it: every id a replica returns is rewritten to `<id>~<tag>`, where
`tag` is a short hash of the replica's URL, and a later request naming that id (in the path, or as
`input_file_id`) is sent back to the replica with that tag, with the original id restored. The ids stay
opaque strings to clients (the `openai` client only puts them in paths) and survive a gateway restart.

Which replica takes an upload: the pool serving the `model` of the file's first line (sniffed from the
first bytes of the upload, which is otherwise streamed through unbuffered), else the default pool (the only
one, or the first configured); within the pool the ready replica with the fewest requests in flight.
A list without an id is merged across every ready replica of every pool (newest first, then `after` /
`limit` applied at the gateway), so a client sees all its jobs whichever replica holds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.gateway.limits import AuthError
from tokenmill.gateway.metrics import NO_REPLICA
from tokenmill.gateway.pool import Pool
from tokenmill.gateway.proxy import upstream_headers
from tokenmill.gateway.replicas import Replica

log = logging.getLogger("tokenmill.gateway")

SEP = "~"  # unreserved in URLs, so a wrapped id needs no escaping in a path
_ID_FIELDS = ("id", "input_file_id", "output_file_id", "error_file_id")
_SNIFF_BYTES = 64 * 1024  # how much of an upload is held back to find the first line's model
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_MAX_LIST_PAGES = 10  # per replica, 100 objects a page: a merged list reads at most 1000 objects from each
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


def replica_tag(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:10]


def wrap_id(raw: str, url: str) -> str:
    return f"{raw}{SEP}{replica_tag(url)}"


def unwrap_id(gw_id: str) -> tuple[str, str] | None:
    """(replica's id, replica tag), or None when the id was not issued by this gateway."""
    raw, sep, tag = gw_id.rpartition(SEP)
    if not sep or not raw or not re.fullmatch(r"[0-9a-f]{10}", tag):
        return None
    return raw, tag


def wrap_object(obj: object, url: str) -> object:
    """An upstream file / batch / list object with every id field rewritten for the gateway."""
    if isinstance(obj, list):
        return [wrap_object(o, url) for o in obj]
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for k in _ID_FIELDS:
        if isinstance(out.get(k), str):
            out[k] = wrap_id(out[k], url)
    if isinstance(out.get("data"), list):
        out["data"] = wrap_object(out["data"], url)
    return out


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def merge_lists(pages: list[list[dict]], after: str | None, limit: int, ascending: bool) -> dict:
    """One OpenAI list object from several replicas' objects (ids already wrapped), ordered by created_at."""
    items = sorted((o for page in pages for o in page),
                   key=lambda o: (o.get("created_at") or 0, o.get("id") or ""), reverse=not ascending)
    if after is not None:
        ids = [o.get("id") for o in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}


class FilesPassthrough:
    """The routes' logic, over the gateway's pools and its httpx client (no state of its own)."""

    def __init__(self, gateway) -> None:  # tokenmill.gateway.app.Gateway (not imported: app imports us)
        self.gw = gateway

    # -- who and where -----------------------------------------------------------------------------
    def _auth(self, request: Request) -> JSONResponse | None:
        try:
            self.gw.keys.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        except AuthError as e:
            self.gw.metrics.requests.labels("none", NO_REPLICA, "401").inc()
            return _error(401, str(e), code="invalid_api_key")
        return None

    def _headers(self, request: Request, pool: Pool) -> dict[str, str]:
        incoming = {k.lower(): v for k, v in request.headers.items()}
        return upstream_headers(incoming, pool.config.api_key, pass_auth=not self.gw.keys.enabled)

    def _default_pool(self) -> Pool | None:
        return next(iter(self.gw.pools.values()), None)

    def _locate(self, gw_id: str, field: str) -> tuple[Pool, Replica, str] | JSONResponse:
        parts = unwrap_id(gw_id)
        if parts is None:
            return _error(404, f"{field}: no such object {gw_id!r} (ids from this gateway end in "
                          f"'{SEP}' and a replica tag)", code="not_found", param=field)
        raw, tag = parts
        for pool in self.gw.pools.values():
            for r in pool.replicas:
                if replica_tag(r.url) == tag:
                    return pool, r, raw
        return _error(404, f"{field}: {gw_id!r} was created on a replica that is no longer in any pool",
                      code="replica_gone", param=field)

    @staticmethod
    def _pick(pool: Pool) -> Replica | None:
        ready = pool.ready_replicas()
        return min(ready, key=lambda r: r.load_score()) if ready else None

    # -- one upstream call -------------------------------------------------------------------------
    async def _send(self, pool: Pool, replica: Replica, method: str, path: str, request: Request,
                    content: bytes | AsyncIterator[bytes] | None = None,
                    extra_headers: dict[str, str] | None = None) -> httpx.Response | JSONResponse:
        headers = {**self._headers(request, pool), **(extra_headers or {})}
        req = self.gw.client.build_request(method, f"{replica.url}{path}", params=request.query_params,
                                           headers=headers, content=content)
        try:
            resp = await self.gw.client.send(req, stream=True)
        except httpx.HTTPError as e:
            self.gw.metrics.requests.labels(pool.name, replica.url, "503").inc()
            return _error(503, f"replica {replica.url} holding this object failed: {type(e).__name__}",
                          "server_error", "upstream_unavailable")
        self.gw.metrics.requests.labels(pool.name, replica.url, str(resp.status_code)).inc()
        return resp

    async def _json_reply(self, pool: Pool, replica: Replica, resp: httpx.Response | JSONResponse) -> Response:
        if isinstance(resp, Response):
            return resp
        try:
            data = await resp.aread()
        finally:
            await resp.aclose()
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        headers["x-tokenmill-replica"] = replica.url
        if resp.status_code == 200 and "json" in resp.headers.get("content-type", ""):
            try:
                data = json.dumps(wrap_object(json.loads(data), replica.url)).encode()
            except ValueError:
                pass
        return Response(data, status_code=resp.status_code, headers=headers)

    # -- routes ------------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        stream = request.stream()
        head = b""
        model: str | None = None
        async for chunk in stream:  # hold back only the first bytes, until the first line's model shows
            head += chunk
            if (m := _MODEL.search(head)) or len(head) >= _SNIFF_BYTES:
                model = json.loads(b'"' + m.group(1) + b'"') if m else None
                break
        pool = (self.gw.pool_for(model) if model else None) or self._default_pool()
        replica = self._pick(pool) if pool is not None else None
        if pool is None or replica is None:
            return _error(503, "no ready replica to store the file on", "server_error", "upstream_unavailable")

        async def body() -> AsyncIterator[bytes]:
            yield head
            async for chunk in stream:
                yield chunk

        length = request.headers.get("content-length")
        resp = await self._send(pool, replica, "POST", "/v1/files", request, body(),
                                {"content-length": length} if length else None)
        return await self._json_reply(pool, replica, resp)

    async def by_id(self, request: Request, gw_id: str, method: str, suffix: str = "",
                    kind: str = "file_id") -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        found = self._locate(gw_id, kind)
        if isinstance(found, Response):
            return found
        pool, replica, raw = found
        base = "/v1/files/" if kind == "file_id" else "/v1/batches/"
        resp = await self._send(pool, replica, method, f"{base}{raw}{suffix}", request)
        if suffix != "/content" or isinstance(resp, Response) or resp.status_code != 200:
            return await self._json_reply(pool, replica, resp)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        return StreamingResponse(resp.aiter_raw(), status_code=200, headers=headers,
                                 background=_Closer(resp))

    async def create_batch(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "request body is not valid JSON")
        file_id = body.get("input_file_id") if isinstance(body, dict) else None
        if not isinstance(file_id, str):
            return _error(400, "input_file_id: required, the id of an uploaded file (purpose 'batch')",
                          param="input_file_id")
        found = self._locate(file_id, "input_file_id")
        if isinstance(found, Response):
            return found
        pool, replica, raw = found
        content = json.dumps({**body, "input_file_id": raw}).encode()
        resp = await self._send(pool, replica, "POST", "/v1/batches", request, content,
                                {"content-type": "application/json"})
        return await self._json_reply(pool, replica, resp)

    async def list_merged(self, request: Request, path: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        q = request.query_params
        try:
            limit = int(q.get("limit", 20))
        except ValueError:
            return _error(400, f"limit: must be an integer, got {q.get('limit')!r}", param="limit")
        if not 1 <= limit <= 10000:
            return _error(400, f"limit: must be between 1 and 10000, got {limit}", param="limit")
        seen: set[str] = set()
        pages: list[list[dict]] = []
        for pool in self.gw.pools.values():
            for r in pool.ready_replicas():
                if r.url not in seen:
                    seen.add(r.url)
                    pages.append(await self._read_all(pool, r, path, request))
        return JSONResponse(merge_lists(pages, q.get("after"), limit, q.get("order") == "asc"))

    async def _read_all(self, pool: Pool, replica: Replica, path: str, request: Request) -> list[dict]:
        """Every object a replica lists (paged, bounded), ids wrapped; a failing replica contributes nothing."""
        params = {k: v for k, v in request.query_params.items() if k not in ("after", "limit")}
        out: list[dict] = []
        after: str | None = None
        for _ in range(_MAX_LIST_PAGES):
            try:
                r = await self.gw.client.get(f"{replica.url}{path}", headers=self._headers(request, pool),
                                             params={**params, "limit": 100, **({"after": after} if after else {})})
                page = r.json() if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as e:
                log.warning("listing %s on %s failed: %r", path, replica.url, e)
                page = None
            if not isinstance(page, dict) or not isinstance(page.get("data"), list) or not page["data"]:
                break
            out += page["data"]
            after = page["data"][-1].get("id")
            if not page.get("has_more") or not isinstance(after, str):
                break
        return [o for o in wrap_object(out, replica.url) if isinstance(o, dict)]  # type: ignore[union-attr]


class _Closer:
    """Background task of a streamed download: close the upstream response once the body is sent."""

    def __init__(self, resp: httpx.Response) -> None:
        self.resp = resp

    async def __call__(self) -> None:
        await self.resp.aclose()


def add_files_routes(app: FastAPI, gateway) -> None:
    fp = FilesPassthrough(gateway)

    @app.post("/v1/files")
    async def upload(request: Request) -> Response:
        return await fp.upload(request)

    @app.get("/v1/files")
    async def list_files(request: Request) -> Response:
        return await fp.list_merged(request, "/v1/files")

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> Response:
        return await fp.by_id(request, file_id, "GET")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> Response:
        return await fp.by_id(request, file_id, "DELETE")

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        return await fp.by_id(request, file_id, "GET", "/content")

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> Response:
        return await fp.create_batch(request)

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        return await fp.list_merged(request, "/v1/batches")

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Response:
        return await fp.by_id(request, batch_id, "GET", kind="batch_id")

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        return await fp.by_id(request, batch_id, "POST", "/cancel", kind="batch_id")
