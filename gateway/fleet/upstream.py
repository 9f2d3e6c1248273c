"""HTTP/1.1 keep-alive connection pools to the workers, on asyncio.Protocol + httptools.

Why not httpx or aiohttp: the upstream client decides a Python proxy's ceiling
(``shared/reference/measured.md``: httpx 0.4–0.8k req/s and degrading with concurrency,
aiohttp ~5k, a lean protocol-level pool 14–20k on one core). This module is that lean pool.
It speaks just what Triton needs: requests with a Content-Length body, responses with
Content-Length, chunked or close-delimited bodies, optionally streamed (``generate_stream``).

Errors are translated here, once, into the gateway's tree (``gateway.core.errors``), with the
*stage* at which they happened so that the retry policy can tell a request that never left
(connect refused, stale keep-alive connection reset before any byte came back) from one
that may have been executed:

    UpstreamFailure(stage="connect")   refused / unreachable / connect timeout
    UpstreamFailure(stage="send")      the connection broke before a response byte arrived
    UpstreamFailure(stage="response")  broke or timed out while the response was coming

Every pool is bounded (``max_connections``); idle connections are reused LIFO and closed
when the peer says ``Connection: close``.

Interim (1xx) responses are skipped: a worker that answers ``100 Continue`` (a client's
``Expect`` is never forwarded, but a worker may send one anyway) is still waited on for its
final response. A request target is sent with every byte that could end the request line
(controls, space, non-ASCII) percent-encoded: the gateway builds targets from *decoded*
client paths, and a model named ``a\r\nX: y`` must not become a header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import typing
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import httptools

from gateway.core.errors import UpstreamError, UpstreamTimeout

Stage = Literal["connect", "send", "response"]
Headers = list[tuple[bytes, bytes]]

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones this client sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        # The gateway's server answers a client's 100-continue itself; the body it forwards
        # is complete, so a worker must not be asked to send an interim response.
        b"expect",
    }
)
# Characters that may stand in a request target as they are (RFC 9112 §3.2, RFC 3986).
_UNSAFE_TARGET = re.compile(r"[^A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]")
_TARGET_SAFE_CHARS = "-._~:/?#[]@!$&'()*+,;=%"
_STREAM_HIGH_WATER = 64
_STREAM_LOW_WATER = 16


class UpstreamFailure(UpstreamError):
    """A worker could not be reached or broke off. ``stage`` says how far the request got."""

    def __init__(self, message: str, stage: Stage, *, timeout: bool = False) -> None:
        # A worker that timed out or is unreachable: tell clients when to try again.
        super().__init__(message, retry_after_s=1.0)
        self.stage: Stage = stage
        self.timeout = timeout
        if timeout and stage == "response":
            self.status = UpstreamTimeout.status

    @property
    def never_sent(self) -> bool:
        return self.stage in ("connect", "send")


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 64
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 60.0


class Response:
    """A response whose headers have arrived. Read the body with :meth:`read` or iterate
    :meth:`stream`; always :meth:`close` (or exhaust) so the connection is released."""

    __slots__ = ("_conn", "_done", "_pool", "headers", "status")

    def __init__(self, status: int, headers: Headers, conn: _Connection, pool: Pool) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def read(self) -> bytes:
        try:
            body = await self._conn.read_body(self._pool.limits.read_timeout_s)
        except BaseException:
            self._finish(reusable=False)
            raise
        self._finish(reusable=True)
        return body

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await self._conn.next_chunk(self._pool.limits.read_timeout_s)
                if chunk is None:
                    break
                yield chunk
        except BaseException:
            self._finish(reusable=False)
            raise
        self._finish(reusable=True)

    def close(self) -> None:
        """Abandon the body (client went away): the connection cannot be reused."""
        self._finish(reusable=False)

    def _finish(self, *, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._conn, reusable=reusable and self._conn.is_reusable())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    __slots__ = (
        "_body",
        "_chunks",
        "_closed",
        "_complete",
        "_error",
        "_got_bytes",
        "_headers",
        "_headers_fut",
        "_interim",
        "_keep_alive",
        "_parser",
        "_paused",
        "_streaming",
        "_waiter",
        "loop",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._error: UpstreamFailure | None = None
        self._reset()

    def _reset(self) -> None:
        self._headers: Headers = []
        self._headers_fut: asyncio.Future[int] | None = None
        self._body: list[bytes] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._complete = False
        self._interim = False
        self._keep_alive = True
        self._got_bytes = False
        self._streaming = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamFailure(f"invalid response from worker: {exc}", "response"))
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if not self._complete:
            # A close-delimited body (no Content-Length) ends with the connection.
            if self._headers_fut is not None and self._headers_fut.done() and self._no_length():
                self._complete = True
                self._keep_alive = False
                self._wake()
                return
            stage: Stage = "response" if self._got_bytes else "send"
            self._fail(UpstreamFailure("worker closed the connection", stage))

    # httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): not the answer. Its
            # headers are dropped and the final response follows on the same connection.
            self._interim = True
            self._headers = []
            return
        self._keep_alive = self._parser.should_keep_alive()
        fut = self._headers_fut
        if fut is not None and not fut.done():
            fut.set_result(status)

    def on_body(self, body: bytes) -> None:
        if self._streaming:
            self._chunks.append(body)
            if len(self._chunks) >= _STREAM_HIGH_WATER and self.transport and not self._paused:
                self._paused = True
                self.transport.pause_reading()
        else:
            self._body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._wake()

    # ------------------------------------------------------------------------------
    def _no_length(self) -> bool:
        return not any(k in (b"content-length", b"transfer-encoding") for k, _ in self._headers)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: UpstreamFailure) -> None:
        fut = self._headers_fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self._error = exc

    def is_reusable(self) -> bool:
        return self._complete and self._keep_alive and not self._closed

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, head: bytes, body: bytes, read_timeout_s: float, stream: bool) -> int:
        self._reset()
        self._error = None
        self._streaming = stream
        self._headers_fut = self.loop.create_future()
        assert self.transport is not None
        if body and len(body) > 65536:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head + body)
        # A plain timer that fails the future: cheaper than asyncio.timeout() per request.
        timer = self.loop.call_later(read_timeout_s, self._headers_timed_out, read_timeout_s)
        try:
            return await self._headers_fut
        finally:
            timer.cancel()

    def _headers_timed_out(self, read_timeout_s: float) -> None:
        fut = self._headers_fut
        if fut is not None and not fut.done():
            fut.set_exception(UpstreamFailure(
                f"worker did not answer within {read_timeout_s:g} s", "response", timeout=True))
            self.close()

    async def _wait(self, read_timeout_s: float) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self.loop.create_future()
        try:
            async with asyncio.timeout(read_timeout_s):
                await self._waiter
        except TimeoutError:
            self.close()
            raise UpstreamFailure(
                f"worker response stalled for {read_timeout_s:g} s", "response", timeout=True
            ) from None
        finally:
            self._waiter = None

    async def read_body(self, read_timeout_s: float) -> bytes:
        while not self._complete:
            await self._wait(read_timeout_s)
        return b"".join(self._body)

    async def next_chunk(self, read_timeout_s: float) -> bytes | None:
        while not self._chunks:
            if self._complete:
                return None
            await self._wait(read_timeout_s)
        chunk = self._chunks.popleft()
        if self._paused and len(self._chunks) <= _STREAM_LOW_WATER and self.transport:
            self._paused = False
            self.transport.resume_reading()
        return chunk


class Pool:
    """Keep-alive connections to one worker (``host:port``), at most ``max_connections``."""

    def __init__(self, host: str, port: int, limits: PoolLimits) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self._host_header = f"{host}:{port}".encode()
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self.connects = 0
        self.requests = 0

    def __repr__(self) -> str:
        return (
            f"<Pool {self.host}:{self.port} open={self._open} idle={len(self._idle)} "
            f"waiting={len(self._waiters)}>"
        )

    def statistics(self) -> dict[str, int]:
        return {
            "open": self._open,
            "idle": len(self._idle),
            "waiting": len(self._waiters),
            "connects": self.connects,
            "requests": self.requests,
        }

    async def _acquire(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn._closed:
                return conn, True
            self._open -= 1
        while self._open >= self.limits.max_connections:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout(self.limits.connect_timeout_s):
                    await fut
            except TimeoutError:
                raise UpstreamFailure(
                    f"no free connection to {self.host}:{self.port} within "
                    f"{self.limits.connect_timeout_s:g} s",
                    "connect",
                    timeout=True,
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if self._idle:
                conn = self._idle.pop()
                if not conn._closed:
                    return conn, True
                self._open -= 1
        self._open += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._notify()
            raise
        return conn, False

    async def _connect(self) -> _Connection:
        if self._closed:
            raise UpstreamFailure(f"worker {self.host}:{self.port} was removed", "connect")
        loop = asyncio.get_running_loop()
        self.connects += 1
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port
                )
        except TimeoutError:
            raise UpstreamFailure(
                f"connect to {self.host}:{self.port} timed out", "connect", timeout=True
            ) from None
        except OSError as exc:
            raise UpstreamFailure(
                f"cannot connect to worker {self.host}:{self.port}: {exc.strerror or exc}",
                "connect",
            ) from None
        return proto

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        if reusable and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()
            self._open -= 1
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes = b"",
        *,
        stream: bool = False,
        read_timeout_s: float | None = None,
        resend_stale: bool = True,
    ) -> Response:
        """Send one request and return once the response headers are in.

        ``resend_stale``: a reused keep-alive connection that breaks before any byte of the
        answer is taken for one the worker closed as it sat idle, and the request is sent
        once more on a fresh connection. That is also what a worker dying *while running
        the request* looks like: a request that must never run twice (a sequence, a
        stateful model) passes False and gets the failure instead."""
        timeout = self.limits.read_timeout_s if read_timeout_s is None else read_timeout_s
        head = self._head(method, target, headers, body)
        self.requests += 1
        for attempt in range(2):
            conn, reused = await self._acquire()
            try:
                status = await conn.send(head, body, timeout, stream)
            except UpstreamFailure as exc:
                self.release(conn, reusable=False)
                # A reused keep-alive connection may have been closed by the worker just
                # as we wrote: nothing reached it, so one retry on a fresh one is safe.
                if reused and exc.stage == "send" and attempt == 0 and resend_stale:
                    continue
                raise
            except BaseException:
                self.release(conn, reusable=False)
                raise
            return Response(status, conn._headers, conn, self)
        raise AssertionError("unreachable")  # pragma: no cover

    def _head(self, method: str, target: str, headers: Headers, body: bytes) -> bytes:
        lines = [f"{method} {safe_target(target)} HTTP/1.1\r\n".encode(), b"host: ",
                 self._host_header, b"\r\n"]
        for k, v in headers:
            lines += [k, b": ", v, b"\r\n"]
        if body or method in ("POST", "PUT", "PATCH"):
            lines += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()


def safe_target(target: str) -> str:
    """``target`` with every character that may not stand in a request line as it is
    (controls, space, non-ASCII) percent-encoded (UTF-8); a clean target is unchanged."""
    if _UNSAFE_TARGET.search(target) is None:
        return target
    return urllib.parse.quote(target, safe=_TARGET_SAFE_CHARS)


async def fetch(
    pool: Pool, method: str, target: str, body: bytes = b"", *, timeout_s: float
) -> tuple[int, bytes]:
    """Small helper for probes and scrapes: whole response, bounded by ``timeout_s``."""
    headers: Headers = [(b"content-type", b"application/json")] if body else []
    try:
        async with asyncio.timeout(timeout_s):
            resp = await pool.request(method, target, headers, body, read_timeout_s=timeout_s)
            return resp.status, await resp.read()
    except TimeoutError:
        raise UpstreamFailure(f"{target} timed out after {timeout_s:g} s", "response",
                              timeout=True) from None
