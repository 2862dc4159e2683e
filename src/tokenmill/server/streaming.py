"""Server-sent events and disconnect handling.

OpenAI's stream framing: one `data: <json>\\n\\n` per chunk, `data: [DONE]\\n\\n` last. An error after the
first byte cannot change the status any more, so it goes out as `data: {"error": {...}}` before [DONE].
A client that disconnects (or cancels the stream) makes Starlette cancel the body iterator; the
`finally` blocks of the generators below then abort the engine requests, which frees their KV blocks on
the core's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from tokenmill.server.errors import APIError, error_body

log = logging.getLogger("tokenmill.server")

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        return sse(exc.body())
    return sse(error_body(f"{type(exc).__name__}: {exc}", "internal_error", None, "internal_error"))


async def sse_stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame `chunks` as SSE; a failure mid-stream becomes an error event; always ends with [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the status line is gone; the client must still see why
        log.warning("stream failed: %s: %s", type(exc).__name__, exc)
        yield sse_error(exc)
    yield DONE


def sse_response(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(
        sse_stream(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagged with the iterator's index.

    Used for list prompts (one engine request each). Cancelling the consumer cancels every producer,
    so their engine requests are aborted too.
    """
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None, False))
            await queue.put((i, None, None, True))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, exc, True))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc, done = await queue.get()
            if exc is not None:
                raise exc
            if done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (a non-streaming handler body) but cancel it if the client goes away.

    uvicorn does not cancel a handler when its client disconnects; without this a dropped non-stream
    request would keep generating to max_tokens. Call after the body has been read.
    """
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.create_task(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

