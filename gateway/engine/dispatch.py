"""Dispatch: the async shell that carries out admission, routing, queueing and retries.

For one inference request:

1. **Rate limits** (``gateway.engine.ratelimit``): global → tenant → model token buckets; a request
   that finds no token is refused at once (429 + Retry-After) unless its limit allows a
   bounded wait.
2. **Route** (``gateway.core.routing``): the decision core picks a worker from snapshots plus the
   gateway's live in-flight counts. Sequence requests stick to their worker.
3. **Queue**: when every eligible worker is at its slot limit, the request may wait in one
   bounded priority queue (``gateway.core.admission`` decides: full, shed by priority, or deadline
   unmeetable → 503 now). Each completion wakes the best waiter.
4. **Send** over the worker's keep-alive pool; the outcome feeds the worker's circuit breaker.
5. **Retry** only when safe — the request never left (connect refused, stale connection),
   the worker answered 503, or the connection broke before any answer on a request that is
   safe to repeat (``gateway.core.retrybudget``) — to a *different* worker, inside the retry
   budget.
6. **Hedge** a request that is safe to repeat and stuck — its worker stalled
   (``gateway.core.stall``: silent for a few service times while the others answer), or past
   its per-try timeout (``gateway.core.hedge``) — with a second attempt on another worker,
   from the same budget: the first answer wins, the other attempt is cancelled and its slot
   released. The hedge runs as its own task; when it wins it cancels the dispatching task's
   wait for the first attempt and hands its answer over (the pattern of ``asyncio.timeout``:
   ``cancel()``, then ``uncancel()`` where the cancellation was only the hedge's), so the
   common case — an answer before any hedge — costs one timer per request, no task.

The dispatcher returns a :class:`Lease` holding the upstream response; the caller streams
the body to the client and then calls :meth:`Dispatcher.finish`, which releases the slot.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core import routing
from gateway.core.adaptive import AdaptiveLimit
from gateway.core.admission import (
    QueueView,
    RateMeter,
    Wait,
    WindowMin,
    decide,
    triton_priority,
)
from gateway.core.breaker import BreakerBoard
from gateway.core.concurrency import ModelLimits
from gateway.core.config import GatewayConfig
from gateway.core.errors import (
    DeadlineUnmeetable,
    NoHealthyWorker,
    Overloaded,
    Rejected,
    UpstreamTimeout,
)
from gateway.core.fairshare import CostModel, FairShare, WorkerTimeline, tenant_label
from gateway.core.hedge import HedgeVerdict, LatencyQuantiles, decide_hedge, per_try_timeout_s
from gateway.core.requesthead import RequestHead, with_parameters
from gateway.core.retrybudget import (
    AttemptStage,
    RetryBudget,
    RetryVerdict,
    decide_retry,
    is_repeatable,
)
from gateway.core.signals import RawMetrics
from gateway.core.spans import RequestTrace
from gateway.core.stall import StallBoard, StallState, StallTransition
from gateway.core.sticky import StickyTable
from gateway.core.types import ModelKey, NoRoute, Priority, Route, WorkerId
from gateway.core.waitqueue import Ticket, WaitQueue
from gateway.engine.ratelimit import RateLimiter
from gateway.engine.redis_store import RedisStore
from gateway.fleet.monitor import Fleet
from gateway.fleet.upstream import Headers, Response, UpstreamFailure
from gateway.fleet.workers import Worker

log = logging.getLogger("gateway.engine.dispatch")

WORKER_FAILURE_STATUSES = frozenset({500, 502, 503, 504})
# A read timeout this close to the client's deadline was the client's deadline.
DEADLINE_SLACK_S = 0.002
# A waiter woken for a slot its model cannot use passes the wake-up on to another model's
# waiter at most this many times per release, looking at most this many waiters.
MAX_WAKE_PASSES = 4
MAX_SKIPPED = 32
MAX_DEMAND_KEYS = 4096
NO_PEERS: dict[tuple[str, str], int] = {}
STALL_TICK_S = 0.025    # how often the stall rule looks at the busy workers
HEDGE_RETRY_S = 0.05    # a due hedge that found no free worker (or budget) looks again after
MAX_HEDGE_PICKS = 4     # routing decisions one hedge may try (breaker / stall refusals)


@dataclass(slots=True)
class Call:
    """One request as the dispatcher sees it (built by the proxy, or by the batching
    gateway for a merged batch)."""

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
    head: RequestHead | None = None     # infer requests: the head, read once by the proxy
    cost_s: float = 0.0                 # estimated GPU-seconds (gateway.core.fairshare)
    # a merged batch: its members' tenants and their rows, who pay for its GPU time
    shares: tuple[tuple[str | None, int], ...] = ()
    trace: RequestTrace | None = None   # tracing on: the request's spans (core.spans)


@dataclass(slots=True)
class Lease:
    worker: Worker
    response: Response
    started: float
    model: str
    attempts: int
    done: bool = False
    queued_s: float = 0.0  # waiting for a slot (the queue), all attempts together
    tenant: str | None = None
    batch_size: int = 1
    cost_s: float = 0.0    # estimated GPU-seconds, settled by finish()
    ahead: int = -1        # other requests in flight on the worker when it was sent
    answered: float = 0.0  # when its response (headers) came back: the execution's end
    exec_from: float = 0.0  # sent, or the worker's previous answer if later: the start
    shares: tuple[tuple[str | None, int], ...] = ()  # a merged batch's tenants, by rows


@dataclass(slots=True)
class _Won:
    """A hedge's answer, handed to the dispatching task."""

    worker: Worker
    response: Response
    started: float
    ahead: int
    answered: float
    exec_from: float


class _Phase(enum.Enum):
    AWAITING = "awaiting"    # the first attempt awaits its answer
    FALLBACK = "fallback"    # the first attempt failed; the hedge is all that is left
    DONE = "done"


class _Flight:
    """A request's attempt awaiting its answer, watched for a hedge (module doc, 6)."""

    __slots__ = ("attempts", "call", "cancelled_task", "cancelling", "hedge", "id", "noted",
                 "phase", "sent", "taken", "task", "timeout_s", "timer", "tried", "waiter",
                 "won", "worker")

    def __init__(self, fid: int, call: Call, worker: Worker, sent: float, attempts: int,
                 tried: set[WorkerId], task: asyncio.Task[object], timeout_s: float) -> None:
        self.id = fid
        self.call = call
        self.worker = worker
        self.sent = sent
        self.attempts = attempts
        self.tried = tried
        self.task = task
        self.cancelling = task.cancelling()
        self.timeout_s = timeout_s
        self.phase = _Phase.AWAITING
        self.timer: asyncio.TimerHandle | None = None
        self.hedge: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.won: _Won | None = None
        self.taken = False
        self.cancelled_task = False
        self.noted: set[str] = set()   # why a due hedge did not go, counted once each

    def __repr__(self) -> str:
        return (f"<_Flight {self.call.key} on {self.worker.id} {self.phase.value} "
                f"attempts={self.attempts} hedged={self.hedge is not None}>")


