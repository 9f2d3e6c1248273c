"""Dispatch: the async shell that carries out admission, routing, queueing and retries.

For one inference request:

1. **Rate limits** (``gateway.ratelimit``): global → tenant → model token buckets; a request
   that finds no token is refused at once (429 + Retry-After) unless its limit allows a
   bounded wait.
2. **Route** (``gateway.routing``): the decision core picks a worker from snapshots plus the
   gateway's live in-flight counts. Sequence requests stick to their worker.
3. **Queue**: when every eligible worker is at its slot limit, the request may wait in one
   bounded priority queue (``gateway.admission`` decides: full, shed by priority, or deadline
   unmeetable → 503 now). Each completion wakes the best waiter.
4. **Send** over the worker's keep-alive pool; the outcome feeds the worker's circuit breaker.
5. **Retry** only when safe — the request never left (connect refused, stale connection) or
   the worker answered 503 — to a *different* worker, inside the retry budget.

The dispatcher returns a :class:`Lease` holding the upstream response; the caller streams
the body to the client and then calls :meth:`Dispatcher.finish`, which releases the slot.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import routing
from gateway.adaptive import AdaptiveLimit
from gateway.admission import QueueView, RateMeter, Wait, decide
from gateway.breaker import BreakerBoard
from gateway.config import GatewayConfig
from gateway.errors import (
    NoHealthyWorker,
    Overloaded,
    Rejected,
    UpstreamTimeout,
)
from gateway.fleet import Fleet
from gateway.ratelimit import RateLimiter
from gateway.redis_store import RedisStore
from gateway.retrybudget import RetryBudget, is_retryable
from gateway.types import ModelKey, NoRoute, Priority, Route, WorkerId
from gateway.upstream import Headers, Response, UpstreamFailure
from gateway.workers import Worker

log = logging.getLogger("gateway.dispatch")

MAX_STICKY_SEQUENCES = 65536
WORKER_FAILURE_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(slots=True)
class Call:
    """One request as the dispatcher sees it (built by the proxy)."""

    method: str
    target: str
    headers: Headers
    body: bytes
    key: ModelKey
    priority: Priority = Priority.STANDARD
    tenant: str | None = None
    deadline: float = float("inf")      # monotonic
    sequence_id: str | None = None
    sequence_end: bool = False
    batch_size: int = 1
    cost: int = 1
    stream: bool = False


@dataclass(slots=True)
class Lease:
    worker: Worker
    response: Response
    started: float
    model: str
    attempts: int
    done: bool = False


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    model: str = field(default="", compare=False)
    enqueued_at: float = field(default=0.0, compare=False)


class Dispatcher:
    def __init__(self, cfg: GatewayConfig, fleet: Fleet, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 redis_store: RedisStore | None = None) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.clock = clock
        self.rng = rng or random.Random()
        self.breakers = BreakerBoard(cfg.admission.breaker, rng=self.rng)
        self.limiter = RateLimiter.from_config(cfg, redis_store=redis_store)
        self.retry_budget = RetryBudget(cfg.admission.retry)
        self.router = routing.Router(cfg.routing, cfg.models, rng=self.rng)
        self.table = routing.RoutingTable()
        self.load: routing.LoadSource | None = None
        self._queue: list[_Waiter] = []
        self._queued = 0
        self._seq = itertools.count()
        self._sticky: collections.OrderedDict[str, WorkerId] = collections.OrderedDict()
        self.completions = RateMeter()
        self.arrivals: dict[str, RateMeter] = {}
        self.service_time_ewma_s = 0.0
        self.saturated_since: float | None = None
        self.saturated_total_s = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.upstream_attempts = 0
        self._waiter_deadlines: dict[int, float] = {}
        # admission.adaptive: one gradient limit per fleet member (pruned by the service)
        self.adaptive: dict[WorkerId, AdaptiveLimit] = {}
        self.in_flight_total = 0
        # Set by the metrics exporter: (model, seconds from enqueue to leaving the queue).
        self.on_queue_wait: Callable[[str, float], None] | None = None

    def __repr__(self) -> str:
        return (f"<Dispatcher queued={self._queued} sticky={len(self._sticky)} "
                f"counters={dict(self.counters)}>")

    def reconfigure(self, cfg: GatewayConfig, redis_store: RedisStore | None = None) -> None:
        if cfg.admission.adaptive != self.cfg.admission.adaptive:
            self.adaptive.clear()
        self.cfg = cfg
        self.breakers.reconfigure(cfg.admission.breaker)
        self.limiter = RateLimiter.from_config(cfg, redis_store=redis_store)
        self.retry_budget.reconfigure(cfg.admission.retry)
        self.router = routing.Router(cfg.routing, cfg.models, rng=self.rng)

    def attach(self, table: routing.RoutingTable, load: routing.LoadSource) -> None:
        self.table = table
        self.load = load

    # ------------------------------------------------------------------------------------
    def arrival(self, model: str, now: float) -> None:
        meter = self.arrivals.get(model)
        if meter is None:
            if len(self.arrivals) >= 1024:  # bounded: model names come from clients
                meter = self.arrivals.setdefault("_other", RateMeter(30.0))
            else:
                meter = self.arrivals[model] = RateMeter(30.0)
        meter.add(now)

    async def dispatch(self, call: Call) -> Lease:
        now = self.clock()
        self.arrival(call.key.name, now)
        if call.cost > 0:  # 0: a merged batch whose members were charged one by one
            await self.limiter.admit(call.tenant, call.key.name, call.cost)
        self.retry_budget.record_request(now)
        tried: set[WorkerId] = set()
        attempts = 0
        max_attempts = self.cfg.admission.retry.max_attempts
        while True:
            worker = await self._acquire(call, tried)
            attempts += 1
            self.upstream_attempts += 1
            started = self.clock()
            worker.begin(call.key.name)
            self.in_flight_total += 1
            try:
                resp = await worker.pool.request(call.method, call.target, call.headers,
                                                 call.body, stream=call.stream,
                                                 read_timeout_s=self._read_timeout(call))
            except UpstreamFailure as exc:
                self._end(worker, call.key.name, started, ok=False)
                if self._may_retry(exc.stage, None, attempts, max_attempts, tried, worker):
                    continue
                raise
            except BaseException:
                # Cancelled (the client went away): not the worker's fault.
                self._end(worker, call.key.name, started, ok=None)
                raise
            if resp.status == 503 and self._may_retry("response", 503, attempts, max_attempts,
                                                      tried, worker):
                resp.close()
                self._end(worker, call.key.name, started, ok=False)
                continue
            if call.sequence_id is not None:
                self._stick(call.sequence_id, worker.id, call.sequence_end)
            return Lease(worker, resp, started, call.key.name, attempts)

    def _read_timeout(self, call: Call) -> float:
        left = call.deadline - self.clock()
        return max(0.001, min(self.cfg.upstream.read_timeout_s, left))

    def _may_retry(self, stage: str, status: int | None, attempts: int, max_attempts: int,
                   tried: set[WorkerId], worker: Worker) -> bool:
        tried.add(worker.id)
        if attempts >= max_attempts or not is_retryable(stage, status):
            return False
        now = self.clock()
        if not self.retry_budget.can_retry(now):
            self.counters["retry_budget_exhausted"] += 1
            return False
        self.retry_budget.record_retry(now)
        self.counters["retries"] += 1
        return True

    def finish(self, lease: Lease, *, ok: bool | None = None, aborted: bool = False) -> None:
        """Release the lease's slot. ``ok`` None = judge by the status code; ``aborted`` =
        the client went away (the breaker learns nothing from it)."""
        if lease.done:
            return
        lease.done = True
        if aborted:
            self._end(lease.worker, lease.model, lease.started, ok=None)
            return
        if ok is None:
            ok = lease.response.status not in WORKER_FAILURE_STATUSES
        self._end(lease.worker, lease.model, lease.started, ok=ok)

    def _end(self, worker: Worker, model: str, started: float, *, ok: bool | None) -> None:
        """``ok`` None: the attempt was abandoned, neither success nor failure."""
        now = self.clock()
        latency = now - started
        worker.end(model, latency if ok else None)
        self.in_flight_total -= 1
        if ok and self.cfg.admission.adaptive.enabled:
            # in flight when it ended, itself included: close to when it started
            self._adaptive_for(worker).on_sample(now, latency, worker.in_flight + 1)
        if ok is None:
            self.breakers.cancel(worker.id, now)
        else:
            self.breakers.record(worker.id, now, ok=ok, latency_s=latency)
        self.completions.add(now)
        if self._queued == 0:
            self._mark_saturated(False)  # a slot is free and nobody waits for one
        if ok:
            self.service_time_ewma_s = (latency if self.service_time_ewma_s == 0.0
                                        else 0.9 * self.service_time_ewma_s + 0.1 * latency)
        self.wake_waiters(1)

    def effective_slots(self, worker: Worker) -> int:
        """The worker's slot limit, lowered to its adaptive concurrency limit when
        ``admission.adaptive.enabled``. The router reads it from the routing table, which
        the service refreshes every scrape tick (≤ 0.25 s), never above ``slots``."""
        if not self.cfg.admission.adaptive.enabled:
            return worker.slots
        return min(worker.slots, self._adaptive_for(worker).limit)

    def _adaptive_for(self, worker: Worker) -> AdaptiveLimit:
        limit = self.adaptive.get(worker.id)
        cfg = self.cfg.admission.adaptive
        if limit is None or limit.max_limit != max(worker.slots, cfg.min_limit):
            limit = self.adaptive[worker.id] = AdaptiveLimit(cfg, worker.slots)
        return limit

    # routing + queueing -------------------------------------------------------------------
    def pick(self, call: Call, exclude: set[WorkerId]) -> Route | NoRoute:
        sticky = self._sticky.get(call.sequence_id) if call.sequence_id is not None else None
        if sticky is not None and sticky in exclude:
            sticky = None
        return self.router.decide(self.table, call.key, self.load, batch_size=call.batch_size,
                                  sticky=sticky, exclude=exclude)

    async def _acquire(self, call: Call, tried: set[WorkerId]) -> Worker:
        waiter: _Waiter | None = None
        try:
            while True:
                decision = self.pick(call, tried)
                if isinstance(decision, Route):
                    worker = self.fleet.workers[decision.worker]
                    if not self.breakers.allow(worker.id, self.clock()):
                        tried.add(worker.id)
                        continue
                    self._mark_saturated(False)
                    return worker
                if not decision.saturated:
                    if tried:
                        raise NoHealthyWorker(f"no other worker for model '{call.key}' after a "
                                              f"failed attempt: {decision.reason}",
                                              retry_after_s=1.0)
                    raise NoHealthyWorker(f"no ready worker for model '{call.key}': "
                                          f"{decision.reason}", retry_after_s=1.0)
                self._mark_saturated(True)
                waiter = await self._wait(call, waiter)
        finally:
            if waiter is not None:
                self._leave_queue(waiter)

    def _leave_queue(self, waiter: _Waiter) -> None:
        if waiter.cancelled:
            return
        waiter.cancelled = True
        self._queued -= 1
        self._waiter_deadlines.pop(waiter.seq, None)
        if self.on_queue_wait is not None:
            self.on_queue_wait(waiter.model, self.clock() - waiter.enqueued_at)

    async def _wait(self, call: Call, waiter: _Waiter | None) -> _Waiter:
        now = self.clock()
        if waiter is None:
            ahead = sum(1 for w in self._queue if not w.cancelled and w.priority <= call.priority)
            view = QueueView(length=self._queued, ahead=ahead,
                             drain_rate_per_s=self.drain_rate(now),
                             service_time_s=self.service_time_ewma_s)
            decision = decide(view, call.priority, call.deadline - now, self.cfg.admission.queue)
            if isinstance(decision, Rejected):
                raise decision
            assert isinstance(decision, Wait)
            waiter = _Waiter(int(call.priority), next(self._seq),
                             asyncio.get_running_loop().create_future(),
                             model=call.key.name, enqueued_at=now)
            self._queued += 1
            self.counters["queued"] += 1
            waiter_deadline = now + decision.max_wait_s
            call_deadline = min(call.deadline, waiter_deadline)
            self._waiter_deadlines[waiter.seq] = call_deadline
        else:
            waiter.future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, waiter)
        deadline = self._waiter_deadlines.get(waiter.seq, now)
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                await waiter.future
        except BaseException as exc:
            # The caller never gets this waiter back: leave the queue here, or the queue
            # length (and the wake-ups owed to it) would leak.
            woken = waiter.future.done() and not waiter.future.cancelled()
            self._leave_queue(waiter)
            if woken:
                self.wake_waiters(1)  # the slot it was woken for goes to the next waiter
            if not isinstance(exc, TimeoutError):
                raise
            self._waiter_deadlines.pop(waiter.seq, None)
            if self.clock() >= call.deadline:
                raise UpstreamTimeout("request deadline expired while waiting for a worker",
                                      retry_after_s=1.0) from None
            raise Overloaded("no worker slot became free in time; retry later",
                             retry_after_s=max(1.0, self._drain_estimate())) from None
        return waiter

    def drain_rate(self, now: float) -> float:
        """Completions per second the queue can count on: the recent completion rate, or,
        when higher, Little's law over the slots busy now (in flight / mean service time).
        The decayed meter alone lags for seconds after an idle spell — exactly when a herd
        arrives — and would refuse as "deadline unmeetable" requests the fleet can serve."""
        rate = self.completions.rate(now)
        if self.service_time_ewma_s > 0 and self.in_flight_total > 0:
            rate = max(rate, self.in_flight_total / self.service_time_ewma_s)
        return rate

    def _drain_estimate(self) -> float:
        rate = self.drain_rate(self.clock())
        return self._queued / rate if rate > 0 else 1.0

    def wake_waiters(self, n: int) -> None:
        while n > 0 and self._queue:
            w = heapq.heappop(self._queue)
            if w.cancelled or w.future.done():
                if w.cancelled:
                    self._waiter_deadlines.pop(w.seq, None)
                continue
            w.future.set_result(None)
            n -= 1

    def _mark_saturated(self, saturated: bool) -> None:
        now = self.clock()
        if saturated and self.saturated_since is None:
            self.saturated_since = now
        elif not saturated and self.saturated_since is not None:
            self.saturated_total_s += now - self.saturated_since
            self.saturated_since = None

    def saturation_seconds(self) -> float:
        extra = self.clock() - self.saturated_since if self.saturated_since is not None else 0.0
        return self.saturated_total_s + extra

    def _stick(self, sequence_id: str, worker: WorkerId, end: bool) -> None:
        if end:
            self._sticky.pop(sequence_id, None)
            return
        self._sticky[sequence_id] = worker
        self._sticky.move_to_end(sequence_id)
        while len(self._sticky) > MAX_STICKY_SEQUENCES:
            self._sticky.popitem(last=False)

    @property
    def queue_length(self) -> int:
        return self._queued

    def statistics(self) -> dict[str, float]:
        now = self.clock()
        return {
            "queue_length": self._queued,
            "sticky_sequences": len(self._sticky),
            "completion_rate_per_s": self.completions.rate(now),
            "service_time_ewma_s": self.service_time_ewma_s,
            "upstream_attempts": self.upstream_attempts,
            "saturation_s": self.saturation_seconds(),
            **{k: float(v) for k, v in self.counters.items()},
        }
