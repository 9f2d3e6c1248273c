"""Slow clients, bounded: the deadlines of a client connection and which connection gives way
when there are too many (pure, ``now`` in).

The rules
---------
A client connection is, at any moment, in one :class:`Phase`, as the server layer sees it::

    NEW ──▶ HEAD ──▶ BODY ──▶ WORKING ──▶ SENDING ──▶ IDLE ──▶ HEAD ──▶ …
     (nothing   (a request   (its body,   (the gateway's  (an answer    (keep-alive,
      yet)       head)        being read)  turn)           unread)       between requests)

* NEW and HEAD share one deadline, ``header_timeout_s`` (HAProxy's ``timeout http-request``):
  from the connection's opening for its first request, from the first time the head was seen
  for a later one. A connection that sent nothing is closed without an answer; one part-way
  through a head is answered 408.
* BODY: 408 when no byte has come for ``body_timeout_s`` (nginx's ``client_body_timeout``),
  or when the body is slower than ``body_min_rate_bytes_per_s`` on average: ``B`` bytes may
  take ``body_grace_s + B / rate`` seconds (Apache mod_reqtimeout's ``body=20,MinRate=500``).
  Time the gateway is not reading (a full buffer, ``Expect: 100-continue`` not yet answered)
  is WORKING, not BODY: a client is never timed out for the gateway's own wait.
* SENDING: the gateway waits to write more of an answer the client does not read; closed
  after ``send_timeout_s`` (nginx's ``send_timeout``).
* WORKING and IDLE have no deadline here: the gateway's own deadlines cover the first, the
  keep-alive timeout (a timer of the server layer) the second.

The shell looks at each connection once a tick and hands what it saw (:class:`Seen`) with the
connection's :class:`Track` to :func:`judge`, which returns the new track and a
:class:`Verdict`. A phase's clock starts when a tick first sees it (NEW's at the opening), so a
deadline fires up to two ticks late, never early.

When connections run short (:func:`shed_order`): above the high-water mark a new connection
closes one IDLE connection, longest idle first; at the limit it closes, in order, the
longest-idle IDLE one, the oldest NEW one, the oldest HEAD or BODY one (answered 503). WORKING
and SENDING connections are never closed to make room: they are the gateway's work in
progress.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from gateway.core.config import ClientsConfig

K = TypeVar("K")


class Phase(enum.Enum):
    NEW = "new"  # connected, nothing received yet
    HEAD = "head"  # a request head arriving
    BODY = "body"  # a request body arriving, the gateway reading it
    WORKING = "working"  # the gateway's turn: answering, or not reading the body yet
    SENDING = "sending"  # an answer the client does not read (the gateway's writes paused)
    IDLE = "idle"  # keep-alive, between two requests


class Verdict(enum.Enum):
    KEEP = "keep"
    TIMEOUT = "timeout"  # answer 408 where an answer can still be written, then close
    CLOSE = "close"  # close without an answer (nothing was asked, or an answer is under way)


@dataclass(frozen=True, slots=True)
class Seen:
    """What the server layer sees of a connection at one tick."""

    phase: Phase
    request: int  # requests begun on the connection so far
    received_bytes: int  # bytes received on it so far


@dataclass(frozen=True, slots=True)
class Track:
    """What the guard remembers of a connection between ticks."""

    phase: Phase
    request: int
    since: float  # when this phase (of this request) was first seen
    base_bytes: int  # bytes received by then
    progress_at: float  # the last time the received count grew
    received_bytes: int

    @classmethod
    def opened(cls, now: float) -> Track:
        return cls(Phase.NEW, 0, now, 0, now, 0)


def judge(track: Track, seen: Seen, now: float, limits: ClientsConfig
          ) -> tuple[Track, Verdict, str]:
    """The connection's new track, what to do with it, and why (for the 408's message)."""
    same = seen.phase is track.phase and seen.request == track.request
    # The first request's head keeps the clock that started at the opening.
    first_head = track.phase is Phase.NEW and seen.phase is Phase.HEAD and seen.request <= 1
    if same and seen.received_bytes == track.received_bytes:
        pass  # nothing new (most connections at most ticks): no new track
    elif same or first_head:
        grew = seen.received_bytes > track.received_bytes
        track = Track(seen.phase, seen.request, track.since, track.base_bytes,
                      now if grew else track.progress_at, seen.received_bytes)
    else:
        track = Track(seen.phase, seen.request, now, seen.received_bytes, now,
                      seen.received_bytes)
    age = now - track.since
    phase = track.phase
    if phase is Phase.NEW:
        if age >= limits.header_timeout_s:
            return track, Verdict.CLOSE, "nothing sent"
    elif phase is Phase.HEAD:
        if age >= limits.header_timeout_s:
            return track, Verdict.TIMEOUT, (f"request head not received within "
                                            f"{limits.header_timeout_s:g} s")
    elif phase is Phase.BODY:
        if now - track.progress_at >= limits.body_timeout_s:
            return track, Verdict.TIMEOUT, (f"no request body bytes for "
                                            f"{limits.body_timeout_s:g} s")
        rate = limits.body_min_rate_bytes_per_s
        if rate and age > limits.body_grace_s and \
                track.received_bytes - track.base_bytes < rate * (age - limits.body_grace_s):
            return track, Verdict.TIMEOUT, f"request body slower than {rate} bytes/s"
    elif phase is Phase.SENDING and age >= limits.send_timeout_s:
        return track, Verdict.CLOSE, "answer left unread"
    return track, Verdict.KEEP, ""


# Who gives way first when connections run short (lower first); absent: never.
_SHED_RANK = {Phase.IDLE: 0, Phase.NEW: 1, Phase.HEAD: 2, Phase.BODY: 2}


def shed_order(tracks: Iterable[tuple[K, Track]]) -> list[K]:
    """The connections that may be closed to make room, the first to go first: idle
    keep-alive ones (longest idle first), then those that sent nothing (oldest first), then
    heads and bodies still arriving (oldest first)."""
    ranked = [(rank, track.since, i, key) for i, (key, track) in enumerate(tracks)
              if (rank := _SHED_RANK.get(track.phase)) is not None]
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    return [key for *_, key in ranked]


def is_idle(phase: Phase) -> bool:
    return phase is Phase.IDLE


def may_shed(phase: Phase) -> bool:
    return phase in _SHED_RANK


def resolve_max_connections(limits: ClientsConfig, open_files_soft_limit: int) -> int:
    """``max_connections``, with 'auto' as three quarters of the open-file limit (at least
    16)."""
    if limits.max_connections != "auto":
        return limits.max_connections
    return max(16, open_files_soft_limit * 3 // 4)


def high_water(limits: ClientsConfig, max_connections: int) -> int:
    """Above this many connections, idle keep-alive ones give way to new ones."""
    return max(1, int(max_connections * limits.idle_high_water))
