"""How late the event loop runs: the gateway's own intake delay.

A request's deadline counts from its arrival at the gateway. The first moment the gateway's
code sees a request is when uvicorn hands it over, which is at least one loop turn after its
bytes arrived; when thousands arrive at once a turn lasts long, and a deadline started only
then would ignore time the request has already spent waiting for the gateway. A timer that
asks to run every ``interval_s`` measures how late it runs — the length of the loop's turns
— and the proxy dates each request's arrival back by that lateness (bounded).

The estimate is the largest lateness seen recently: it jumps up at once and decays by half
every ``half_life_s``, so one long turn is remembered for as long as requests that waited
through it are still arriving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 0.01
DEFAULT_HALF_LIFE_S = 0.05
MAX_LAG_S = 1.0  # never date an arrival back further than this


class LoopLag:
    __slots__ = ("_clock", "_due", "_handle", "_lag_s", "_seen_at", "half_life_s",
                 "interval_s", "worst_s")

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S,
                 half_life_s: float = DEFAULT_HALF_LIFE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.half_life_s = half_life_s
        self._clock = clock
        self._lag_s = 0.0
        self._seen_at = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.worst_s = 0.0

    def __repr__(self) -> str:
        return f"<LoopLag {self.lag_s() * 1000:.1f} ms, worst {self.worst_s * 1000:.1f} ms>"

    def observe(self, lateness_s: float, now: float) -> None:
        """One measured lateness (pure: the timer calls this; tests call it directly)."""
        lateness_s = min(max(0.0, lateness_s), MAX_LAG_S)
        if lateness_s >= self.lag_s(now):
            self._lag_s, self._seen_at = lateness_s, now
        self.worst_s = max(self.worst_s, lateness_s)

    def lag_s(self, now: float | None = None) -> float:
        """The recent lateness of the loop, decayed."""
        if self._lag_s <= 0.0:
            return 0.0
        if now is None:
            now = self._clock()
        age = max(0.0, now - self._seen_at)
        decayed: float = self._lag_s * 0.5 ** (age / self.half_life_s)
        return decayed

    def start(self) -> None:
        """Start measuring on the running loop (idempotent)."""
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self.interval_s
        self._handle = loop.call_later(self.interval_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = self._clock()
        self.observe(now - self._due, now)
        self._schedule(loop)
