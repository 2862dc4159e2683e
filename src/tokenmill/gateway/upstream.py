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
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=self.max_per_replica,
                                         keepalive_timeout=_KEEPALIVE_S)
        # No total timeout: a stream may run for minutes. The proxy bounds connect + first byte itself;
        # sock_read is the idle watchdog (longest gap between bytes; paused while our client is slow).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout,
            auto_decompress=False,  # relay bytes as the replica sent them (content-encoding is passed on)
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not carry one client's cookies to another
            skip_auto_headers=("Accept-Encoding", "User-Agent"))  # send only what the proxy passes on

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Response:
        """Send a POST and read the status line and headers. Raises UpstreamError."""
        if self._session is None:
            self._session = self._open()
        for attempt in (0, 1):
            try:
                resp = await self._session.post(url, data=body, headers=headers, allow_redirects=False)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                raise UpstreamError(f"cannot connect to {url}: {e!r}", connect=True) from None
            except TimeoutError:
                raise TimeoutError(f"{url}: no response headers within {self.read_timeout_s} s") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # Most likely a keep-alive connection the replica closed just as we reused it; aiohttp
                # resends only idempotent methods by itself, so resend once on a fresh connection.
                if attempt == 0:
                    continue
                raise UpstreamError(f"{url}: {e!r}") from None
            except aiohttp.ClientError as e:
                raise UpstreamError(f"{url}: {e!r}") from None
            return Response(resp, self.read_timeout_s)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Response:
    """Status and headers are read; the body is read by aiter_body() (once). aclose() returns the connection
    to the pool only when the body was read to its end, else closes it (the replica sees the disconnect)."""

    __slots__ = ("status", "headers", "_resp", "_read_timeout_s")

    def __init__(self, resp: aiohttp.ClientResponse, read_timeout_s: float) -> None:
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
            raise TimeoutError(f"no data from upstream for {self._read_timeout_s} s") from None
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