class Dispatcher:
    """Composes the pure parts — rate limits, router, :class:`WaitQueue`, :class:`StickyTable`,
    :func:`decide_retry`, breakers — and does the awaiting."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 redis_store: RedisStore | None = None, local_limit_share: float = 1.0) -> None:
        self.cfg = cfg
        self.fleet = fleet
        # gateway serve --processes N: each process admits 1/N of every local bucket
        self.local_limit_share = local_limit_share
        self.clock = clock
        self.rng = rng or random.Random()
        self.breakers = BreakerBoard(cfg.admission.breaker, rng=self.rng)
        self.limiter = RateLimiter.from_config(cfg, redis_store=redis_store,
                                               local_share=self.local_limit_share)
        self.retry_budget = RetryBudget(cfg.admission.retry)
        # Stalled workers (gateway.core.stall) and the latencies per-try timeouts come from.
        self.stalls = StallBoard(cfg.admission.stall)
        self.latencies = LatencyQuantiles()
        self._flights: dict[int, _Flight] = {}    # attempts watched for a hedge, by id
        self._flight_ids = itertools.count()
        # Set by the service: a worker's stall state changed (the routing table follows it).
        self.on_stall_change: Callable[[StallTransition], None] | None = None
        self.router = routing.Router(cfg.routing, cfg.models, rng=self.rng)
        self.table = routing.RoutingTable()
        self.load: routing.LoadSource | None = None
        # Peak-EWMA service time per (worker, model), for the expected-latency scorer.
        self.service_times = routing.ServiceTimes()
        self.queue = WaitQueue(tagger=self._head_tag, untag=self._head_untag)
        self._futures: dict[int, asyncio.Future[None]] = {}
        self.sticky = StickyTable()
        self.completions = RateMeter()
        self.service_time_ewma_s = 0.0
        # The fastest recent upstream times: a request's service without queueing (see
        # drain_rate); and the fleet's execution units, recounted at most every 0.5 s.
        self.service_floor = WindowMin()
        # The event loop's recent lateness (set by the service): a response read late because
        # the gateway itself was busy is not the worker's slowness.
        self.loop_lag: Callable[[float], float] = lambda now: 0.0
        self._units: tuple[float, int] = (-1.0, 0)
        self.saturated_since: float | None = None
        self.saturated_total_s = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.upstream_attempts = 0
        # admission.adaptive: one gradient limit per fleet member (pruned by the table sync)
        self.adaptive: dict[WorkerId, AdaptiveLimit] = {}
        # upstream.model_limits: the learned in-flight limit per (worker, model)
        self.model_limits = ModelLimits(adaptive=cfg.upstream.model_limits == "adaptive")
        self._wake_passes = 0  # wake-ups passed on since the last release (wake_waiters)
        # Requests sent per (model, tenant), halved each time demand() reads them: whose the
        # in-flight requests are, roughly, for sharing the fleet among replicas.
        self._sent_by: collections.Counter[tuple[str, str | None]] = collections.Counter()
        # Replicas as one (set by the service when coordinating): this replica's part of the
        # fleet's units, and the others' in-flight requests per (worker, model).
        self.coordinated = False
        self.share: Callable[[], float] = lambda: 1.0
        self.peers_in_flight: Callable[[], dict[tuple[str, str], int]] = lambda: NO_PEERS
        self.in_flight_total = 0
        # Fair share (gateway.core.fairshare): GPU-second costs and start-time fair queuing tags.
        self.costs = CostModel()
        self.fair = FairShare(idle_credit_s=cfg.admission.queue.idle_credit_s)
        self._last_answer: dict[WorkerId, float] = {}
        self._counters_at: dict[WorkerId, float | None] = {}
        self.timeline = WorkerTimeline()  # fair: fill a worker's waiting slot just in time
        self._hold_timers: dict[WorkerId, tuple[float, asyncio.Handle]] = {}  # (when, timer)
        # Set by the metrics exporter: (model, seconds from enqueue to leaving the queue).
        self.on_queue_wait: Callable[[str, float], None] | None = None
        # Set by the batching gateway: (model) after a request of it ended (a slot freed).
        self.on_release: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        return (f"<Dispatcher queued={len(self.queue)} sticky={len(self.sticky)} "
                f"counters={dict(self.counters)}>")

    def reconfigure(self, cfg: GatewayConfig, redis_store: RedisStore | None = None) -> None:
        if cfg.admission.adaptive != self.cfg.admission.adaptive:
            self.adaptive.clear()
        if cfg.upstream.model_limits != self.cfg.upstream.model_limits:
            self.model_limits = ModelLimits(adaptive=cfg.upstream.model_limits == "adaptive")
        self.cfg = cfg
        self.breakers.reconfigure(cfg.admission.breaker)
        self.limiter = RateLimiter.from_config(cfg, redis_store=redis_store,
                                               local_share=self.local_limit_share)
        self.retry_budget.reconfigure(cfg.admission.retry)
        self.stalls.reconfigure(cfg.admission.stall)
        self.router = routing.Router(cfg.routing, cfg.models, rng=self.rng)
        self.fair.idle_credit_s = cfg.admission.queue.idle_credit_s

    def attach(self, table: routing.RoutingTable, load: routing.LoadSource) -> None:
        self.table = table
        self.load = load

    # the whole path: admit, route, send, retry --------------------------------------------
    async def dispatch(self, call: Call) -> Lease:
        """Admit, route and send ``call``; the caller relays the response and then calls
        :meth:`finish`."""
        await self.admit(call)
        tried: set[WorkerId] = set()
        attempts = 0
        queued_s = 0.0
        while True:
            asked = self.clock()
            worker = await self.acquire(call, tried)
            ahead = worker.in_flight - 1
            attempts += 1
            started = self.clock()
            queued_s += started - asked
            repeatable = self.is_repeatable(call, worker)
            flight = self._watch(call, worker, started, attempts, tried) if repeatable \
                else None
            try:
                headers, body = self._with_remaining_time(call, worker)
                if call.trace is not None:
                    headers = call.trace.attempt(worker.id, attempts, headers)
                resp = await worker.pool.request(call.method, call.target, headers, body,
                                                 stream=call.stream,
                                                 read_timeout_s=self._read_timeout(call),
                                                 resend_stale=repeatable)
            except UpstreamFailure as exc:
                if call.trace is not None:
                    call.trace.attempt_failed(None, str(exc))
                ok = self.judge_failure(call, exc)
                self._end(worker, call.key.name, started, ok=ok)
                if flight is not None:
                    won = await self._hedge_outcome(flight)
                    attempts = flight.attempts
                    if won is not None:
                        return self._lease(call, won, attempts, queued_s)
                if ok is False and self.may_retry(exc.stage, None, attempts, tried, worker,
                                                  call=call):
                    continue
                raise
            except asyncio.CancelledError:
                # The client went away (not the worker's fault), or a hedge answered first.
                won = self._took_over(flight) if flight is not None else None
                self._end(worker, call.key.name, started, ok=None)
                if won is None or flight is None:
                    raise
                return self._lease(call, won, flight.attempts, queued_s)
            except BaseException:
                self._end(worker, call.key.name, started, ok=None)
                raise
            finally:
                if flight is not None:
                    self._unwatch(flight)
            if flight is not None:
                attempts = flight.attempts   # a hedge that lost is an attempt too
            if resp.status == 503 and self.may_retry("response", 503, attempts, tried, worker):
                if call.trace is not None:
                    call.trace.attempt_failed(503, "the worker answered 503; retried")
                resp.close()
                self._end(worker, call.key.name, started, ok=False, heard=True)
                continue
            # The answer's arrival ends the execution (the body relay may take longer and
            # finish out of order): the worker's timeline and the cost sample go by it.
            answered = self.clock()
            exec_from = self._answered(worker, call.key.name, started, answered)
            if call.sequence_id is not None:
                self.sticky.record(call.sequence_id, worker.id, end=call.sequence_end)
            return Lease(worker, resp, started, call.key.name, attempts, queued_s=queued_s,
                         tenant=call.tenant, batch_size=call.batch_size, cost_s=call.cost_s,
                         ahead=ahead, answered=answered, exec_from=exec_from,
                         shares=call.shares)

    # for transports that send themselves (gRPC): admission + routing + slot, no HTTP send
    async def admit(self, call: Call) -> None:
        """Rate limits for ``call`` (raises a Rejected on refusal)."""
        if call.trace is not None:
            call.trace.admitting()
        if call.cost > 0:  # 0: a merged batch whose members were charged one by one
            gpu_s = 0.0
            if self.limiter.has_gpu_quota(call.tenant):
                self._estimate(call)
                gpu_s = call.cost_s
            await self.limiter.admit(call.tenant, call.key.name, call.cost, gpu_s=gpu_s)
        self.retry_budget.record_request(self.clock())

    async def acquire(self, call: Call, tried: set[WorkerId]) -> Worker:
        """Route ``call`` (waiting in the queue when every worker is busy) and take a slot on
        the chosen worker; pair with :meth:`release`."""
        if call.trace is not None:
            call.trace.acquiring()
        worker = await self._acquire(call, tried)
        self._take(call, worker)
        return worker

    def _take(self, call: Call, worker: Worker) -> None:
        """The slot on ``worker`` is ``call``'s (the bookkeeping of :meth:`acquire`)."""
        self.upstream_attempts += 1
        worker.begin(call.key.name)
        self.in_flight_total += 1
        self.stalls.sent(worker.id, self.clock())
        if self.coordinated:
            sent, key = self._sent_by, (call.key.name, call.tenant)
            n = sent.get(key)
            if n is not None:
                sent[key] = n + 1
            elif len(sent) < MAX_DEMAND_KEYS:
                sent[key] = 1
        if self.is_fair:  # the just-in-time hold is fair order's; FIFO skips its bookkeeping
            self.timeline.sent(worker.id, self.clock(),
                               self.costs.cost(worker.id, call.key.name, call.batch_size))

    def release(self, worker: Worker, model: str, started: float, *, ok: bool | None,
                ahead: int = -1) -> None:
        """Give back a slot taken by :meth:`acquire`; ``ok`` None = abandoned (the client
        went away), neither the worker's success nor its failure. ``ahead``: the others in
        flight on the worker when it was sent (as :class:`Lease`), -1 unknown."""
        self._end(worker, model, started, ok=ok, ahead=ahead)

    def judge_failure(self, call: Call, exc: Exception) -> bool | None:
        """Whose failure is it? A timeout that struck because the *client's* deadline ran
        out (shorter than the worker's read timeout) is nobody's: None, so a client's own
        short deadline never opens a healthy worker's breaker. Anything else: the worker's
        (False)."""
        if getattr(exc, "timeout", False) and self.clock() >= call.deadline - DEADLINE_SLACK_S:
            return None
        return False

    def _with_remaining_time(self, call: Call, worker: Worker) -> tuple[Headers, bytes]:
        """The request as sent to ``worker``, with Triton's schedule-policy parameters where
        the model's config honours them: the time left to the request's deadline as
        ``timeout`` where its queue policy lets a request set one (and the client set none),
        so Triton drops it from its own queue rather than run it for nobody; and the
        gateway's priority class as ``priority`` where it has priority levels — a client's
        own ``priority`` may lower that, never raise it. Compressed and unreadable bodies go
        as they came."""
        head = call.head
        name = call.key.name
        if (head is None or head.body is not call.body or head.header_length == 0
                or (name not in worker.passes_timeout and name not in worker.priority_levels)):
            return call.headers, call.body
        params: dict[str, int] = {}
        if (name in worker.passes_timeout and head.timeout_us is None
                and call.deadline != float("inf")):
            params["timeout"] = int((call.deadline - self.clock()) * 1e6)
        levels = worker.priority_levels.get(name)
        if levels:
            band = triton_priority(call.priority, levels)
            if head.priority is None or head.priority < band:
                params["priority"] = band
        if not params:
            return call.headers, call.body
        try:
            body, header_length = with_parameters(call.body, head.header_length, params)
        except (ValueError, RecursionError):
            return call.headers, call.body
        if header_length is None:
            return call.headers, body
        headers = [(k, v) for k, v in call.headers if k != b"inference-header-content-length"]
        headers.append((b"inference-header-content-length", str(header_length).encode()))
        return headers, body

    def _read_timeout(self, call: Call) -> float:
        left = call.deadline - self.clock()
        return max(0.001, min(self.cfg.upstream.read_timeout_s, left))

    def may_retry(self, stage: str, status: int | None, attempts: int,
                  tried: set[WorkerId], worker: Worker, *, call: Call | None = None) -> bool:
        """Retry a failed attempt on another worker? :func:`decide_retry` with this
        dispatcher's retry budget (shared by every transport: HTTP and gRPC); a yes is
        recorded against the budget. ``worker`` joins ``tried`` either way. ``call``: the
        request, where the transport can tell whether it is safe to repeat (a connection
        broken before any answer is retried only then); without it, never."""
        tried.add(worker.id)
        now = self.clock()
        repeatable = call is not None and self.is_repeatable(call, worker)
        verdict = decide_retry(stage, status, attempts=attempts,
                               max_attempts=self.cfg.admission.retry.max_attempts,
                               budget_allows=self.retry_budget.can_retry(now),
                               repeatable=repeatable)
        if verdict is RetryVerdict.BUDGET_EXHAUSTED:
            self.counters["retry_budget_exhausted"] += 1
        elif verdict is RetryVerdict.NOT_SAFE and AttemptStage(stage) is AttemptStage.SEND:
            self.counters["not_repeated"] += 1   # broke before answering; not safe to resend
        if verdict is not RetryVerdict.RETRY:
            return False
        self.retry_budget.record_retry(now)
        self.counters["retries"] += 1
        return True

    def is_repeatable(self, call: Call, worker: Worker | None = None) -> bool:
        """May ``call`` run twice (``retrybudget.is_repeatable``)? Stateful as far as
        ``worker``'s model configs tell (a streamed answer is never resent once started:
        retries and hedges both happen before any answer)."""
        name = call.key.name
        return is_repeatable(sequence=call.sequence_id is not None,
                             stateful=worker is not None and name in worker.stateful_models,
                             model_repeatable=self.cfg.model(name).repeatable)

    def _answered(self, worker: Worker, model: str, started: float, now: float) -> float:
        """A response head came from ``worker``: the execution's end (its timeline, the
        model's latency, the stall watch). Returns when its execution began: sent, or the
        worker's previous answer if later."""
        exec_from = max(started, self._last_answer.get(worker.id, 0.0))
        self._last_answer[worker.id] = now
        self.timeline.done(worker.id, now)
        self.latencies.observe(model, now - started, now)
        self._stall_ended(worker.id, now, answered=True)
        return exec_from

    def _lease(self, call: Call, won: _Won, attempts: int, queued_s: float) -> Lease:
        self.counters["hedges_won"] += 1
        return Lease(won.worker, won.response, won.started, call.key.name, attempts,
                     queued_s=queued_s, tenant=call.tenant, batch_size=call.batch_size,
                     cost_s=call.cost_s, ahead=won.ahead, answered=won.answered,
                     exec_from=won.exec_from, shares=call.shares)

    # hedges -------------------------------------------------------------------------------
    def _watch(self, call: Call, worker: Worker, sent: float, attempts: int,
               tried: set[WorkerId]) -> _Flight | None:
        """Watch an attempt of a request safe to repeat for a hedge (its per-try timeout as
        a timer); None: it is never hedged (hedging off, a stream, no attempt left)."""
        cfg = self.cfg.admission
        if not cfg.hedge.enabled or call.stream or attempts >= cfg.retry.max_attempts:
            return None
        task = asyncio.current_task()
        if task is None:
            return None
        p99 = self.latencies.quantile(call.key.name, 0.99, sent,
                                      min_samples=cfg.hedge.min_samples)
        flight = _Flight(next(self._flight_ids), call, worker, sent, attempts, tried,
                         task, per_try_timeout_s(p99, cfg.hedge))
        self._flights[flight.id] = flight
        flight.timer = asyncio.get_running_loop().call_later(flight.timeout_s,
                                                             self._hedge_due, flight)
        return flight

    def _unwatch(self, flight: _Flight) -> None:
        """The dispatching task is done with the attempt: no hedge any more; a hedge still
        running is cancelled (its slot is released as it ends); an answer of a hedge that
        nobody took (the client left meanwhile) is closed and its slot released."""
        flight.phase = _Phase.DONE
        self._flights.pop(flight.id, None)
        if flight.timer is not None:
            flight.timer.cancel()
            flight.timer = None
        if flight.hedge is not None and not flight.hedge.done():
            flight.hedge.cancel()
        won = flight.won
        if won is not None and not flight.taken:
            flight.won = None
            won.response.close()
            self._end(won.worker, flight.call.key.name, won.started, ok=None, answered=True)

    def _hedge_due(self, flight: _Flight) -> None:
        flight.timer = None
        self._consider_hedge(flight, stalled=self.stalls.is_excluded(flight.worker.id))

    def _rearm(self, flight: _Flight, delay_s: float) -> None:
        if flight.timer is None and flight.phase is _Phase.AWAITING:
            flight.timer = asyncio.get_running_loop().call_later(max(0.001, delay_s),
                                                                 self._hedge_due, flight)

    def _consider_hedge(self, flight: _Flight, *, stalled: bool) -> None:
        """Hedge the attempt now? :func:`decide_hedge`; a yes takes a free slot on another
        worker — never ahead of requests queued for the model — and starts the hedge."""
        if flight.phase is not _Phase.AWAITING or flight.hedge is not None:
            return
        call = flight.call
        name = call.key.name
        now = self.clock()
        cfg = self.cfg.admission
        # The per-try timeout as the model's latencies say *now*: when every worker slowed
        # down at once, the answers that came meanwhile have moved the p99, and a request
        # sent before them is not stuck, just as slow as the rest.
        flight.timeout_s = max(flight.timeout_s, per_try_timeout_s(
            self.latencies.quantile(name, 0.99, now, min_samples=cfg.hedge.min_samples),
            cfg.hedge))
        verdict = decide_hedge(
            now=now, sent_at=flight.sent, timeout_s=flight.timeout_s, worker_stalled=stalled,
            repeatable=True,   # checked when it was watched
            attempts=flight.attempts, max_attempts=cfg.retry.max_attempts,
            deadline=call.deadline,
            expected_s=self.latencies.quantile(name, 0.5, now,
                                               min_samples=cfg.hedge.min_samples) or 0.0,
            budget_allows=self.retry_budget.can_retry(now))
        if verdict is HedgeVerdict.WAIT:
            self._rearm(flight, flight.sent + flight.timeout_s - now)
            return
        if verdict is not HedgeVerdict.HEDGE:
            self._note(flight, f"hedge_{verdict.value}")
            if verdict is HedgeVerdict.BUDGET_EXHAUSTED:
                self._rearm(flight, HEDGE_RETRY_S)   # the budget's window moves on
            return
        worker = self._take_now(call, flight.tried | {flight.worker.id})
        if worker is None:
            self._note(flight, "hedge_no_worker")
            self._rearm(flight, HEDGE_RETRY_S)
            return
        self.retry_budget.record_retry(now)
        self.counters["hedges"] += 1
        self.counters["hedges_on_stall" if stalled else "hedges_on_timeout"] += 1
        flight.attempts += 1
        flight.tried.add(flight.worker.id)
        flight.tried.add(worker.id)
        flight.hedge = asyncio.get_running_loop().create_task(self._run_hedge(flight, worker))

    def _note(self, flight: _Flight, counter: str) -> None:
        if counter not in flight.noted:
            flight.noted.add(counter)
            self.counters[counter] += 1

    def _take_now(self, call: Call, exclude: set[WorkerId]) -> Worker | None:
        """A free slot for a hedge at once, or None: no waiting, never ahead of the queue."""
        if self.queue.waiting_for(call.key.name):
            return None
        for _ in range(MAX_HEDGE_PICKS):
            decision = self.pick(call, exclude, defer=False)
            if not isinstance(decision, Route):
                return None
            worker = self.fleet.workers.get(decision.worker)
            if worker is None:
                return None
            if not self.stalls.allows(worker.id) \
                    or not self.breakers.allow(worker.id, self.clock()):
                exclude.add(worker.id)
                continue
            self._take(call, worker)
            return worker
        return None

    async def _run_hedge(self, flight: _Flight, worker: Worker) -> None:
        """The second attempt. Its answer goes to the dispatching task (first answer wins);
        a failure leaves the first attempt to answer alone."""
        call = flight.call
        name = call.key.name
        ahead = worker.in_flight - 1
        started = self.clock()
        try:
            headers, body = self._with_remaining_time(call, worker)
            if call.trace is not None:
                headers = call.trace.attempt(worker.id, flight.attempts, headers)
            resp = await worker.pool.request(call.method, call.target, headers, body,
                                             read_timeout_s=self._read_timeout(call))
        except UpstreamFailure as exc:
            if call.trace is not None:
                call.trace.attempt_failed(None, f"hedge: {exc}")
            self._end(worker, name, started, ok=self.judge_failure(call, exc))
            self._hedge_lost(flight)
            return
        except asyncio.CancelledError:
            self._end(worker, name, started, ok=None)   # the first attempt answered first
            raise
        except Exception:
            log.exception("hedge of a %s request on %s failed", name, worker.id)
            self._end(worker, name, started, ok=None)
            self._hedge_lost(flight)
            return
        now = self.clock()
        if resp.status == 503:   # not run there: no answer to win with
            resp.close()
            self._end(worker, name, started, ok=False, heard=True)
            self._hedge_lost(flight)
            return
        won = _Won(worker, resp, started, ahead, now, self._answered(worker, name, started, now))
        if flight.phase is _Phase.DONE:
            resp.close()
            self._end(worker, name, started, ok=None, answered=True)
            return
        flight.won = won
        if flight.phase is _Phase.FALLBACK:
            if flight.waiter is not None and not flight.waiter.done():
                flight.waiter.set_result(None)
            return
        # The first attempt still waits: cancel that wait; the task takes this answer
        # (dispatch's CancelledError branch, _took_over).
        flight.cancelled_task = True
        flight.task.cancel()

    def _hedge_lost(self, flight: _Flight) -> None:
        if flight.phase is _Phase.FALLBACK and flight.waiter is not None \
                and not flight.waiter.done():
            flight.waiter.set_result(None)

    async def _hedge_outcome(self, flight: _Flight) -> _Won | None:
        """The first attempt failed: a hedge under way may still answer. Wait for it; its
        answer, or None (no hedge, or it failed too)."""
        if flight.timer is not None:
            flight.timer.cancel()
            flight.timer = None
        if flight.hedge is None or flight.hedge.done():
            return self._claim(flight)
        flight.phase = _Phase.FALLBACK
        flight.waiter = asyncio.get_running_loop().create_future()
        await flight.waiter
        return self._claim(flight)

    def _claim(self, flight: _Flight) -> _Won | None:
        won = flight.won
        if won is not None:
            flight.taken = True
        return won

    def _took_over(self, flight: _Flight) -> _Won | None:
        """In the dispatching task's CancelledError: the hedge's answer when the hedge's
        cancellation was the only one (as ``asyncio.timeout`` tells its own); None when the
        task is cancelled for good (the client left), which then stands."""
        if flight.won is None or not flight.cancelled_task:
            return None
        flight.cancelled_task = False
        if flight.task.uncancel() > flight.cancelling:
            return None
        return self._claim(flight)

    # stalled workers ----------------------------------------------------------------------
    async def watch_stalls(self) -> None:
        """Apply the stall rule every ``STALL_TICK_S`` (the service runs this)."""
        while True:
            await asyncio.sleep(STALL_TICK_S)
            try:
                self.check_stalls()
            except Exception:
                log.exception("stall check failed")

    def check_stalls(self) -> None:
        now = self.clock()
        for t in self.stalls.check(now, lambda wid: self._service_s(wid, now),
                                   fleet_size=len(self.fleet.workers),
                                   lag_s=self.loop_lag(now)):
            self._stall_changed(t)

    def _service_s(self, wid: WorkerId, now: float) -> float | None:
        """The worker's learned service time: the slowest of the models in flight there."""
        worker = self.fleet.workers.get(wid)
        if worker is None:
            return None
        best: float | None = None
        for model in worker.in_flight_by_model:
            est = self.service_times.estimate(wid, model, now, probing=True)
            if est is not None and (best is None or est > best):
                best = est
        return best

    def _stall_ended(self, wid: WorkerId, now: float, *, answered: bool) -> None:
        t = self.stalls.ended(wid, now, answered=answered)
        if t is not None:
            self._stall_changed(t)

    def _stall_changed(self, t: StallTransition) -> None:
        """One log line when a worker stalls and one when it recovers; the routing table
        follows; the requests stuck on a newly stalled worker are hedged."""
        if t.new is StallState.STALLED and t.old is StallState.SERVING:
            self.counters["stalls"] += 1
            log.warning("worker %s stalled, no new requests until it answers: %s",
                        t.worker, t.detail)
        elif t.new is StallState.SERVING:
            log.warning("worker %s recovered from its stall: %s", t.worker, t.detail)
        else:
            log.debug("worker %s %s: %s", t.worker, t.new.value, t.detail)
        if self.on_stall_change is not None:
            self.on_stall_change(t)
        if t.new is StallState.STALLED:
            for flight in [f for f in self._flights.values() if f.worker.id == t.worker]:
                self._consider_hedge(flight, stalled=True)

    def finish(self, lease: Lease, *, ok: bool | None = None, aborted: bool = False) -> None:
        """Release the lease's slot. ``ok`` None = judge by the status code; ``aborted`` =
        the client went away (the breaker learns nothing from it)."""
        if lease.done:
            return
        lease.done = True
        if aborted:
            self._end(lease.worker, lease.model, lease.started, ok=None, answered=True)
            return
        if ok is None:
            ok = lease.response.status not in WORKER_FAILURE_STATUSES
        self._end(lease.worker, lease.model, lease.started, ok=ok, ahead=lease.ahead,
                  answered=True)
        if ok:
            self._settle(lease)

    def _end(self, worker: Worker, model: str, started: float, *, ok: bool | None,
             ahead: int = -1, answered: bool = False, heard: bool | None = None) -> None:
        """``ok`` None: the attempt was abandoned, neither success nor failure. ``ahead``:
        the others in flight on the worker when it was sent (-1: unknown; those now).
        ``answered``: the worker's timeline and stall watch took the answer already
        (:meth:`_answered`). ``heard``: whether the worker answered at all (default: ``ok``
        is True) — a 503 is an answer, a failure that broke the connection is not."""
        now = self.clock()
        latency = now - started
        worker.end(model, latency if ok else None)
        self.in_flight_total -= 1
        if not answered:
            self.timeline.done(worker.id, now)
            self._stall_ended(worker.id, now, answered=ok is True if heard is None else heard)
        if ok:
            self.service_times.observe(worker.id, model, latency, now,
                                       in_flight=ahead if ahead >= 0 else worker.in_flight,
                                       capacity=worker.capacity_units)
        if ok and self.cfg.admission.adaptive.enabled:
            # in flight when it ended, itself included: close to when it started
            self._adaptive_for(worker).on_sample(now, latency, worker.in_flight + 1)
        # the gateway's own lateness in reading the answer is not the worker's service time
        served_s = latency - self.loop_lag(now) if ok else 0.0
        if ok and worker.model_capacity:
            # in flight on the worker: this replica's, and the others' as they last said
            in_flight = worker.in_flight_by_model.get(model, 0) + 1
            if self.coordinated:
                in_flight += self.peers_in_flight().get((worker.id, model), 0)
            self.model_limits.on_sample(worker.id, model, now, max(1e-6, served_s), in_flight)
        if ok is None:
            self.breakers.cancel(worker.id, now)
        else:
            self.breakers.record(worker.id, now, ok=ok, latency_s=latency)
        self.completions.add(now)
        self._wake_passes = 0
        if not self.queue:
            self._mark_saturated(False)  # a slot is free and nobody waits for one
        if ok:
            self.service_time_ewma_s = (latency if self.service_time_ewma_s == 0.0
                                        else 0.9 * self.service_time_ewma_s + 0.1 * latency)
            self.service_floor.add(max(0.001, served_s), now)
        self.wake_waiters(1)
        if self.on_release is not None:  # after the queue's waiter took its slot
            self.on_release(model)

    def effective_slots(self, worker: Worker) -> int:
        """The worker's slot limit, lowered to its adaptive concurrency limit when
        ``admission.adaptive.enabled``. The router reads it from the routing table, which
        the table sync refreshes every scrape tick (≤ 0.25 s), never above ``slots``."""
        if not self.cfg.admission.adaptive.enabled:
            return worker.slots
        return min(worker.slots, self._adaptive_for(worker).limit)

    def _adaptive_for(self, worker: Worker) -> AdaptiveLimit:
        limit = self.adaptive.get(worker.id)
        cfg = self.cfg.admission.adaptive
        if limit is None or limit.max_limit != max(worker.slots, cfg.min_limit):
            limit = self.adaptive[worker.id] = AdaptiveLimit(cfg, worker.slots)
        return limit

    def demand(self) -> dict[str, dict[str, float]]:
        """Requests waiting or in flight per model and tenant (tenant "" for anonymous): the
        waiting from the queue, the in-flight of each model split among its tenants as the
        recent sends were."""
        out: dict[str, dict[str, float]] = {}
        for (model, tenant), n in self.queue.waiting_by().items():
            per = out.setdefault(model, {})
            per[tenant or ""] = per.get(tenant or "", 0.0) + n
        flying: collections.Counter[str] = collections.Counter()
        for w in self.fleet.workers.values():
            for model, n in w.in_flight_by_model.items():
                flying[model] += n
        sent: dict[str, dict[str, float]] = {}
        for (model, tenant), n in self._sent_by.items():
            sent.setdefault(model, {})[tenant or ""] = n
        for model, n in flying.items():
            if n <= 0:
                continue
            by_tenant = sent.get(model) or {"": 1.0}
            total = sum(by_tenant.values())
            per = out.setdefault(model, {})
            for tenant, k in by_tenant.items():
                per[tenant] = per.get(tenant, 0.0) + n * k / total
        for key in list(self._sent_by):
            self._sent_by[key] //= 2
            if not self._sent_by[key]:
                del self._sent_by[key]
        return out

    def forget_worker(self, worker: WorkerId) -> None:
        """A worker left the fleet: drop its adaptive limits, sticky sequences and costs."""
        self.adaptive.pop(worker, None)
        self.model_limits.forget(worker)
        self.sticky.forget_worker(worker)
        self.service_times.forget(worker)
        self.costs.forget_worker(worker)
        self._last_answer.pop(worker, None)
        self.stalls.forget(worker)
        self._counters_at.pop(worker, None)
        self.timeline.forget_worker(worker)
        timer = self._hold_timers.pop(worker, None)
        if timer is not None:
            timer[1].cancel()

    # fair share ---------------------------------------------------------------------------
    @property
    def is_fair(self) -> bool:
        """Fair order between tenants: with none configured all traffic is one tenant, for
        whom fair order is arrival order, so the queue stays plain FIFO (no hold, no check
        for waiters on arrival)."""
        return self.cfg.admission.queue.order == "fair" and bool(self.cfg.admission.tenants)

    def tenant_weight(self, tenant: str | None) -> float:
        found = self.cfg.admission.tenants.get(tenant) if tenant is not None else None
        return found.weight if found is not None else 1.0

    def _estimate(self, call: Call) -> None:
        """The call's cost (once per call, whatever its retries), estimated from the model
        and batch size before the worker is known."""
        if call.cost_s == 0.0:
            call.cost_s = self.costs.estimate(call.key.name, call.batch_size)

    def _head_tag(self, ticket: Ticket) -> float:
        """The wait queue's tagger: a request's start tag when it becomes its flow's head."""
        if not self.is_fair:
            return 0.0
        return self.fair.tag(tenant_label(ticket.tenant), self.tenant_weight(ticket.tenant),
                             ticket.cost_s)

    def _head_untag(self, ticket: Ticket) -> None:
        """A head left without a slot (expired, refused, gone): its tenant is not charged."""
        if self.is_fair:
            self.fair.refund(tenant_label(ticket.tenant), self.tenant_weight(ticket.tenant),
                             ticket.cost_s)

    def _start_fair(self, call: Call, ticket: Ticket | None) -> None:
        """The call takes a slot: virtual time moves to its start tag (a call that never
        queued is tagged now)."""
        if not self.is_fair:
            return
        if ticket is not None and ticket.tagged:
            tag = ticket.tag
        else:
            tag = self.fair.tag(tenant_label(call.tenant), self.tenant_weight(call.tenant),
                                call.cost_s)
        self.fair.started(tag, self.queue.next_tag())

    def _hold_s(self, worker: Worker, now: float) -> float:
        """Fair order only, and only where the gateway learned how many requests the worker
        executes at once (the minimal config's slots)."""
        if not self.is_fair or worker.configured_slots is not None or not worker.derived_units:
            return 0.0
        if self.coordinated:
            # Replicas: this replica sees only its own requests on the worker, not the units
            # the others keep busy, so it cannot tell when a waiting slot there is due; its
            # granted share of the worker (weighted by tenant) is what keeps the order fair.
            # Holding on its own count let a small share never hold and a large one never
            # fill: tenants 3 : 1 through two replicas got 52 % : 48 %, 77 % : 23 % without.
            return 0.0
        return self.timeline.hold_s(worker.id, now, worker.derived_units)

    def _wake_in(self, worker: WorkerId, delay_s: float) -> None:
        """Wake the best waiter when ``worker``'s waiting slot is due (one timer a worker)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        timer = self._hold_timers.get(worker)
        if timer is not None and loop.time() < timer[0] <= at:
            return  # an earlier wake-up is due: the waiter it wakes asks again
        if timer is not None:
            timer[1].cancel()
        self._hold_timers[worker] = (at, loop.call_at(at, self.wake_waiters, 1))

    def _settle(self, lease: Lease) -> None:
        """A request completed: learn its cost (the gateway's timing, and Triton's counters
        when a scrape came in since), charge its tenant the cost of the worker it ran on."""
        now = self.clock()
        worker = lease.worker
        service_s = lease.answered - lease.exec_from
        self.costs.observe(worker.id, lease.model, lease.batch_size, service_s)
        if worker.raw_metrics_at != self._counters_at.get(worker.id) \
                and isinstance(worker.raw_metrics, RawMetrics):
            self._counters_at[worker.id] = worker.raw_metrics_at
            for model, c in list(worker.raw_metrics.models.items())[:64]:
                self.costs.on_counters(worker.id, model, c.compute_infer_us, c.exec_count,
                                       c.success)
        actual_s = self.costs.cost(worker.id, lease.model, lease.batch_size)
        # Each tenant pays its rows' part (a merged batch may carry several tenants). In fair
        # order the request was tagged in its (lead) tenant's flow, the first share, with the
        # whole estimate, which that settlement corrects; a batch's other tenants were never
        # tagged, so their whole part moves their finish tags on. Outside fair order no
        # estimate was made and no tag given: nothing to correct.
        tagged = lease.cost_s > 0.0
        shares = lease.shares or ((lease.tenant, 1),)
        rows = sum(n for _, n in shares)
        for i, (tenant, n) in enumerate(shares):
            part_s = actual_s * n / rows
            charged_s = (lease.cost_s if i == 0 else 0.0) if tagged else part_s
            self.fair.settle(tenant_label(tenant), self.tenant_weight(tenant), charged_s,
                             part_s, lease.queued_s, now)

    # routing + queueing -------------------------------------------------------------------
    def pick(self, call: Call, exclude: set[WorkerId], *, defer: bool = True) -> Route | NoRoute:
        sticky = self.sticky.worker_for(call.sequence_id)
        if sticky is not None and sticky in exclude:
            sticky = None
        return self.router.decide(self.table, call.key, self.load, batch_size=call.batch_size,
                                  sticky=sticky, exclude=exclude, service=self.service_times,
                                  now=self.clock(), queue_wait_s=self._queue_wait_s(call),
                                  defer=defer)

    def _queue_wait_s(self, call: Call) -> float:
        """How long the queue's waiters for the model take to drain (the expected-latency
        scorer weighs it against a slower worker with a free execution unit)."""
        waiting = self.queue.waiting_for(call.key.name)
        if not waiting:
            return 0.0
        rate = self.drain_rate(self.clock())
        return waiting / rate if rate > 0 else 0.0

    async def _acquire(self, call: Call, tried: set[WorkerId]) -> Worker:
        ticket: Ticket | None = None
        if self.is_fair:  # start tags need the estimate; FIFO and metering do not
            self._estimate(call)
        served = False
        defer = True
        # Woken for a free slot and not yet sent or back in the queue: a refusal now (the
        # deadline against the worker's latency, no worker left) passes the slot on.
        woken = False
        try:
            while True:
                decision = self.pick(call, tried, defer=defer)
                if isinstance(decision, Route) and ticket is None and self.is_fair \
                        and self.queue.waiting_for(call.key.name):
                    # Others wait for this model: a free slot goes to the best tag, not to
                    # whoever arrives while the woken waiter is on its way (barging would
                    # bypass the fair order exactly under contention).
                    self._mark_saturated(True)
                    ticket = await self._wait(call, None, wake_best=True)
                    woken = True
                    continue
                if isinstance(decision, Route):
                    worker = self.fleet.workers[decision.worker]
                    now = self.clock()
                    if not self.stalls.allows(worker.id) or not self.breakers.allow(worker.id, now):
                        tried.add(worker.id)
                        continue
                    hold_s = self._hold_s(worker, now)
                    if hold_s > 0:
                        # The slot would leave this request waiting in the worker, committed
                        # ahead of anything better that arrives meanwhile: take it just in
                        # time instead (gateway.core.fairshare.WorkerTimeline).
                        self._wake_in(worker.id, hold_s)
                        self._mark_saturated(True)
                        woken = False
                        ticket = await self._wait(call, ticket)
                        woken = True
                        continue
                    self._mark_saturated(False)
                    expected_s = worker.latency_ewma_s
                    if expected_s > 0 and call.deadline - now < expected_s:
                        # Sending would only spend GPU time on an answer nobody will read.
                        self.counters["deadline_unmeetable"] += 1
                        raise DeadlineUnmeetable(
                            f"{(call.deadline - now) * 1000:.0f} ms left, but worker "
                            f"{worker.id} answers in about {expected_s * 1000:.0f} ms",
                            retry_after_s=1.0)
                    self._start_fair(call, ticket)
                    served = True
                    if call.trace is not None:
                        call.trace.routed(worker.id, decision.reason, decision.score)
                    return worker
                if not decision.saturated:
                    if tried:
                        raise NoHealthyWorker(f"no other worker for model '{call.key}' after a "
                                              f"failed attempt: {decision.reason}",
                                              retry_after_s=1.0)
                    raise NoHealthyWorker(f"no ready worker for model '{call.key}': "
                                          f"{decision.reason}", retry_after_s=1.0)
                self._mark_saturated(True)
                # Woken for a slot this model cannot use (its limit on the worker, or its
                # workers all full): the slot may serve another model's waiter, so pass the
                # wake-up on, past this model's waiters — a bounded number of times per
                # release, so that waiters of full models never ping-pong.
                pass_on = (ticket is not None and self._wake_passes < MAX_WAKE_PASSES
                           and len(self.queue) > self.queue.waiting_for(call.key.name))
                if pass_on:
                    self._wake_passes += 1
                woken = False
                try:
                    ticket = await self._wait(call, ticket,
                                              pass_on_from=call.key.name if pass_on else None)
                    woken = True
                except Rejected:
                    if not decision.deferred or ticket is not None:
                        raise
                    # Deferred for a faster worker, but the queue will not hold it (full, or
                    # the deadline beyond its wait): the free, slower worker it passed over
                    # takes it after all.
                    self.counters["deferral_refused"] += 1
                    defer = False
        finally:
            if ticket is not None:
                self._leave_queue(ticket, served=served)
            if woken and not served:
                self.wake_waiters(1)

    def _leave_queue(self, ticket: Ticket, *, served: bool = False) -> None:
        if self._futures.pop(ticket.seq, None) is None:
            return  # left already
        self.queue.remove(ticket, served=served)
        if self.on_queue_wait is not None:
            self.on_queue_wait(ticket.model, ticket.wait_s(self.clock()))

    async def _wait(self, call: Call, ticket: Ticket | None, *,
                    wake_best: bool = False, pass_on_from: str | None = None) -> Ticket:
        """Wait for a slot; the first call enqueues (or refuses), later calls (woken, but
        another request took the worker) keep the ticket's place. ``wake_best``: a slot is
        free now, wake the best waiter (perhaps this one) for it. ``pass_on_from``: this
        waiter's model could not use the slot it was woken for; wake the best waiter of
        another model."""
        now = self.clock()
        if ticket is None:
            view = QueueView(length=len(self.queue), ahead=self.queue.ahead_of(call.priority),
                             drain_rate_per_s=self.drain_rate(now),
                             service_time_s=self.service_floor.value(now))
            decision = decide(view, call.priority, call.deadline - now, self.cfg.admission.queue)
            if isinstance(decision, Rejected):
                raise decision
            assert isinstance(decision, Wait)
            ticket = self.queue.push(int(call.priority),
                                     min(call.deadline, now + decision.max_wait_s), now,
                                     call.key.name, tenant=call.tenant, cost_s=call.cost_s)
            self.counters["queued"] += 1
        else:
            self.queue.requeue(ticket)
        future = self._futures[ticket.seq] = asyncio.get_running_loop().create_future()
        if wake_best:
            self.wake_waiters(1)
        elif pass_on_from is not None:
            self._wake_another_model(pass_on_from)
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - now)):
                await future
        except BaseException as exc:
            # The caller never gets this ticket back: leave the queue here, or the queue
            # length (and the wake-ups owed to it) would leak.
            woken = future.done() and not future.cancelled()
            self._leave_queue(ticket)
            if woken:
                self.wake_waiters(1)  # the slot it was woken for goes to the next waiter
            if not isinstance(exc, TimeoutError):
                raise
            if self.clock() >= call.deadline:
                raise UpstreamTimeout("request deadline expired while waiting for a worker",
                                      retry_after_s=1.0) from None
            raise Overloaded("no worker slot became free in time; retry later",
                             retry_after_s=max(1.0, self._drain_estimate())) from None
        return ticket

    def precheck(self, priority: Priority, deadline: float, now: float,
                 arriving: int = 0) -> None:
        """Refuse now what the queue would refuse, from what is known before the body is
        read: while requests already wait (``arriving``: admitted by this gateway but not yet
        at the queue), one that cannot be served before ``deadline`` — or that the full or
        shedding queue would turn away — gets its answer at once. With nobody waiting it
        passes: a slot may be free."""
        waiting = len(self.queue) + arriving
        if waiting == 0:
            return
        view = QueueView(length=waiting, ahead=self.queue.ahead_of(priority) + arriving,
                         drain_rate_per_s=self.drain_rate(now, backlog=True),
                         service_time_s=self.service_floor.value(now))
        decision = decide(view, priority, deadline - now, self.cfg.admission.queue)
        if isinstance(decision, Rejected):
            self.counters["refused_before_body"] += 1
            raise decision

    def drain_rate(self, now: float, *, backlog: bool = False) -> float:
        """Completions per second the queue can count on: the recent completion rate, or,
        when higher, Little's law over the requests executing now — in flight, at most the
        fleet's execution units (what the workers run at once; the rest of the slots wait
        inside them); every unit where requests already wait for one (``backlog``, or a
        non-empty queue: the units are busy, or about to be — in a herd's first moments
        the requests still being read have not reached a worker yet) — over the service
        time of a request that did not wait (the recent fastest). The decayed meter alone
        lags for seconds after an idle spell, and a mean service time is inflated by
        queueing in the workers and by the gateway's own stalls — both exactly when a herd
        arrives, when they would refuse as "deadline unmeetable" requests the fleet can
        serve. After an idle spell the service time is the last one measured: the meter has
        decayed towards nothing because nobody asked, not because the fleet slowed down.
        Refusing is decided on this optimistic estimate; the dispatch-time check
        (time left against the worker's recent latency) is the backstop."""
        rate = self.completions.rate(now)
        service = self.service_floor.last_known(now)
        if service > 0 and (backlog or self.queue):
            # A gateway running late refills a freed unit that much later: each unit turns
            # over once per service time, or per loop lag when that is longer.
            turnover = max(service, self.loop_lag(now))
            rate = max(rate, self._execution_units(now) / turnover)
        elif service > 0 and self.in_flight_total > 0:
            rate = max(rate, min(self.in_flight_total, self._execution_units(now)) / service)
        return rate

    def _execution_units(self, now: float) -> int:
        at, units = self._units
        if now - at >= 0.5 or now < at:
            units = sum(w.capacity_units for w in self.fleet.workers.values() if w.is_routable)
            units = math.ceil(units * self.share())  # a replica drains its share of them
            self._units = (now, units)
        return max(1, units)

    def _drain_estimate(self) -> float:
        rate = self.drain_rate(self.clock())
        return len(self.queue) / rate if rate > 0 else 1.0

    def _wake_another_model(self, model: str) -> None:
        """Wake the first waiter of a model other than ``model`` (among the first
        ``MAX_SKIPPED`` waiters), wherever it waits."""
        for other in self.queue.others(self.clock(), model, MAX_SKIPPED):
            future = self._futures.get(other.seq)
            if future is not None and not future.done():
                future.set_result(None)
                return

    def wake_waiters(self, n: int) -> None:
        now = self.clock()
        while n > 0:
            ticket = self.queue.pop(now)
            if ticket is None:
                return
            future = self._futures.get(ticket.seq)
            if future is None or future.done():
                continue
            future.set_result(None)
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

    @property
    def queue_length(self) -> int:
        return len(self.queue)

    def statistics(self) -> dict[str, float]:
        now = self.clock()
        return {
            "queue_length": len(self.queue),
            "sticky_sequences": len(self.sticky),
            "completion_rate_per_s": self.completions.rate(now),
            "service_time_ewma_s": self.service_time_ewma_s,
            "upstream_attempts": self.upstream_attempts,
            "saturation_s": self.saturation_seconds(),
            **{k: float(v) for k, v in self.counters.items()},
        }
