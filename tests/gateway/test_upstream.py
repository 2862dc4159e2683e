"""The proxy's upstream client (aiohttp wrapper) against a real local aiohttp.web server on 127.0.0.1:
streamed and fixed-length bodies, keep-alive reuse, client leaving mid-stream, refused, silent and broken streams."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from aiohttp import web

from tokenmill.gateway.actuators import free_port
from tokenmill.gateway.upstream import UpstreamClient, UpstreamError


class Server:
    """Routes: /stream (chunked SSE, one event per `step` event), /fixed (Content-Length JSON),
    /silent (one event then nothing), /broken (one event then the connection drops), /gzip."""

    def __init__(self) -> None:
        self.peers: set[tuple] = set()  # distinct client connections seen
        self.requests: list[tuple[dict, bytes]] = []
        self.step = asyncio.Event()
        self.stream_cancelled = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _record(self, request: web.Request) -> None:
        self.peers.add(request.transport.get_extra_info("peername"))
        self.requests.append((dict(request.headers), await request.read()))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(int(request.query.get("n", "2"))):
                if request.query.get("wait"):
                    await self.step.wait()
                    self.step.clear()
                await resp.write(f"data: {i}\n\n".encode())
        except asyncio.CancelledError:
            self.stream_cancelled.set()  # aiohttp.web cancels the handler when the client disconnects
            raise
        await resp.write_eof()
        return resp

    async def fixed(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"ok": True}, headers={"x-replica": "r1"})

    async def silent(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: a\n\n")
        await asyncio.sleep(30)
        return resp

    async def broken(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: a\n\n")
        request.transport.close()  # dies mid-body: the chunked body never ends
        return resp

    async def drop(self, request: web.Request) -> web.Response:
        await self._record(request)
        request.transport.close()  # got the request, then the connection drops before any answer
        raise asyncio.CancelledError

    async def slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        await asyncio.sleep(float(request.query.get("s", "1")))  # like a long generation: silent, then whole
        return web.json_response({"ok": True})

    async def gzipped(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(body=gzip.compress(b"hello"), headers={"content-encoding": "gzip"})

    async def start(self, keepalive_timeout: float = 75.0) -> str:
        app = web.Application()
        app.add_routes([web.post("/stream", self.stream), web.post("/fixed", self.fixed),
                        web.post("/silent", self.silent), web.post("/broken", self.broken),
                        web.post("/gzip", self.gzipped), web.post("/drop", self.drop),
                        web.post("/slow", self.slow)])
        self.runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout, handler_cancellation=True)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        await self.runner.cleanup()


def client(read_timeout_s: float = 5.0) -> UpstreamClient:
    return UpstreamClient(connect_timeout_s=2, read_timeout_s=read_timeout_s, max_connections=16,
                          max_connections_per_replica=8)


def run(test, read_timeout_s: float = 5.0) -> None:
    async def main() -> None:
        server = Server()
        await server.start()
        up = client(read_timeout_s)
        try:
            await test(server, up)
        finally:
            await up.close()
            await server.stop()

    asyncio.run(main())


def test_streamed_and_fixed_bodies_reuse_one_connection():
    async def test(server: Server, up: UpstreamClient) -> None:
        r = await up.post(f"{server.url}/stream?n=3", b'{"x":1}', {"content-type": "application/json",
                                                                   "x-session-id": "s1"})
        assert r.status == 200 and ("content-type", "text/event-stream") in r.headers
        assert b"".join([c async for c in r.aiter_body()]) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        await r.aclose()
        r = await up.post(f"{server.url}/fixed", b"{}", {})
        assert await r.aread() == b'{"ok": true}' and ("x-replica", "r1") in r.headers
        await r.aclose()
        assert len(server.peers) == 1  # keep-alive: the second request reused the first connection
        headers, body = server.requests[0]
        assert body == b'{"x":1}' and headers["x-session-id"] == "s1"
        assert "Accept-Encoding" not in headers and "Cookie" not in headers

    run(test)


def test_chunks_arrive_as_the_server_sends_them():
    async def test(server: Server, up: UpstreamClient) -> None:
        r = await up.post(f"{server.url}/stream?n=3&wait=1", b"{}", {})
        it = r.aiter_body()
        for i in range(3):
            server.step.set()  # the server sends the next event only now: nothing may wait for more
            assert await asyncio.wait_for(anext(it), 5) == f"data: {i}\n\n".encode()
        assert [c async for c in it] == []
        await r.aclose()

    run(test)


def test_leaving_mid_stream_closes_the_upstream_connection():
    async def test(server: Server, up: UpstreamClient) -> None:
        r = await up.post(f"{server.url}/stream?n=100&wait=1", b"{}", {})
        it = r.aiter_body()
        server.step.set()
        assert await anext(it) == b"data: 0\n\n"
        await r.aclose()  # the client left: the replica must see the disconnect and stop generating
        await asyncio.wait_for(server.stream_cancelled.wait(), 5)
        r = await up.post(f"{server.url}/fixed", b"{}", {})
        await r.aread()
        await r.aclose()
        assert len(server.peers) == 2  # the half-read connection was not put back in the pool

    run(test)


def test_refused_connection_is_a_connect_error():
    async def main() -> None:
        up = client()
        with pytest.raises(UpstreamError) as e:
            await up.post(f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", {})
        assert e.value.connect
        await up.close()

    asyncio.run(main())


def test_a_stream_that_goes_silent_times_out():
    async def test(server: Server, up: UpstreamClient) -> None:
        r = await up.post(f"{server.url}/silent", b"{}", {})
        it = r.aiter_body()
        assert await anext(it) == b"data: a\n\n"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(it), 10)
        await r.aclose()

    run(test, read_timeout_s=0.3)


def test_a_body_cut_mid_stream_is_an_upstream_error():
    async def test(server: Server, up: UpstreamClient) -> None:
        r = await up.post(f"{server.url}/broken", b"{}", {})
        it = r.aiter_body()
        assert await anext(it) == b"data: a\n\n"
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(anext(it), 10)
        await r.aclose()

    run(test)


def test_bodies_are_relayed_as_sent_and_closed_idle_connections_are_replaced():
    async def main() -> None:
        server = Server()
        await server.start(keepalive_timeout=0.1)  # the server closes idle keep-alive connections quickly
        up = client()
        for _ in range(2):
            r = await up.post(f"{server.url}/gzip", b"{}", {})
            assert ("content-encoding", "gzip") in r.headers
            assert gzip.decompress(await r.aread()) == b"hello"  # not decompressed by the client
            await r.aclose()
            await asyncio.sleep(0.5)
        assert len(server.peers) == 2
        await up.close()
        await server.stop()

    asyncio.run(main())


def test_a_once_request_that_reached_the_replica_is_never_resent():
    async def test(server: Server, up: UpstreamClient) -> None:
        with pytest.raises(UpstreamError) as e:
            await up.post(f"{server.url}/drop", b"{}", {}, once=True)
        assert not e.value.connect  # it was sent: not a "nothing listening" failure
        assert len(server.requests) == 1  # the replica got it once; no resend
        with pytest.raises(UpstreamError):
            await up.post(f"{server.url}/drop", b"{}", {})
        assert len(server.requests) == 3  # a stream is resent once: the replica aborted the first on the drop

    run(test)


def test_once_requests_use_fresh_connections_and_no_idle_watchdog():
    async def test(server: Server, up: UpstreamClient) -> None:
        for _ in range(2):  # silent for 0.6 s, twice the idle watchdog: only a total bound may cut it
            r = await up.post(f"{server.url}/slow?s=0.6", b"{}", {}, once=True)
            assert r.status == 200 and await r.aread() == b'{"ok": true}'
            await r.aclose()
        assert len(server.peers) == 2  # a fresh connection each: a drop is never a stale keep-alive
        with pytest.raises(TimeoutError):
            await up.post(f"{server.url}/slow?s=5", b"{}", {}, once=True, total_s=0.3)
        with pytest.raises(TimeoutError):  # a stream keeps its idle watchdog
            r = await up.post(f"{server.url}/slow?s=5", b"{}", {})
            await r.aread()

    run(test, read_timeout_s=0.3)
