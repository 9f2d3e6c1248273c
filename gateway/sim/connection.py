"""HTTP/1.1 for the simulator: one asyncio protocol per connection (httptools), keep-alive
and pipelining, replies in request order. What a request means is up to a :class:`Handler`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import unquote

import httptools

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PIPELINED = 64  # responses owed on one connection before it stops reading
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_body(message: str) -> bytes:
    return json_body({"error": message})


class _Reply:
    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


Respond = Callable[[int, bytes, str, Sequence[tuple[str, str]]], None]


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; replies go out in request order."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._owed: deque[tuple[_Reply, bool]] = deque()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._handler.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._send_now(400, error_body("malformed HTTP request"))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # curl and some clients wait for this before sending a large body
        if self._headers.get("expect", "").lower() == "100-continue" \
                and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes <= MAX_BODY_BYTES:
            self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = bool(self._parser.should_keep_alive())
        if self._body_bytes > MAX_BODY_BYTES:
            self._send_now(400, error_body("request body exceeds the maximum size"))
            return
        url = httptools.parse_url(self._url)
        request = Request(self._parser.get_method().decode(), unquote(url.path.decode()),
                           self._headers, b"".join(self._body))
        reply = _Reply()
        self._owed.append((reply, keep_alive))
        if len(self._owed) >= MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

        def respond(status: int, body: bytes = b"", content_type: str = "application/json",
                    extra: Sequence[tuple[str, str]] = ()) -> None:
            head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"]
            if body or status != 200:
                head.append(f"Content-Type: {content_type}\r\n")
            head.extend(f"{k}: {v}\r\n" for k, v in extra)
            head.append(f"Content-Length: {len(body)}\r\n")
            if not keep_alive:
                head.append("Connection: close\r\n")
            head.append("\r\n")
            reply.data = "".join(head).encode("latin-1") + body
            self._flush()

        self._handler.handle(request, respond)

    def _flush(self) -> None:
        transport = self._transport
        while self._owed and self._owed[0][0].data is not None:
            reply, keep_alive = self._owed.popleft()
            if transport is None:
                continue
            assert reply.data is not None
            transport.write(reply.data)
            if not keep_alive:
                transport.close()
                self._owed.clear()
                return
        if self._paused and len(self._owed) < MAX_PIPELINED // 2 and transport is not None:
            transport.resume_reading()
            self._paused = False

    def _send_now(self, status: int, body: bytes) -> None:
        if self._transport is not None:
            self._transport.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                .encode() + body)
            self._transport.close()


class Handler:
    """Something that answers requests on a listening socket."""

    def __init__(self) -> None:
        self.connections: set[Connection] = set()

    def handle(self, request: Request, respond: Respond) -> None:
        raise NotImplementedError



class ControlHandler(Protocol):
    """What answers ``/sim/*`` on any port: the fleet (``own``: the worker owning the port)."""

    def handle_control(self, request: Request, respond: Respond, own: int | None) -> None: ...
