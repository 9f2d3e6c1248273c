"""Queue admission: may a request that found no free worker slot wait for one?

Pure decisions over a snapshot of the queue; the shell (``gateway.engine.dispatch``) owns the
queue itself and the clock.

Rules, in order:

1. A full queue (``max_length``) refuses everyone: 503 ``overloaded``.
2. Shedding by priority class as the queue fills: sheddable requests are refused once the
   fill ratio reaches ``shed_sheddable_at``, standard ones at ``shed_standard_at``; critical
   requests only when the queue is full. (Google SRE "criticality".)
3. Deadline: the wait is estimated as (requests ahead + 1) / drain rate, where the drain
   rate is the recent completion rate of the fleet. When the request's remaining time
   cannot cover that wait (plus its expected service time), it is refused *now* with 503
   ``deadline`` instead of timing out in the queue later.
4. Otherwise it waits, at most ``min(max_wait_s, time left before its deadline)``.

Every refusal carries ``Retry-After``: the estimated time for the queue to drain below the
level that would admit the request, at least one second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.config import QueueConfig
from gateway.core.errors import DeadlineUnmeetable, Overloaded, Rejected
from gateway.core.types import Priority


@dataclass(frozen=True, slots=True)
class QueueView:
    length: int                 # waiting now
    ahead: int                  # waiting now with priority <= this request's
    drain_rate_per_s: float     # recent completions per second (0 = unknown)
    service_time_s: float       # recent mean upstream time (0 = unknown)


@dataclass(frozen=True, slots=True)
class Wait:
    max_wait_s: float
    estimated_wait_s: float


def _drain_time(n: float, rate: float) -> float:
    return n / rate if rate > 0 else 1.0


def decide(view: QueueView, priority: Priority, time_left_s: float,
           cfg: QueueConfig) -> Wait | Rejected:
    fill = view.length / cfg.max_length
    if view.length >= cfg.max_length:
        return Overloaded("gateway queue is full; retry later",
                          retry_after_s=_drain_time(view.length, view.drain_rate_per_s))
    limit = {Priority.SHEDDABLE: cfg.shed_sheddable_at,
             Priority.STANDARD: cfg.shed_standard_at,
             Priority.CRITICAL: 1.0}[priority]
    if fill >= limit:
        excess = view.length - limit * cfg.max_length + 1
        return Overloaded(f"overloaded: {priority.name.lower()} requests are being shed",
                          retry_after_s=_drain_time(excess, view.drain_rate_per_s))
    estimated = ((view.ahead + 1) / view.drain_rate_per_s
                 if view.drain_rate_per_s > 0 else 0.0)
    if view.drain_rate_per_s > 0 and estimated + view.service_time_s > time_left_s:
        return DeadlineUnmeetable(
            f"deadline cannot be met: ~{estimated * 1000:.0f} ms queue wait expected, "
            f"{max(0.0, time_left_s) * 1000:.0f} ms left",
            retry_after_s=estimated)
    return Wait(max_wait_s=max(0.0, min(cfg.max_wait_s, time_left_s - view.service_time_s)),
                estimated_wait_s=estimated)


class RateMeter:
    """Exponentially decayed event rate (events per second), time passed in."""

    __slots__ = ("_last", "_rate", "half_life_s")

    def __init__(self, half_life_s: float = 2.0) -> None:
        self.half_life_s = half_life_s
        self._rate = 0.0
        self._last: float | None = None

    def add(self, now: float, n: float = 1.0) -> None:
        self._decay(now)
        self._rate += n * 0.6931471805599453 / self.half_life_s

    def rate(self, now: float) -> float:
        self._decay(now)
        return self._rate

    def _decay(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._rate *= 0.5 ** ((now - self._last) / self.half_life_s)
        self._last = now if self._last is None or now > self._last else self._last

    def __repr__(self) -> str:
        return f"<RateMeter {self._rate:.2f}/s>"


def triton_priority(priority: Priority, levels: int) -> int:
    """The gateway's priority class as Triton's ``priority`` parameter for a model with
    ``levels`` priority levels (1 is highest): critical → 1, sheddable → the lowest level,
    standard → the middle one."""
    if levels <= 1:
        return 1
    if priority is Priority.CRITICAL:
        return 1
    if priority is Priority.SHEDDABLE:
        return levels
    return (levels + 1) // 2


class WindowMin:
    """The smallest value seen over the last one to two windows (two rotating windows):
    the service time of a request that did not wait, robust to samples inflated by
    queueing — in the worker, or in the gateway's own stalled event loop during a herd.
    Pure: time passed in."""

    __slots__ = ("_cur", "_last_known", "_prev", "_started", "window_s")

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._cur = self._prev = math.inf
        self._last_known = 0.0
        self._started: float | None = None

    def add(self, value: float, now: float) -> None:
        self._rotate(now)
        if value < self._cur:
            self._cur = value

    def value(self, now: float) -> float:
        """The minimum, 0.0 while nothing was seen in the last two windows."""
        self._rotate(now)
        low = min(self._cur, self._prev)
        return 0.0 if low == math.inf else low

    def last_known(self, now: float) -> float:
        """The minimum, or after an idle spell the last one seen before it (stale but a
        measured service time, not a guess); 0.0 only while nothing was ever seen."""
        return self.value(now) or self._last_known

    def _rotate(self, now: float) -> None:
        if self._started is None:
            self._started = now
        elapsed = now - self._started
        if elapsed >= self.window_s and min(self._cur, self._prev) < math.inf:
            self._last_known = min(self._cur, self._prev)
        if elapsed >= 2 * self.window_s:
            self._cur = self._prev = math.inf
            self._started = now
        elif elapsed >= self.window_s:
            self._prev, self._cur = self._cur, math.inf
            self._started = now
