"""The gateway's wait queue: which waiting request gets the next free worker slot (pure).

Rules:

* A lower priority value goes first (``critical`` 0 < ``standard`` 1 < ``sheddable`` 2).
  Inside a class, the lower ``tag`` goes first, then the earlier arrival. With every tag 0
  that is first come, first served; the dispatcher passes start-time fair queuing tags
  (``gateway.fairshare``: virtual start times in GPU-seconds) when fair share is on.
* Each waiter carries its own deadline (monotonic seconds). :meth:`WaitQueue.pop` never hands
  out a waiter whose deadline has passed: waking it would waste the slot it was woken for.
  Expired waiters are dropped as ``pop`` meets them and counted.
* A waiter that was woken but could not use the slot (another request took the worker) goes
  back with :meth:`WaitQueue.requeue` and keeps its place.
* Removing a waiter (its caller gave up or timed out) is O(1): it is marked and skipped
  later; ``len()`` counts live waiters only.

Admission (``gateway.admission.decide``) bounds how many may wait; ``max_length`` here is a
backstop so that no path can grow the queue without bound. Time is an argument; the
dispatcher (``gateway.dispatch``) owns the clock and the futures.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

DEFAULT_MAX_LENGTH = 1_000_000


@dataclass(slots=True, order=True)
class Ticket:
    """One waiting request. Ordered by (priority, tag, arrival)."""

    priority: int
    tag: float
    seq: int
    deadline: float = field(compare=False)
    enqueued_at: float = field(compare=False)
    model: str = field(default="", compare=False)
    tenant: str | None = field(default=None, compare=False)
    cost_s: float = field(default=0.0, compare=False)
    live: bool = field(default=True, compare=False)
    queued: bool = field(default=True, compare=False)

    def wait_s(self, now: float) -> float:
        return now - self.enqueued_at


@dataclass(frozen=True, slots=True)
class WaitQueueStatistics:
    length: int
    by_priority: tuple[tuple[int, int], ...]
    enqueued_total: int
    expired_total: int
    removed_total: int


class QueueFull(Exception):
    """The backstop bound was reached (admission should have refused earlier)."""


class WaitQueue:
    __slots__ = ("_by_model", "_by_priority", "_enqueued", "_expired", "_heap", "_live", "_removed",
                 "_seq", "max_length")

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self._heap: list[Ticket] = []
        self._seq = itertools.count()
        self._live = 0
        self._by_priority: dict[int, int] = {}
        self._by_model: dict[str, int] = {}  # bounded: a key per model with live waiters
        self._enqueued = 0
        self._expired = 0
        self._removed = 0

    def __len__(self) -> int:
        return self._live

    def __repr__(self) -> str:
        return f"<WaitQueue live={self._live} heap={len(self._heap)}>"

    def push(self, priority: int, deadline: float, now: float, model: str = "", *,
             tag: float = 0.0, tenant: str | None = None, cost_s: float = 0.0) -> Ticket:
        """Enqueue a request; ``tag`` orders it inside its class (0: by arrival), ``tenant``
        and ``cost_s`` (its estimated GPU-seconds) are carried for the caller."""
        if self._live >= self.max_length:
            raise QueueFull(f"wait queue holds {self._live} requests")
        ticket = Ticket(priority, tag, next(self._seq), deadline, now, model, tenant, cost_s)
        heapq.heappush(self._heap, ticket)
        self._count(ticket, +1)
        self._enqueued += 1
        self._compact()
        return ticket

    def requeue(self, ticket: Ticket) -> None:
        """Put a woken ticket back in its old place (same priority, tag and arrival)."""
        if not ticket.live or ticket.queued:
            return
        ticket.queued = True
        heapq.heappush(self._heap, ticket)

    def remove(self, ticket: Ticket) -> bool:
        """Take a ticket out for good; True when it was still live."""
        if not ticket.live:
            return False
        ticket.live = False
        self._count(ticket, -1)
        self._removed += 1
        return True

    def pop(self, now: float) -> Ticket | None:
        """The best live ticket whose deadline has not passed, or None. The ticket stays
        live (its caller removes it once it has a slot, or requeues it)."""
        while self._heap:
            ticket = heapq.heappop(self._heap)
            ticket.queued = False
            if not ticket.live:
                continue
            if ticket.deadline <= now:
                ticket.live = False
                self._count(ticket, -1)
                self._expired += 1
                continue
            return ticket
        return None

    def ahead_of(self, priority: int) -> int:
        """How many live waiters a new request of ``priority`` would queue behind."""
        return sum(n for p, n in self._by_priority.items() if p <= priority)

    def next_tag(self) -> float | None:
        """The tag of the waiter :meth:`pop` would hand out next (deadlines aside), or None."""
        while self._heap and not self._heap[0].live:
            heapq.heappop(self._heap).queued = False
        return self._heap[0].tag if self._heap else None

    def waiting_for(self, model: str) -> int:
        """How many live waiters want ``model``."""
        return self._by_model.get(model, 0)

    def statistics(self) -> WaitQueueStatistics:
        return WaitQueueStatistics(
            length=self._live,
            by_priority=tuple(sorted((p, n) for p, n in self._by_priority.items() if n)),
            enqueued_total=self._enqueued, expired_total=self._expired,
            removed_total=self._removed)

    def _count(self, ticket: Ticket, delta: int) -> None:
        self._live += delta
        self._by_priority[ticket.priority] = self._by_priority.get(ticket.priority, 0) + delta
        n = self._by_model.get(ticket.model, 0) + delta
        if n:
            self._by_model[ticket.model] = n
        else:
            self._by_model.pop(ticket.model, None)

    def _compact(self) -> None:
        # Removed tickets are skipped lazily; rebuild when they outnumber live ones, so the
        # heap stays O(live) however many callers give up.
        if len(self._heap) > 64 and len(self._heap) > 2 * self._live:
            self._heap = [t for t in self._heap if t.live and t.queued]
            heapq.heapify(self._heap)
