"""The gateway's wait queue: which waiting request gets the next free worker slot (pure).

Rules:

* A lower priority value goes first (``critical`` 0 < ``standard`` 1 < ``sheddable`` 2).
* Inside a class, each tenant's requests form a **flow**, first come first served; across
  flows the head with the lowest ``tag`` goes first, then the earlier arrival. A head's tag
  is given when it *becomes* the head (``tagger``: start-time fair queuing in
  ``gateway.core.fairshare``), so requests that leave before reaching the head never count, and
  one that leaves as the head is handed back (``untag``). Without a tagger every tag is the
  one passed to :meth:`WaitQueue.push` (0 by default): first come, first served over all
  flows of a class, as the queue was before fair share.
* Each waiter carries its own deadline (monotonic seconds). :meth:`WaitQueue.pop` never hands
  out a waiter whose deadline has passed: waking it would waste the slot it was woken for.
  Expired waiters are dropped as ``pop`` meets them and counted.
* A waiter handed out by :meth:`WaitQueue.pop` stays its flow's head until its caller
  removes or requeues it — unless another ``pop`` comes first (a second slot freed before
  the woken waiter has run: several answers read in one turn of the event loop). Then it
  leaves its flow and the next waiter becomes the head, to be woken for that slot. (Before,
  that ``pop`` found no head and the wake-up was lost: in a herd each one left a slot
  empty for good, until nothing ran and the queue waited out its deadlines.)
* A waiter that was woken but could not use the slot (another request took the worker) goes
  back with :meth:`WaitQueue.requeue` and keeps its place (and its tag).
* Removing a waiter (its caller gave up, timed out or got its slot) is O(1): it is marked
  and skipped later; ``len()`` counts live waiters only.

Admission (``gateway.core.admission.decide``) bounds how many may wait; ``max_length`` here is a
backstop so that no path can grow the queue without bound. Time is an argument; the
dispatcher (``gateway.engine.dispatch``) owns the clock and the futures.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

DEFAULT_MAX_LENGTH = 1_000_000

FlowKey = tuple[int, str | None]  # (priority, tenant)


@dataclass(slots=True, order=True)
class Ticket:
    """One waiting request. Heads of flows are ordered by (priority, tag, arrival)."""

    priority: int
    tag: float
    seq: int
    deadline: float = field(compare=False)
    enqueued_at: float = field(compare=False)
    model: str = field(default="", compare=False)
    tenant: str | None = field(default=None, compare=False)
    cost_s: float = field(default=0.0, compare=False)
    live: bool = field(default=True, compare=False)
    queued: bool = field(default=False, compare=False)  # in the heap of heads now
    tagged: bool = field(default=False, compare=False)  # became its flow's head
    in_flow: bool = field(default=True, compare=False)  # not yet handed out by pop

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


Tagger = Callable[[Ticket], float]
Untagger = Callable[[Ticket], None]


class WaitQueue:
    __slots__ = ("_by_model", "_by_priority", "_enqueued", "_expired", "_flows", "_heap",
                 "_live", "_out", "_removed", "_seq", "_stored", "max_length", "tagger",
                 "untag")

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, *, tagger: Tagger | None = None,
                 untag: Untagger | None = None) -> None:
        self.max_length = max_length
        self.tagger = tagger
        self.untag = untag
        self._heap: list[Ticket] = []              # a head per flow (+ woken ones put back)
        self._out: dict[FlowKey, Ticket] = {}      # heads handed out by pop, per flow
        self._flows: dict[FlowKey, deque[Ticket]] = {}
        self._stored = 0                           # tickets in the flows, dead ones included
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
        return f"<WaitQueue live={self._live} flows={len(self._flows)} heads={len(self._heap)}>"

    def push(self, priority: int, deadline: float, now: float, model: str = "", *,
             tag: float = 0.0, tenant: str | None = None, cost_s: float = 0.0) -> Ticket:
        """Enqueue a request at the tail of its tenant's flow; ``tag`` orders it among the
        flows' heads when no tagger is set; ``cost_s`` (its estimated GPU-seconds) is for the
        tagger."""
        if self._live >= self.max_length:
            raise QueueFull(f"wait queue holds {self._live} requests")
        ticket = Ticket(priority, tag, next(self._seq), deadline, now, model, tenant, cost_s)
        key = (priority, tenant)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = deque()
        flow.append(ticket)
        self._stored += 1
        self._count(ticket, +1)
        self._enqueued += 1
        if len(flow) == 1:
            self._promote(key)
        self._compact()
        return ticket

    def requeue(self, ticket: Ticket) -> None:
        """Put a woken ticket back in its old place (same priority, tag and arrival). A
        ticket woken from behind its flow's head (:meth:`others`) never left its place."""
        if not ticket.live or ticket.queued or not ticket.tagged:
            return
        ticket.queued = True
        heapq.heappush(self._heap, ticket)

    def remove(self, ticket: Ticket, *, served: bool = True) -> bool:
        """Take a ticket out for good; True when it was still live. ``served``: it leaves
        with a slot; otherwise a head's tag is handed back (``untag``)."""
        if not ticket.live:
            return False
        ticket.live = False
        self._count(ticket, -1)
        self._removed += 1
        if not served and ticket.tagged and self.untag is not None:
            self.untag(ticket)
        if ticket.tagged and not ticket.queued:
            self._leave_flow(ticket)  # its flow needs a new head
        return True

    def pop(self, now: float) -> Ticket | None:
        """The best live head whose deadline has not passed, or None. The ticket stays
        live and its flow's head (its caller removes it once it has a slot, or requeues
        it) — until another ``pop`` comes first: then the flow's next waiter is the head
        (module doc)."""
        if self._out:
            # Heads handed out earlier and still out (neither removed nor requeued): their
            # flows' next waiters become heads, so that this slot can wake one of them.
            for out in self._out.values():
                if out.live and not out.queued:
                    self._leave_flow(out)
            self._out.clear()
        while self._heap:
            ticket = heapq.heappop(self._heap)
            ticket.queued = False
            if not ticket.live:
                self._leave_flow(ticket)
                continue
            if ticket.deadline <= now:
                ticket.live = False
                self._count(ticket, -1)
                self._expired += 1
                if self.untag is not None:
                    self.untag(ticket)
                self._leave_flow(ticket)
                continue
            if ticket.in_flow:
                self._out[(ticket.priority, ticket.tenant)] = ticket
            return ticket
        return None

    def others(self, now: float, model: str, max_scan: int) -> Iterator[Ticket]:
        """Live, unexpired waiters for models other than ``model``, best class first and in
        flow order inside it (not strictly :meth:`pop`'s order across flows): the waiters a
        slot that ``model`` cannot use may go to, behind a head of ``model`` that would
        otherwise block them. At most ``max_scan`` tickets are looked at. They stay where
        they are; the caller removes the one that gets a slot."""
        scanned = 0
        seen: set[FlowKey] = set()
        for head in sorted(t for t in self._heap if t.live):
            key = (head.priority, head.tenant)
            if key in seen:
                continue  # a woken waiter put back, beside its flow's new head
            seen.add(key)
            for ticket in self._flows.get(key, ()):
                scanned += 1
                if scanned > max_scan:
                    return
                if ticket.live and ticket.model != model and ticket.deadline > now:
                    yield ticket

    def next_tag(self) -> float | None:
        """The tag of the head :meth:`pop` would hand out next (deadlines aside), or None."""
        while self._heap and not self._heap[0].live:
            ticket = heapq.heappop(self._heap)
            ticket.queued = False
            self._leave_flow(ticket)
        return self._heap[0].tag if self._heap else None

    def waiting_for(self, model: str) -> int:
        """How many live waiters want ``model``."""
        return self._by_model.get(model, 0)

    def waiting_by(self) -> dict[tuple[str, str | None], int]:
        """Live waiters per (model, tenant); O(stored tickets), for a once-a-heartbeat read."""
        out: dict[tuple[str, str | None], int] = {}
        put_back = (t for t in self._heap if not t.in_flow)  # woken, then requeued
        for flow in (*self._flows.values(), put_back):
            for t in flow:
                if t.live:
                    out[t.model, t.tenant] = out.get((t.model, t.tenant), 0) + 1
        return out

    def ahead_of(self, priority: int) -> int:
        """How many live waiters a new request of ``priority`` would queue behind."""
        return sum(n for p, n in self._by_priority.items() if p <= priority)

    def statistics(self) -> WaitQueueStatistics:
        return WaitQueueStatistics(
            length=self._live,
            by_priority=tuple(sorted((p, n) for p, n in self._by_priority.items() if n)),
            enqueued_total=self._enqueued, expired_total=self._expired,
            removed_total=self._removed)

    def _leave_flow(self, ticket: Ticket) -> None:
        """``ticket`` (its flow's head) leaves its flow: the next waiter becomes the head.
        A no-op for a ticket that left already (woken, then requeued)."""
        if ticket.in_flow:
            ticket.in_flow = False
            self._advance((ticket.priority, ticket.tenant))

    def _advance(self, key: FlowKey) -> None:
        """The flow's head left: drop it (and any dead tickets behind it), promote the next."""
        flow = self._flows.get(key)
        if not flow:
            return
        while flow and (not flow[0].live or flow[0].tagged):
            flow.popleft()
            self._stored -= 1
        if flow:
            self._promote(key)
        else:
            del self._flows[key]

    def _promote(self, key: FlowKey) -> None:
        flow = self._flows[key]
        while flow and not flow[0].live:
            flow.popleft()
            self._stored -= 1
        if not flow:
            del self._flows[key]
            return
        head = flow[0]
        if self.tagger is not None:
            head.tag = self.tagger(head)
        head.tagged = True
        head.queued = True
        heapq.heappush(self._heap, head)

    def _count(self, ticket: Ticket, delta: int) -> None:
        self._live += delta
        self._by_priority[ticket.priority] = self._by_priority.get(ticket.priority, 0) + delta
        n = self._by_model.get(ticket.model, 0) + delta
        if n:
            self._by_model[ticket.model] = n
        else:
            self._by_model.pop(ticket.model, None)

    def _compact(self) -> None:
        # Removed tickets behind a head are skipped lazily; rebuild the flows when they
        # outnumber live ones, so memory stays O(live) however many callers give up. A
        # head (tagged) is kept, dead or alive: the heap or its caller still holds it.
        if self._stored > 64 and self._stored > 2 * self._live:
            for key in list(self._flows):
                kept = deque(t for t in self._flows[key] if t.live or t.tagged)
                self._flows[key] = kept
            self._stored = sum(len(f) for f in self._flows.values())
