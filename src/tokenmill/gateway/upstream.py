"""The proxy's upstream HTTP client: a thin wrapper over aiohttp's ClientSession.

aiohttp does the protocol work (keep-alive pool, chunked / Content-Length / close-delimited bodies,
TLS); this wrapper only gives the proxy what it needs: POST a body, read status and headers, then the
raw body chunk by chunk as it arrives, with errors mapped to UpstreamError / TimeoutError.

Why aiohttp and not httpx here: measured with benchmarks/gateway.py (gateway CPU per relayed token),
httpx cost clearly more per token (see docs/gateway.md). Health checks, scraping and embeddings use httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

# Idle keep-alive connections are dropped after this long: below the 5 s after which uvicorn (tokenmill
# serve, vLLM) and llama.cpp's server close idle connections, so a request rarely meets a closing socket.
_KEEPALIVE_S = 4.0


class UpstreamError(Exception):
    """Connection or protocol failure. `connect`: nothing accepted the connection (replica down)."""

    def __init__(self, message: str, connect: bool = False) -> None:
        super().__init__(message)
        self.connect = connect


class UpstreamClient:
    """One aiohttp session (created on first use, inside the running event loop) for all replicas."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_connections: int,
                 max_connections_per_replica: int) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.max_per_replica = max_connections_per_replica
        self._session: aiohttp.ClientSession | None = None  # keep-alive pool: streams, embeddings
        self._fresh: aiohttp.ClientSession | None = None  # one connection per `once` request

    def _open(self, force_close: bool = False) -> aiohttp.ClientSession:
        keepalive = {"force_close": True} if force_close else {"keepalive_timeout": _KEEPALIVE_S}
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_per_replica,
                                         **keepalive)
        # No total timeout: a stream may run for minutes. The proxy bounds connect + first byte itself;
        # sock_read is the idle watchdog (longest gap between bytes; paused while our client is slow).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout,
            auto_decompress=False,  # relay bytes as the replica sent them (content-encoding is passed on)
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not carry one client's cookies to another
            skip_auto_headers=("Accept-Encoding", "User-Agent"))  # send only what the proxy passes on

    async def post(self, url: str, body: bytes, headers: dict[str, str], once: bool = False,
                   total_s: float | None = None) -> Response:
        """Send a POST and read the status line and headers. Raises UpstreamError.

        `once`: the request must not run twice (a non-streamed generation, which the replica finishes even
        if we leave). It goes on a fresh connection, so a dropped connection is never a stale keep-alive
        and is never resent; no idle watchdog (a long generation sends nothing until it ends), only `total_s`.
        """
        if once:
            if self._fresh is None:
                self._fresh = self._open(force_close=True)
            timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=self.connect_timeout_s, sock_read=None)
            return await self._send(self._fresh, url, body, headers, timeout, resend=False)
        if self._session is None:
            self._session = self._open()
        return await self._send(self._session, url, body, headers, None, resend=True)

    async def _send(self, session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                    timeout: aiohttp.ClientTimeout | None, resend: bool) -> Response:
        # aiohttp itself resends only idempotent methods after a dropped keep-alive (client.py,
        # retry_persistent_connection), never a POST: the one resend is ours, and only where it is safe.
        for attempt in (0, 1):
            try:
                kw = {"timeout": timeout} if timeout is not None else {}
                resp = await session.post(url, data=body, headers=headers, allow_redirects=False, **kw)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                raise UpstreamError(f"cannot connect to {url}: {e!r}", connect=True) from None
            except TimeoutError:
                limit = timeout.total if timeout is not None else self.read_timeout_s
                raise TimeoutError(f"{url}: no response headers within {limit} s") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # On a reused connection most likely a keep-alive the replica closed just as we reused it.
                # A stream may be resent once on a fresh connection: had the replica got it, it saw the
                # disconnect and aborted it. A `once` request is never resent.
                if resend and attempt == 0:
                    continue
                raise UpstreamError(f"{url}: {e!r}") from None
            except aiohttp.ClientError as e:
                raise UpstreamError(f"{url}: {e!r}") from None
            limit = timeout.total if timeout is not None else self.read_timeout_s
            return Response(resp, limit)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None


class Response:
    """Status and headers are read; the body is read by aiter_body() (once). aclose() returns the connection
    to the pool only when the body was read to its end, else closes it (the replica sees the disconnect)."""

    __slots__ = ("_read_timeout_s", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, read_timeout_s: float | None) -> None:
        self.status = resp.status
        self.headers = [(k.lower(), v) for k, v in resp.headers.items()]
        self._resp: aiohttp.ClientResponse | None = resp
        self._read_timeout_s = read_timeout_s

    async def aiter_body(self) -> AsyncIterator[bytes]:
        """Raw body bytes as they arrive. TimeoutError after read_timeout_s without a byte; UpstreamError when
        the connection breaks or the framing is wrong (e.g. closed inside a chunked body)."""
        content = self._resp.content  # type: ignore[union-attr]
        try:
            while data := await content.readany():
                yield data
        except TimeoutError:  # aiohttp's SocketTimeoutError is a TimeoutError too: keep it one
            raise TimeoutError(f"upstream timed out ({self._read_timeout_s} s)") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"upstream body broken: {e!r}") from None

    async def aread(self) -> bytes:
        return b"".join([c async for c in self.aiter_body()])

    async def aclose(self) -> None:
        resp, self._resp = self._resp, None
        if resp is None:
            return
        if resp.content.at_eof() and resp.content.exception() is None:
            resp.release()  # whole body read: the connection goes back to the pool
        else:
            resp.close()
