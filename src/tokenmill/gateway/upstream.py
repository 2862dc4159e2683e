"""A small HTTP/1.1 client for the proxy's hot path: keep-alive connections per replica, streamed bodies.

Why not httpx here: its connection pool scans every pooled connection (with a socket readability check
each) on every request and response close, and each streamed chunk passes through several layers; on a
2-core machine that cost competes with the replicas for CPU. Health checks, scraping and embeddings still
use httpx. This client does only what the proxy needs: POST a body, read the status and headers, then
the body by Content-Length, chunked encoding, or until close.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class UpstreamError(Exception):
    """Connection or protocol failure. `connect`: nothing accepted the connection (replica down)."""

    def __init__(self, message: str, connect: bool = False) -> None:
        super().__init__(message)
        self.connect = connect


Origin = tuple[str, str, int]  # scheme, host, port


class _Conn:
    __slots__ = ("origin", "reader", "writer")

    def __init__(self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer

    def stale(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Idle keep-alive connections per origin, most recently used first."""

    def __init__(self, connect_timeout_s: float, max_idle_per_origin: int = 256) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Conn]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def acquire(self, origin: Origin) -> tuple[_Conn, bool]:
        """A connection and whether it was reused (a reused one may have been closed by the server)."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.stale():
                return conn, True
            conn.close()
        scheme, host, port = origin
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port, ssl=self._ssl if scheme == "https" else None,
                                                               limit=1 << 20)
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {host}:{port}: {e!r}", connect=True) from None
        return _Conn(origin, reader, writer), False

    def release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) < self.max_idle and not conn.stale():
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()


class Response:
    """Status and headers are read; the body is read by aiter_body() (once). aclose() returns the connection
    to the pool only when the body was read to its end, else closes it (the replica sees the disconnect)."""

    def __init__(self, pool: ConnectionPool, conn: _Conn, status: int, headers: list[tuple[str, str]],
                 read_timeout_s: float) -> None:
        self.pool = pool
        self.status = status
        self.headers = headers
        self._conn: _Conn | None = conn
        self._read_timeout_s = read_timeout_s
        self._complete = False
        self._timed_out = False
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        h = {k: v.lower() for k, v in headers}
        self._keep_alive = "close" not in h.get("connection", "")
        self._chunked = "chunked" in h.get("transfer-encoding", "")
        length = h.get("content-length")
        self._length = int(length) if length is not None and not self._chunked else None
        if status in (204, 304) or (self._length == 0):
            self._complete = True

    def _watch(self) -> None:
        """Idle watchdog: one timer per response instead of a timeout per chunk (cheaper per token). It
        closes the connection when no byte arrived for read_timeout_s; the pending read then fails."""
        conn = self._conn
        if conn is None or self._complete:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_read
        if idle >= self._read_timeout_s:
            self._timed_out = True
            conn.close()
        else:
            self._watchdog = loop.call_later(self._read_timeout_s - idle, self._watch)

    async def aiter_body(self) -> AsyncIterator[bytes]:
        if self._complete:
            return
        r = self._conn.reader  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        self._watchdog = loop.call_later(self._read_timeout_s, self._watch)
        try:
            if self._chunked:
                while True:
                    line = await r.readline()
                    if not line:
                        raise UpstreamError("connection closed inside a chunked body")
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await r.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        self._complete = True
                        return
                    data = await r.readexactly(size + 2)
                    self._last_read = loop.time()
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left > 0:
                    data = await r.read(min(left, 1 << 16))
                    if not data:
                        raise UpstreamError("connection closed before the end of the body")
                    self._last_read = loop.time()
                    left -= len(data)
                    yield data
                self._complete = True
            else:
                self._keep_alive = False
                while True:
                    data = await r.read(1 << 16)
                    if not data:
                        self._complete = True
                        return
                    self._last_read = loop.time()
                    yield data
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, UpstreamError) as e:
            if self._timed_out:
                raise TimeoutError(f"no data from upstream for {self._read_timeout_s} s") from None
            if isinstance(e, UpstreamError):
                raise
            raise UpstreamError(f"upstream body broken: {e!r}") from None
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    async def aread(self) -> bytes:
        return b"".join([c async for c in self.aiter_body()])

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._keep_alive:
            self.pool.release(conn)
        else:
            conn.close()


def split_url(url: str) -> tuple[Origin, str]:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return (u.scheme, u.hostname or "127.0.0.1", port), path


async def post(pool: ConnectionPool, url: str, body: bytes, headers: dict[str, str],
               read_timeout_s: float) -> Response:
    """Send a POST and read the status line and headers. Raises UpstreamError."""
    origin, path = split_url(url)
    host = origin[1] if origin[2] in (80, 443) else f"{origin[1]}:{origin[2]}"
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in ("host", "content-length")]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    for attempt in (0, 1):
        conn, reused = await pool.acquire(origin)
        try:
            conn.writer.write(head + body)
            await conn.writer.drain()
            async with asyncio.timeout(read_timeout_s):
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the response")
                headers_out: list[tuple[str, str]] = []
                while True:
                    line = await conn.reader.readline()
                    if line in (b"\r\n", b"\n"):
                        break
                    if not line:
                        raise ConnectionResetError("connection closed inside the response headers")
                    k, _, v = line.decode("latin-1").partition(":")
                    headers_out.append((k.strip().lower(), v.strip()))
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            conn.close()
            if reused and attempt == 0:
                continue  # the server closed an idle keep-alive connection: resend on a fresh one
            raise UpstreamError(f"{url}: {e!r}", connect=isinstance(e, ConnectionRefusedError)) from None
        except BaseException:
            conn.close()
            raise
        parts = status_line.split(None, 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            conn.close()
            raise UpstreamError(f"{url}: malformed status line {status_line[:80]!r}") from None
        return Response(pool, conn, status, headers_out, read_timeout_s)
    raise AssertionError("unreachable")
