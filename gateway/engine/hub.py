"""The membership hub of ``gateway serve --processes N``: the parent process keeps the
replicas' reports, the children exchange theirs with it over a Unix socket. Nothing to
install: it is the Redis membership (``gateway.engine.redis_store``) for one host.

Protocol: one line of JSON per request, ``{"member", "lease_s", "report", "want"}`` (or
``"leave"``), answered by one line, ``{"granted", "reports"}``: the member's want granted
against what the others hold (:func:`gateway.core.shares.grant_units`, one member at a time
on the hub's one thread, as Redis runs the same rule in one script) and every live report,
its own with what it now holds. A report lives ``lease_s`` after its last heartbeat: a
child killed with SIGKILL drops out within that time.

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

from gateway.core import shares

MAX_MEMBERS: Final = 256
MAX_LINE_BYTES: Final = 4 << 20
ENV_VAR: Final = "GATEWAY_HUB"  # the socket's path, set for the children
PROCESSES_ENV_VAR: Final = "GATEWAY_PROCESSES"  # N, set for the children


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

    def exchange(self, member: str, report: object, lease_s: float,
                 want: object = None) -> tuple[dict[str, dict[str, int]], list[object]]:
        """Record ``member``'s report for ``lease_s``, grant its ``want`` (JSON form)
        against the others' holdings; (granted, every live report)."""
        now = self._clock()
        for m in [m for m, (end, _) in self._reports.items() if end <= now]:
            del self._reports[m]
        others: dict[shares.WorkerModel, int] = {}
        for m, (_, r) in self._reports.items():
            if m != member and isinstance(r, dict):
                for key, n in _held_of(r).items():
                    others[key] = others.get(key, 0) + n
        granted, held = shares.grant_units(shares.want_from_json(want), others)
        if isinstance(report, dict):
            report = {**report, "held": shares.want_json_units(held)}
        if member in self._reports or len(self._reports) < MAX_MEMBERS:
            self._reports[member] = (now + max(0.05, lease_s), report)
        return shares.want_json_units(granted), [r for _, r in self._reports.values()]

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
                reply: object
                if msg.get("leave"):
                    self.leave(member)
                    reply = {}
                else:
                    granted, reports = self.exchange(member, msg.get("report"),
                                                     float(msg.get("lease_s", 2.0)),
                                                     msg.get("want"))
                    reply = {"granted": granted, "reports": reports}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ValueError, KeyError, TypeError, OSError, asyncio.LimitOverrunError):
            pass  # a bad line or a lost child: drop the connection
        finally:
            writer.close()


def _held_of(report: dict[str, object]) -> dict[shares.WorkerModel, int]:
    parsed = shares.Report.from_json({"member": "", "held": report.get("held")})
    return dict(parsed.held) if parsed is not None else {}


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

    async def exchange(self, member: str, payload: bytes, want: bytes, lease_s: float, *,
                       timeout_s: float) -> tuple[bytes, list[bytes]]:
        line = (b'{"member": ' + json.dumps(member).encode() + b', "lease_s": '
                + repr(float(lease_s)).encode() + b', "report": ' + payload
                + b', "want": ' + want + b"}\n")
        reply = await self._call(line, timeout_s)
        if not isinstance(reply, dict) or not isinstance(reply.get("reports"), list):
            raise HubUnavailable("the hub's answer is not an exchange")
        return (json.dumps(reply.get("granted", {})).encode(),
                [json.dumps(r).encode() for r in reply["reports"]])

    async def leave(self, member: str, *, timeout_s: float) -> None:
        await self._call(json.dumps({"member": member, "leave": True}).encode() + b"\n",
                         timeout_s)

    async def _call(self, line: bytes, timeout_s: float) -> object:
        async with self._lock:
            try:
                return await asyncio.wait_for(self._round_trip(line), timeout_s)
            except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                await self.aclose()
                raise HubUnavailable(str(exc) or type(exc).__name__) from None

    async def _round_trip(self, line: bytes) -> object:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self._path, limit=MAX_LINE_BYTES)
        assert self._reader is not None
        self._writer.write(line)
        await self._writer.drain()
        answer = await self._reader.readline()
        if not answer:
            raise asyncio.IncompleteReadError(b"", None)
        reply: object = json.loads(answer)
        return reply

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
