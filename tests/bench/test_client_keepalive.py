"""The bench client against a server that closes kept-alive connections after a few requests without answering
the next one (llama-server's HTTP library does this after 5): the request is retried once on a fresh connection;
a connection dropped after the response started is still a failure."""

from __future__ import annotations

import asyncio
import json

import httpx

from tokenmill.bench.client import send_request

EVENT = json.dumps({"choices": [{"text": "hi"}], "usage": {"completion_tokens": 1, "prompt_tokens": 3}})
BODY = f"data: {EVENT}\n\ndata: [DONE]\n\n".encode()


async def _serve(per_connection: int, cut_mid_stream: bool = False):
    """A 127.0.0.1 server answering `per_connection` requests per connection, then closing on the next one
    unanswered (or, with cut_mid_stream, sending headers and half a body before closing)."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            if served == per_connection:
                writer.close()
                return
            served += 1
            if cut_mid_stream:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 500\r\n\r\n" + BODY[:10])
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def test_a_connection_closed_before_answering_is_retried_once_on_a_fresh_one() -> None:
    async def main():
        server, port, connections = await _serve(per_connection=2)
        async with server, httpx.AsyncClient(timeout=10) as client:
            url = f"http://127.0.0.1:{port}/v1/completions"
            results = [await send_request(client, url, {"prompt": "x"}, 3) for _ in range(5)]
        return results, connections[0]

    results, connections = asyncio.run(main())
    assert [r.success for r in results] == [True] * 5, [r.error for r in results]
    assert connections == 3  # 2 + 2 + 1 requests: two connections were closed on the third request


def test_a_stream_cut_after_the_response_started_is_a_failure() -> None:
    async def main():
        server, port, _ = await _serve(per_connection=1, cut_mid_stream=True)
        async with server, httpx.AsyncClient(timeout=10) as client:
            return await send_request(client, f"http://127.0.0.1:{port}/v1/completions", {"prompt": "x"}, 3)

    result = asyncio.run(main())
    assert not result.success and "RemoteProtocolError" in result.error
