"""Stalled workers: found from their silence in a few service times (pure, ``now`` in).

A worker that dies shows at once — its connections reset, new ones are refused — and the
retry policy and the breaker deal with it. One that *hangs* (a stuck kernel, a driver stall,
a frozen container) shows nothing: its sockets stay open and the requests sent to it simply
wait, until their deadline or the read timeout, seconds later. This module finds it within a
few of its own service times instead.

The rule
--------
A worker is *silent* (:func:`is_silent`) when, all three:

* requests sent to it await their answer (the response head): ``awaiting > 0``;
* it has answered none for ``threshold`` — counted from the later of its last answer and
  the moment it went from nothing awaiting to something awaiting (an idle worker owes no
  answer) — where threshold = ``service_times`` × its learned service time (the slowest of
  the models awaited there), at least ``min_s`` (``cold_s`` while none is known), plus the
  gateway's own event-loop lag (:func:`silence_threshold_s`). No upper bound: a model whose
  requests take a minute may be silent for minutes without being stalled;
* another worker answered within that threshold: the fleet is moving, so it is not the
  gateway itself (its loop, its network) that stopped, nor a fleet-wide slowdown.

At most ``MAX_STALLED_FRACTION`` of the fleet is stalled at once (at least one worker):
whatever goes wrong, the rule never takes the fleet away.

The states, per worker::

    SERVING ──SILENT──▶ STALLED ──PROBE_DUE──▶ PROBING
       ▲                   │  ▲                   │
       └─────ANSWER────────┘  └──────SILENT───────┤
       ▲                                          │
       └─────────────────ANSWER───────────────────┘

* SERVING: takes traffic.
* STALLED: routing skips it; the shell hedges the requests it holds (``gateway.core.hedge``).
* PROBING: ``probe_after_s`` after it stalled, one request at a time may go there again
  (:meth:`StallBoard.allows`: only while nothing awaits an answer there), to learn whether
  it answers; if it goes silent again it is STALLED again, for another ``probe_after_s``.
* Any answer from the worker — a response head, whatever its status — is ANSWER: SERVING.

Any other transition is a bug and raises :class:`StallTransitionError`. Each state change is
returned as a :class:`StallTransition` (worker, time, states, a sentence for people) for the
shell to log and act on; nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway.core.config import StallConfig
from gateway.core.types import WorkerId

MAX_STALLED_FRACTION = 0.5   # of the fleet, at most, stalled at once (at least one worker)
NEVER = -math.inf


class StallState(enum.Enum):
    SERVING = "serving"
    STALLED = "stalled"
    PROBING = "probing"

    @property
    def gauge(self) -> int:
        """Value for gateway_worker_stalled: 0 serving, 1 stalled or probing."""
        return 0 if self is StallState.SERVING else 1


class StallEvent(enum.Enum):
    SILENT = "silent"          # the rule fired (module doc)
    PROBE_DUE = "probe_due"    # stalled for probe_after_s
    ANSWER = "answer"          # the worker answered


_TRANSITIONS: dict[tuple[StallState, StallEvent], StallState] = {
    (StallState.SERVING, StallEvent.SILENT): StallState.STALLED,
    (StallState.SERVING, StallEvent.ANSWER): StallState.SERVING,
    (StallState.STALLED, StallEvent.ANSWER): StallState.SERVING,
    (StallState.STALLED, StallEvent.PROBE_DUE): StallState.PROBING,
    (StallState.PROBING, StallEvent.ANSWER): StallState.SERVING,
    (StallState.PROBING, StallEvent.SILENT): StallState.STALLED,
}


class StallTransitionError(RuntimeError):
    """An event that the current state does not accept (a bug in the caller)."""


def next_state(state: StallState, event: StallEvent) -> StallState:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise StallTransitionError(f"{event.value} is not allowed in state {state.value}") \
            from None


def silence_threshold_s(service_s: float | None, cfg: StallConfig, lag_s: float = 0.0) -> float:
    """How long a busy worker may go without answering before it counts as silent."""
    if service_s is None or service_s <= 0:
        return cfg.cold_s + max(0.0, lag_s)
    return max(cfg.min_s, cfg.service_times * service_s) + max(0.0, lag_s)


def is_silent(*, awaiting: int, quiet_since: float, others_answered_at: float, now: float,
              threshold_s: float) -> bool:
    """The rule of the module doc: requests await an answer, none came for ``threshold_s``
    since ``quiet_since``, and another worker answered within ``threshold_s``."""
    return (awaiting > 0 and now - quiet_since >= threshold_s
            and now - others_answered_at < threshold_s)


@dataclass(frozen=True, slots=True)
class StallTransition:
    """One state change, for the shell to log and act on."""

    worker: WorkerId
    at: float
    old: StallState
    new: StallState
    detail: str


@dataclass(frozen=True, slots=True)
class StallStatistics:
    stalled: tuple[WorkerId, ...]     # STALLED or PROBING now
    stalls_total: int
    recoveries_total: int


class _Watch:
    __slots__ = ("awaiting", "busy_since", "last_answer", "since", "state")

    def __init__(self) -> None:
        self.state = StallState.SERVING
        self.awaiting = 0
        self.busy_since = NEVER
        self.last_answer = NEVER
        self.since = NEVER            # when it entered its state (STALLED / PROBING)

    @property
    def quiet_since(self) -> float:
        return max(self.last_answer, self.busy_since)


class StallBoard:
    """Every worker's stall state. The shell reports each request sent (:meth:`sent`) and
    each one ended (:meth:`ended`: answered, or failed / cancelled before its answer), and
    calls :meth:`check` every few tens of milliseconds; routing asks :meth:`allows`."""

    __slots__ = ("_busy", "_cfg", "_last", "_not_serving", "_prev", "_watches",
                 "recoveries_total", "stalls_total")

    def __init__(self, cfg: StallConfig) -> None:
        self._cfg = cfg
        self._watches: dict[WorkerId, _Watch] = {}
        self._busy: set[WorkerId] = set()           # awaiting > 0
        self._not_serving: set[WorkerId] = set()    # STALLED or PROBING
        # The fleet's latest answer and the latest by any *other* worker than its author:
        # "the latest answer of a worker other than W" in O(1).
        self._last: tuple[float, WorkerId | None] = (NEVER, None)
        self._prev: tuple[float, WorkerId | None] = (NEVER, None)
        self.stalls_total = 0
        self.recoveries_total = 0

    def __repr__(self) -> str:
        return (f"<StallBoard workers={len(self._watches)} busy={len(self._busy)} "
                f"stalled={len(self._not_serving)} stalls={self.stalls_total}>")

    def reconfigure(self, cfg: StallConfig) -> None:
        self._cfg = cfg

    def _watch(self, worker: WorkerId) -> _Watch:
        watch = self._watches.get(worker)
        if watch is None:
            watch = self._watches[worker] = _Watch()
        return watch

    # what the shell reports ---------------------------------------------------------------
    def sent(self, worker: WorkerId, now: float) -> None:
        """A request went to ``worker``; its answer is awaited."""
        watch = self._watch(worker)
        if watch.awaiting == 0:
            watch.busy_since = now
            self._busy.add(worker)
        watch.awaiting += 1

    def ended(self, worker: WorkerId, now: float, *, answered: bool) -> StallTransition | None:
        """A request sent to ``worker`` ended: ``answered`` (its response head came), or
        failed or was cancelled before that. An answer recovers a stalled worker."""
        watch = self._watches.get(worker)
        if watch is None:
            return None   # forgotten meanwhile (the worker left)
        if watch.awaiting > 0:
            watch.awaiting -= 1
            if watch.awaiting == 0:
                self._busy.discard(worker)
        if not answered:
            return None
        watch.last_answer = max(watch.last_answer, now)
        last_at, last_by = self._last
        if last_by != worker:
            self._prev = self._last
        self._last = (max(now, last_at) if last_by == worker else now, worker)
        if watch.state is StallState.SERVING:
            return None
        return self._move(worker, watch, StallEvent.ANSWER, now,
                          f"answered again after {now - watch.since:.2f} s"
                          if watch.state is StallState.STALLED else "answered its probe")

    def forget(self, worker: WorkerId) -> None:
        """The worker left the fleet."""
        self._watches.pop(worker, None)
        self._busy.discard(worker)
        self._not_serving.discard(worker)

    # the rule ---------------------------------------------------------------------------
    def others_answered_at(self, worker: WorkerId) -> float:
        """When a worker other than ``worker`` last answered."""
        return self._prev[0] if self._last[1] == worker else self._last[0]

    def check(self, now: float, service_s: Callable[[WorkerId], float | None], *,
              fleet_size: int, lag_s: float = 0.0) -> list[StallTransition]:
        """Apply the rule to every worker with requests awaiting an answer, and move the
        stalled ones whose probe is due to PROBING. ``service_s(worker)``: its learned
        service time (None: unknown)."""
        cfg = self._cfg
        out: list[StallTransition] = []
        if not cfg.enabled:
            for worker in list(self._not_serving):
                watch = self._watches[worker]
                watch.state = StallState.SERVING
                self._not_serving.discard(worker)
                out.append(StallTransition(worker, now, StallState.STALLED,
                                           StallState.SERVING, "stall detection turned off"))
            return out
        cap = max(1, math.floor(MAX_STALLED_FRACTION * fleet_size))
        for worker in list(self._not_serving):
            watch = self._watches[worker]
            if watch.state is StallState.STALLED and now - watch.since >= cfg.probe_after_s:
                out.append(self._move(worker, watch, StallEvent.PROBE_DUE, now,
                                      f"stalled for {now - watch.since:.2f} s; one request "
                                      f"may go there to probe it"))
        for worker in list(self._busy):
            watch = self._watches[worker]
            if watch.state is StallState.STALLED:
                continue
            threshold = silence_threshold_s(service_s(worker), cfg, lag_s)
            if not is_silent(awaiting=watch.awaiting, quiet_since=watch.quiet_since,
                             others_answered_at=self.others_answered_at(worker), now=now,
                             threshold_s=threshold):
                continue
            if watch.state is StallState.SERVING and len(self._not_serving) >= cap:
                continue   # the fleet is never stalled away (module doc)
            out.append(self._move(
                worker, watch, StallEvent.SILENT, now,
                f"{watch.awaiting} request(s) awaiting an answer, none for "
                f"{(now - watch.quiet_since) * 1000:.0f} ms (threshold "
                f"{threshold * 1000:.0f} ms) while other workers answer"))
        return out

    def _move(self, worker: WorkerId, watch: _Watch, event: StallEvent, now: float,
              detail: str) -> StallTransition:
        old = watch.state
        new = next_state(old, event)
        watch.state = new
        watch.since = now
        if new is StallState.SERVING:
            self._not_serving.discard(worker)
            self.recoveries_total += 1
        else:
            self._not_serving.add(worker)
            if old is StallState.SERVING:
                self.stalls_total += 1
        return StallTransition(worker, now, old, new, detail)

    # what routing asks --------------------------------------------------------------------
    def state(self, worker: WorkerId) -> StallState:
        watch = self._watches.get(worker)
        return StallState.SERVING if watch is None else watch.state

    def is_excluded(self, worker: WorkerId) -> bool:
        """Out of the routing table: STALLED (a PROBING worker is in it, for its probe)."""
        watch = self._watches.get(worker)
        return watch is not None and watch.state is StallState.STALLED

    def allows(self, worker: WorkerId) -> bool:
        """May a new request go to ``worker`` now? SERVING: yes; STALLED: no; PROBING: one
        at a time — only while nothing awaits an answer there."""
        watch = self._watches.get(worker)
        if watch is None or watch.state is StallState.SERVING:
            return True
        return watch.state is StallState.PROBING and watch.awaiting == 0

    def stalled(self) -> Iterator[WorkerId]:
        """The workers STALLED or PROBING now."""
        return iter(tuple(self._not_serving))

    def statistics(self) -> StallStatistics:
        return StallStatistics(tuple(sorted(self._not_serving)), self.stalls_total,
                               self.recoveries_total)
