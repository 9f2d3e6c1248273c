"""The client-connection guard: slow clients bounded, and room kept for new connections.

The shell around :mod:`gateway.core.connections`. The server layer's protocol tells the guard
of each connection it opens and loses (:meth:`ConnectionGuard.opened`, :meth:`closed`); once a
tick the guard looks at every connection (:meth:`GuardedConnection.seen`), has the core judge
it, and carries the verdict out: a 408 in Triton's JSON where an answer can still be written,
then the connection closed. Nothing is added to a request's hot path but two counters kept
by the protocol (bytes received, requests begun); no timer per request.

Connections are counted. Above the high-water mark each new connection closes one idle
keep-alive connection (longest idle first); beyond ``max_connections`` it closes the first of
:func:`~gateway.core.connections.shed_order` (idle, then silent, then the oldest head or body
still arriving, answered 503), or is itself answered 503 and closed when every connection is
the gateway's work in progress. ``max_connections: auto`` is three quarters of the open-file
limit, so that accept() does not run out of descriptors: at EMFILE, uvloop (libuv) accepts and
closes every connection waiting in the backlog and plain asyncio stops accepting for a second,
logging a traceback each time (:func:`quiet_accept_errors` makes that one line). Neither
spins nor stops listening; the guard warns when the process's descriptors near the limit
(every ``REPORT_EVERY_S``), and says what it closed, and why, as often.

The open-file soft limit is raised to the hard limit at start (:func:`raise_open_file_limit`),
as HAProxy does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.config import ClientsConfig
from gateway.core.connections import (
    Phase,
    Seen,
    Track,
    Verdict,
    high_water,
    judge,
    may_shed,
    resolve_max_connections,
    shed_order,
)
from gateway.core.errors import GatewayError, Overloaded, RequestTimeout

log = logging.getLogger("gateway.http.guard")

# Ticks: a tenth of the shortest deadline, within these bounds.
MIN_TICK_S = 0.05
MAX_TICK_S = 1.0
# How often the guard says what it closed (when it closed anything).
REPORT_EVERY_S = 10.0
# The shedding order is rebuilt at each tick, and between ticks when used up, at most this often.
REBUILD_EVERY_S = 0.05
# Connections closed in one loop turn, at most, when many are due at once.
CLOSE_BATCH = 32
# Descriptors in use, as a share of the limit, that the guard warns about.
DESCRIPTORS_WARN_SHARE = 0.95
# Assumed where the platform has no RLIMIT_NOFILE.
DEFAULT_OPEN_FILES = 1024


class GuardedConnection(Protocol):
    """What the guard needs of a connection (the server layer's protocol)."""

    def seen(self) -> Seen: ...

    def answer_and_close(self, error: GatewayError) -> None:
        """Answer ``error`` where an answer can still be written, then close."""

    def close(self) -> None:
        """Close without an answer."""


# A connection due to be closed: its phase, the verdict and why.
_Due = tuple[GuardedConnection, Phase, Verdict, str]


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    open_connections: int
    max_connections: int
    high_water: int
    open_files_limit: int
    closed_head_timeout: int  # 408: the request head too slow
    closed_body_timeout: int  # 408: the request body too slow, or stalled
    closed_silent: int  # connected and sent nothing within header_timeout_s
    closed_send_timeout: int  # an answer left unread for send_timeout_s
    shed_idle: int  # idle keep-alive connections closed above the high-water mark
    shed_at_limit: int  # connections closed at max_connections to make room
    refused_at_limit: int  # new connections answered 503 at max_connections


class ConnectionGuard:
    __slots__ = ("_clock", "_counts", "_limits", "_order", "_order_built_at", "_reported",
                 "_tracks", "open_files")

    def __init__(self, limits: Callable[[], ClientsConfig], *, open_files: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self.open_files = open_files
        self._tracks: dict[GuardedConnection, Track] = {}
        # Who gives way next, the first at the end (popped).
        self._order: list[GuardedConnection] = []
        self._order_built_at = float("-inf")
        self._counts = dict.fromkeys(
            ("closed_head_timeout", "closed_body_timeout", "closed_silent",
             "closed_send_timeout", "shed_idle", "shed_at_limit", "refused_at_limit"), 0)
        self._reported = dict(self._counts)

    def __repr__(self) -> str:
        return (f"<ConnectionGuard open={len(self._tracks)} "
                f"max={self.max_connections()} open_files={self.open_files}>")

    def limits(self) -> ClientsConfig:
        return self._limits()

    def max_connections(self) -> int:
        return resolve_max_connections(self._limits(), self.open_files)

    def tick_s(self) -> float:
        c = self._limits()
        shortest = min(c.header_timeout_s, c.body_timeout_s, c.body_grace_s, c.send_timeout_s)
        return min(MAX_TICK_S, max(MIN_TICK_S, shortest / 10))

    # the protocol's calls --------------------------------------------------------------------
    def opened(self, conn: GuardedConnection) -> None:
        now = self._clock()
        self._tracks[conn] = Track.opened(now)
        count = len(self._tracks)
        cap = self.max_connections()
        if count > cap:
            victim = self._next_victim(now, idle_only=False, spare=conn)
            if victim is None:
                self._counts["refused_at_limit"] += 1
                self._drop(conn)
                conn.answer_and_close(Overloaded(
                    f"the gateway is at its limit of {cap} client connections",
                    retry_after_s=1.0))
                return
            self._counts["shed_at_limit"] += 1
            self._shed(victim, cap)
        elif count > high_water(self._limits(), cap):
            victim = self._next_victim(now, idle_only=True, spare=conn)
            if victim is not None:
                self._counts["shed_idle"] += 1
                self._drop(victim)
                victim.close()

    def closed(self, conn: GuardedConnection) -> None:
        self._tracks.pop(conn, None)

    # the tick --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Judge every connection and carry the verdicts out."""
        self._carry_out(self._sweep())

    def _sweep(self) -> list[_Due]:
        now = self._clock()
        limits = self._limits()
        due: list[_Due] = []
        for conn, track in list(self._tracks.items()):
            track, verdict, why = judge(track, conn.seen(), now, limits)
            if verdict is Verdict.KEEP:
                self._tracks[conn] = track
            else:
                self._drop(conn)
                due.append((conn, track.phase, verdict, why))
        self._rebuild_order(now)
        return due

    def _carry_out(self, due: list[_Due]) -> None:
        for conn, phase, verdict, why in due:
            if verdict is Verdict.TIMEOUT:
                self._counts["closed_head_timeout" if phase is Phase.HEAD
                             else "closed_body_timeout"] += 1
                conn.answer_and_close(RequestTimeout(why))
            else:
                self._counts["closed_silent" if phase is Phase.NEW
                             else "closed_send_timeout"] += 1
                conn.close()

    async def run(self) -> None:
        """Tick until cancelled; say what was closed, at most every ``REPORT_EVERY_S``."""
        last_report = self._clock()
        while True:
            await asyncio.sleep(self.tick_s())
            try:
                due = self._sweep()
                # A crowd timed out together (a slowloris flood's heads, 10 s after it came)
                # is closed a batch a loop turn, so that other connections' work interleaves.
                for i in range(0, len(due), CLOSE_BATCH):
                    if i:
                        await asyncio.sleep(0)
                    self._carry_out(due[i:i + CLOSE_BATCH])
            except Exception:  # a bug here must not end the guard: log it once a tick
                log.exception("connection guard tick failed")
            if self._clock() - last_report >= REPORT_EVERY_S:
                last_report = self._clock()
                self._report()
                self._check_descriptors()

    def statistics(self) -> GuardStatistics:
        cap = self.max_connections()
        return GuardStatistics(open_connections=len(self._tracks), max_connections=cap,
                               high_water=high_water(self._limits(), cap),
                               open_files_limit=self.open_files, **self._counts)

    # shedding --------------------------------------------------------------------------------
    def _rebuild_order(self, now: float) -> None:
        order = shed_order(self._tracks.items())
        order.reverse()
        self._order = order
        self._order_built_at = now

    def _next_victim(self, now: float, *, idle_only: bool, spare: GuardedConnection
                     ) -> GuardedConnection | None:
        """The first connection of the shedding order that may still go; ``idle_only``: only
        one idle since the last tick at least."""
        for attempt in range(2):
            order = self._order
            while order:
                conn = order[-1]
                track = self._tracks.get(conn)
                if track is None or conn is spare:
                    order.pop()
                    continue
                phase = conn.seen().phase
                if idle_only:
                    if track.phase is Phase.IDLE and phase is Phase.IDLE:
                        return order.pop()
                    if track.phase is Phase.IDLE:  # busy again: not idle, look further
                        order.pop()
                        continue
                    return None  # past the idle ones
                order.pop()
                if may_shed(phase):
                    return conn
            if attempt or now - self._order_built_at < REBUILD_EVERY_S:
                return None
            self._rebuild_order(now)
        return None

    def _shed(self, conn: GuardedConnection, cap: int) -> None:
        phase = conn.seen().phase
        self._drop(conn)
        if phase in (Phase.HEAD, Phase.BODY):
            conn.answer_and_close(Overloaded(
                f"the gateway is at its limit of {cap} client connections and closed the "
                "oldest request still arriving", retry_after_s=1.0))
        else:
            conn.close()

    def _check_descriptors(self) -> None:
        """Say so when the process's descriptors near the limit: accept() then fails, and
        uvloop answers that by closing every connection waiting to be accepted — silently."""
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:  # not Linux
            return
        if in_use >= DESCRIPTORS_WARN_SHARE * self.open_files:
            log.warning("%d of the %d file descriptors this process may open are in use: "
                        "new connections may be refused; lower clients.max_connections (%d) "
                        "or raise the open-file limit", in_use, self.open_files,
                        self.max_connections())

    def _drop(self, conn: GuardedConnection) -> None:
        self._tracks.pop(conn, None)

    def _report(self) -> None:
        new = {k: v - self._reported[k] for k, v in self._counts.items()}
        self._reported = dict(self._counts)
        if not any(new.values()):
            return
        pressure = new["shed_at_limit"] + new["refused_at_limit"]
        log.log(logging.WARNING if pressure else logging.INFO,
                "client connections closed in the last %g s: %d request heads and %d bodies "
                "too slow (408), %d silent, %d answers unread, %d idle above the high-water "
                "mark, %d at the limit of %d to make room, %d refused there; %d open",
                REPORT_EVERY_S, new["closed_head_timeout"], new["closed_body_timeout"],
                new["closed_silent"], new["closed_send_timeout"], new["shed_idle"],
                new["shed_at_limit"], self.max_connections(), new["refused_at_limit"],
                len(self._tracks))


# the process's limits --------------------------------------------------------------------------
def open_files_limit() -> int:
    """The open-file soft limit (RLIMIT_NOFILE)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return DEFAULT_OPEN_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the open-file soft limit to the hard limit; returns (before, after)."""
    try:
        import resource
    except ImportError:
        return DEFAULT_OPEN_FILES, DEFAULT_OPEN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # "Unlimited" is refused for files: the kernel's usual ceiling (nr_open) instead.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft,
                        target, exc)
    return soft, open_files_limit()


_ACCEPT_ERROR = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval_s: float = 1.0) -> None:
    """asyncio (without uvloop) logs a traceback for every accept() that fails for want of
    descriptors or memory, then stops accepting for a second and resumes: keep the pause, log
    one line a second at most."""
    previous = loop.get_exception_handler()
    last = float("-inf")
    held = 0

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last, held
        if context.get("message") != _ACCEPT_ERROR:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - last < interval_s:
            held += 1
            return
        log.warning("accept() failed (%s): not accepting for a second%s",
                    context.get("exception"), f" ({held} more held back)" if held else "")
        last, held = now, 0

    loop.set_exception_handler(handler)
