"""A turnstile on the event loop: at most ``per_turn`` inference requests start their work
in one turn of the loop; the rest wait (FIFO) for the next turns.

Why: a thundering herd lands thousands of requests in one loop turn, each a few hundred
microseconds of parsing, admission and answering. asyncio runs everything ready in a turn
before it polls sockets again, so a health probe arriving then would wait for all of them
(hundreds of milliseconds). Letting only ``per_turn`` requests through per turn keeps every
turn short, so probes, /metrics and /status (which do not pass the turnstile) are answered
within a few turns even in a storm. Under ordinary load fewer than ``per_turn`` requests
arrive per turn and :meth:`enter` returns at once without awaiting.
"""

from __future__ import annotations

import asyncio
import collections

DEFAULT_PER_TURN = 32


class Turnstile:
    __slots__ = ("_left", "_scheduled", "_waiters", "per_turn", "waited_total")

    def __init__(self, per_turn: int = DEFAULT_PER_TURN) -> None:
        self.per_turn = per_turn
        self._left = per_turn
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._scheduled = False
        self.waited_total = 0

    def __repr__(self) -> str:
        return f"<Turnstile per_turn={self.per_turn} waiting={len(self._waiters)}>"

    async def enter(self) -> None:
        if self._left > 0 and not self._waiters:
            self._left -= 1
            self._arm()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.waited_total += 1
        self._arm()
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def _arm(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """Runs once per loop turn while there is traffic: refill and let the next ones in."""
        self._scheduled = False
        self._left = self.per_turn
        while self._waiters and self._left > 0:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._left -= 1
        if self._waiters or self._left < self.per_turn:
            self._arm()

    @property
    def waiting(self) -> int:
        return len(self._waiters)
