"""The proxy's HTTP/1.1 client against a raw asyncio server: framing, keep-alive reuse, stale connections."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.gateway import upstream


async def serve(responses: list[bytes], close_after_each: bool):
    """A real TCP server: answers requests in order with the canned responses; counts connections."""
    state = {"connections": 0, "requests": []}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        while responses:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
            state["requests"].append(head + await reader.readexactly(length))
            writer.write(responses.pop(0))
            await writer.drain()
            if close_after_each:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", state


CHUNKED = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           b"7\r\ndata: a\r\n7;ext=1\r\ndata: b\r\n0\r\n\r\n")
FIXED = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


def test_chunked_and_fixed_bodies_reuse_one_connection():
    async def main() -> None:
        server, url, state = await serve([CHUNKED, FIXED], close_after_each=False)
        pool = upstream.ConnectionPool(connect_timeout_s=2)
        r = await upstream.post(pool, f"{url}/v1/completions", b'{"x":1}', {"content-type": "application/json"}, 5)
        assert r.status == 200 and ("content-type", "text/event-stream") in r.headers
        assert [c async for c in r.aiter_body()] == [b"data: a", b"data: b"]
        await r.aclose()
        r = await upstream.post(pool, f"{url}/v1/completions", b"{}", {}, 5)
        assert await r.aread() == b'{"ok":true}'
        await r.aclose()
        assert state["connections"] == 1
        assert state["requests"][0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
        assert state["requests"][0].endswith(b'\r\n\r\n{"x":1}')
        pool.close()
        server.close()

    asyncio.run(main())


def test_server_closed_idle_connection_is_replaced_transparently():
    async def main() -> None:
        server, url, state = await serve([FIXED, FIXED], close_after_each=True)
        pool = upstream.ConnectionPool(connect_timeout_s=2)
        for _ in range(2):
            r = await upstream.post(pool, f"{url}/x", b"{}", {}, 5)
            assert await r.aread() == b'{"ok":true}'
            await r.aclose()
        assert state["connections"] == 2
        pool.close()
        server.close()

    asyncio.run(main())


def test_unread_body_closes_the_connection_and_refused_is_a_connect_error():
    async def main() -> None:
        server, url, state = await serve([CHUNKED, FIXED], close_after_each=False)
        pool = upstream.ConnectionPool(connect_timeout_s=2)
        r = await upstream.post(pool, f"{url}/x", b"{}", {}, 5)
        it = r.aiter_body()
        assert await anext(it) == b"data: a"
        await r.aclose()  # client left mid-stream: the connection must not go back to the pool
        r = await upstream.post(pool, f"{url}/x", b"{}", {}, 5)
        await r.aclose()
        assert state["connections"] == 2
        server.close()
        await server.wait_closed()
        with pytest.raises(upstream.UpstreamError) as e:
            await upstream.post(upstream.ConnectionPool(2), url, b"{}", {}, 5)
        assert e.value.connect
        pool.close()

    asyncio.run(main())


def test_a_stream_that_goes_silent_times_out():
    async def main() -> None:
        silent = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: a\r\n")  # then nothing

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(silent)
            await asyncio.sleep(5)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = upstream.ConnectionPool(connect_timeout_s=2)
        r = await upstream.post(pool, url, b"{}", {}, read_timeout_s=0.3)
        it = r.aiter_body()
        assert await anext(it) == b"data: a"
        with pytest.raises(TimeoutError):
            await anext(it)
        await r.aclose()
        server.close()

    asyncio.run(main())
