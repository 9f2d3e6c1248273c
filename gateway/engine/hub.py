"""The membership hub of ``gateway serve --processes N``: the parent process keeps the
replicas' reports, the children exchange theirs with it over a Unix socket. Nothing to
install: it is the Redis membership (``gateway.engine.redis_store``) for one host.

Protocol: one line of JSON per request, ``{"member", "lease_s", "report"}`` (or ``"leave"``),
answered by one line, the JSON list of every live report. A report lives ``lease_s`` after
its last heartbeat: a child killed with SIGKILL drops out within that time.

Bounded: reports of at most :data:`MAX_MEMBERS` members, lines of at most
:data:`MAX_LINE_BYTES`; a connection that sends more is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Final

MAX_MEMBERS: Final = 256
MAX_LINE_BYTES: Final = 4 << 20
ENV_VAR: Final = "GATEWAY_HUB"  # the socket's path, set for the children


class HubUnavailable(Exception):
    """The hub did not answer (gone, or too slow)."""


class Hub:
    """The parent's side: reports by member, each with its lease's end."""

    __slots__ = ("_clock", "_reports", "_server")

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._reports: dict[str, tuple[float, object]] = {}
        self._server: asyncio.base_events.Server | None = None

    def __repr__(self) -> str:
        return f"<Hub members={len(self._reports)}>"

    def exchange(self, member: str, report: object, lease_s: float) -> list[object]:
        now = self._clock()
        for m in [m for m, (end, _) in self._reports.items() if end <= now]:
            del self._reports[m]
        if member in self._reports or len(self._reports) < MAX_MEMBERS:
            self._reports[member] = (now + max(0.05, lease_s), report)
        return [r for _, r in self._reports.values()]

    def leave(self, member: str) -> None:
        self._reports.pop(member, None)

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path,
                                                       limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                member = str(msg["member"])
                if msg.get("leave"):
                    self.leave(member)
                    reply: list[object] = []
                else:
                    reply = self.exchange(member, msg.get("report"),
                                          float(msg.get("lease_s", 2.0)))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ValueError, KeyError, TypeError, OSError, asyncio.LimitOverrunError):
            pass  # a bad line or a lost child: drop the connection
        finally:
            writer.close()


class HubClient:
    """A child's side: one connection, re-opened when lost; every call bounded."""

    __slots__ = ("_lock", "_path", "_reader", "_writer")

    def __init__(self, path: str) -> None:
        self._path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<HubClient {self._path} connected={self._writer is not None}>"

    async def exchange(self, member: str, payload: bytes, lease_s: float, *,
                       timeout_s: float) -> list[bytes]:
        line = (b'{"member": ' + json.dumps(member).encode() + b', "lease_s": '
                + repr(float(lease_s)).encode() + b', "report": ' + payload + b"}\n")
        reply = await self._call(line, timeout_s)
        return [json.dumps(r).encode() for r in reply]

    async def leave(self, member: str, *, timeout_s: float) -> None:
        await self._call(json.dumps({"member": member, "leave": True}).encode() + b"\n",
                         timeout_s)

    async def _call(self, line: bytes, timeout_s: float) -> list[object]:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._round_trip(line), timeout_s)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                await self.aclose()
                raise HubUnavailable(str(exc) or type(exc).__name__) from None

    async def _round_trip(self, line: bytes) -> list[object]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self._path, limit=MAX_LINE_BYTES)
        assert self._reader is not None
        self._writer.write(line)
        await self._writer.drain()
        answer = await self._reader.readline()
        if not answer:
            raise asyncio.IncompleteReadError(b"", None)
        reply = json.loads(answer)
        if not isinstance(reply, list):
            raise ValueError("the hub's answer is not a list")
        return reply

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
