"""Forwarding one request upstream: open it, read the first body chunk, and relay the rest as it arrives.

The first chunk is read before any byte goes to the client, so a stream that fails before it
(connection refused, 5xx, timeout) can still be retried elsewhere. After that the stream is relayed
chunk by chunk; if the replica dies, the client gets an SSE error event and `data: [DONE]`.
A non-streamed generation is retried only when the replica cannot have run it (connection refused,
or a 503 answer): it runs to its end even if we leave, so a resend would run the work twice.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.responses import StreamingResponse

from tokenmill.gateway import upstream

# Response headers not relayed: hop-by-hop ones, and length (a relayed stream is re-chunked).
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
# Request headers passed upstream; authorization is decided by the gateway.
_PASS_REQUEST = ("content-type", "accept", "x-session-id", "x-request-id", "user-agent", "openai-organization")
_USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TOKEN_EVENT = re.compile(rb'"(?:text|content)"\s*:\s*"(?!")')


# A replica marks a 5xx that only this request caused (e.g. the engine failed it): relayed as is, no
# failure recorded, no retry. Any other 5xx is a replica fault.
ERROR_SCOPE_HEADER = "x-tokenmill-error-scope"


class UpstreamFailure(Exception):
    """The request failed before any byte reached the client. `hard`: nothing is listening. `retry`: safe to
    send elsewhere, i.e. the replica did not run it (not connected, or it answered 503) or it was a stream
    (closing a stream's connection aborts it on the replica). A non-stream request that may have run is
    not resent: `status` (502/504) or `response` is what the client gets."""

    def __init__(self, message: str, hard: bool = False, response: tuple[int, dict, bytes] | None = None,
                 retry: bool = True, status: int = 502) -> None:
        super().__init__(message)
        self.hard = hard
        self.response = response  # an upstream 5xx (status, headers, body), relayed if no retry is left
        self.retry = retry
        self.status = status


@dataclass(slots=True)
class Opened:
    status: int
    headers: dict[str, str]
    first: bytes
    rest: AsyncIterator[bytes]
    response: upstream.Response
    sent_at: float


def upstream_headers(incoming: dict[str, str], api_key: str | None, pass_auth: bool) -> dict[str, str]:
    out = {k: incoming[k] for k in _PASS_REQUEST if k in incoming}
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    elif pass_auth and "authorization" in incoming:
        out["authorization"] = incoming["authorization"]
    return out


def response_headers(resp: upstream.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers if k not in _DROP_RESPONSE}


async def open_upstream(client: upstream.UpstreamClient, url: str, body: bytes, headers: dict[str, str],
                        first_byte_timeout_s: float, stream: bool = True,
                        request_timeout_s: float | None = None) -> Opened:
    """Send the request and read until the first body chunk. Raises UpstreamFailure.

    A stream's status, headers and first chunk are bounded by first_byte_timeout_s. A non-stream request
    sends its headers only when generation ends, however long that takes: it is bounded by
    request_timeout_s alone (None: unbounded) and never resent once it may have reached the replica."""
    sent_at = time.monotonic()
    resp: upstream.Response | None = None
    try:
        async with asyncio.timeout(first_byte_timeout_s if stream else None):
            resp = await client.post(url, body, headers, once=not stream, total_s=request_timeout_s)
            if resp.status >= 500 and not request_scoped(resp):
                data = await resp.aread()
                await resp.aclose()
                raise UpstreamFailure(f"upstream answered {resp.status}", retry=stream or resp.status == 503,
                                      response=(resp.status, response_headers(resp), data))
            it = resp.aiter_body()
            try:
                first = await anext(it)
            except StopAsyncIteration:
                first = b""
    except UpstreamFailure:
        raise
    except upstream.UpstreamError as e:
        if resp is not None:
            await resp.aclose()
        raise UpstreamFailure(str(e), hard=e.connect, retry=stream or e.connect) from None
    except (TimeoutError, OSError) as e:
        if resp is not None:
            await resp.aclose()
        timed_out = isinstance(e, TimeoutError)
        raise UpstreamFailure(f"{url} failed before the first byte: {e!r}", retry=stream,
                              status=504 if timed_out else 502) from None
    return Opened(resp.status, response_headers(resp), first, it, resp, sent_at)


def request_scoped(resp: upstream.Response) -> bool:
    return any(k == ERROR_SCOPE_HEADER and v.strip().lower() == "request" for k, v in resp.headers)


def error_event(message: str) -> bytes:
    err = {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}}
    return b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"


@dataclass(slots=True)
class RelayResult:
    output_tokens: int = 0
    failed: bool = False


async def read_whole(opened: Opened, retry: bool) -> bytes:
    """The rest of a body relayed whole. Nothing has reached the client yet: a failure here is an
    UpstreamFailure, retryable when `retry` (the request was a stream, aborted when we close)."""
    parts = [opened.first]
    try:
        async for chunk in opened.rest:
            parts.append(chunk)
    except (upstream.UpstreamError, TimeoutError, OSError) as e:
        raise UpstreamFailure(f"upstream failed while sending the body: {e!r}", retry=retry,
                              status=504 if isinstance(e, TimeoutError) else 502) from None
    finally:
        await opened.response.aclose()
    return b"".join(parts)


def count_tokens(chunk: bytes, result: RelayResult, usage: list[int]) -> None:
    if b'"usage"' in chunk:  # a cheap substring test first: most stream chunks carry no usage
        m = _USAGE.findall(chunk)
        if m:
            usage.append(int(m[-1]))
    result.output_tokens += len(_TOKEN_EVENT.findall(chunk))


class Relay:
    """The upstream body, chunk by chunk, as an async iterable for a streaming response.

    finish() closes the upstream response and reports the outcome exactly once. It runs when the
    iteration ends, and RelayResponse also calls it after the response, so a client that leaves (even
    before the first chunk was sent) closes the upstream request and frees the replica slot at once."""

    def __init__(self, opened: Opened, on_first: Callable[[], None], on_done: Callable[[RelayResult], None]) -> None:
        self.opened = opened
        self.on_first = on_first
        self.on_done = on_done
        self.result = RelayResult()
        self._usage: list[int] = []
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        opened, result, usage = self.opened, self.result, self._usage
        tail = b"\n\n"
        try:
            if opened.first:
                self.on_first()
                count_tokens(opened.first, result, usage)
                tail = opened.first[-2:]
                yield opened.first
            while True:
                try:
                    chunk = await anext(opened.rest)
                except StopAsyncIteration:
                    break
                except (upstream.UpstreamError, TimeoutError, OSError) as e:
                    result.failed = True
                    # Terminate a half-sent event first so the error event parses on its own.
                    prefix = b"" if tail.endswith(b"\n\n") else b"\n\n"
                    yield prefix + error_event(f"upstream replica failed mid-stream: {type(e).__name__}")
                    break
                if chunk:
                    count_tokens(chunk, result, usage)
                    tail = (tail + chunk)[-2:]
                    yield chunk
        finally:
            await self.finish()

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        await self.opened.response.aclose()
        if self._usage:
            self.result.output_tokens = self._usage[-1]
        self.on_done(self.result)


class RelayResponse(StreamingResponse):
    def __init__(self, relay: Relay, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(relay, status_code=status_code, headers=headers)
        self._relay = relay

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.finish()
