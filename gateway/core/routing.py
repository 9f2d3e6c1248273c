"""Routing decision core: which worker serves a request, decided Filter → Scorer → Picker.

Pure and synchronous: no I/O, no clock; randomness comes from an injected ``random.Random``.

Three objects, and who owns what
--------------------------------
* :class:`RoutingTable` is an index the shell builds from ``WorkerSnapshot``\\ s. Per model
  name it keeps the *statically* eligible workers (ready, breaker allows, model listed),
  grouped by pool priority, with per-worker figures precomputed from the last scrape (free
  GPU memory, pending, latency, traffic share). ``update(snapshot)`` refreshes one worker in
  O(1) when only its signals changed (every scrape) and re-indexes it (O(list) edits) when
  its eligibility changed (ready, breaker, models, pool). Nothing is rebuilt per request.
* Live load. The gateway's in-flight counts change with every request, far more often than
  the table, so they are not in it: a decision takes a :class:`LoadSource` (a Protocol with
  ``in_flight(worker)`` and ``in_flight_model(worker, model)``), normally the shell's
  :class:`InFlightCounters`, bumped with ``begin``/``end`` around each upstream call. It is
  asked only about the workers a decision looks at, so P2C costs the same at 10 or 10,000
  workers. Without a LoadSource the snapshots' counts are used — frozen between rebuilds,
  which is exactly how a fleet gets herded onto the worker that looked best at the last
  scrape (see the herd test).
* :class:`Router` holds the config (weights per model), the RNG, the round-robin cursors and
  the pack targets, and counts decisions for ``statistics()``.
  ``Router.decide(table, key, load, ...)`` returns ``Route`` or ``NoRoute``.

Filters (:func:`drop_reason` is the reference; the table applies the same rules): not
ready; model (and version, if asked) not ready; breaker refuses; stalled (silent while the
others answer: ``gateway.core.stall``); free GPU memory below the
request's footprint (``memory_bytes_per_request`` × batch size, else a learned per-request
estimate × batch size; a worker without GPU signals, or with stale ones, passes) — free memory
*now*, estimated by :func:`live_free_bytes` from the scrape and the live in-flight count, so
requests decided between two scrapes do not all fit into the same scraped free bytes; gateway
in-flight at or above ``slots``, or the model's in-flight there at or above its limit on
that worker (``model_limits``: learned per (worker, model) by ``gateway.core.concurrency``) —
*saturated*: when only saturation stands in the way the answer is ``NoRoute(saturated=True)``
so the shell queues instead of failing.

Scorers, each in [0, 1], 1 best: memory = free / total (0.5 without GPU signals); queue =
1 / (1 + (pending + in_flight) / slots) — scraped pending overlaps the gateway's own
in-flight, which is deliberate: it is how other gateways' and clients' load shows; latency
= fastest candidate's EWMA / this one's (0.5 when unknown); expected latency = the best
candidate's expected completion time / this one's. They are combined with the weights of
``RoutingConfig.weights`` or the model's own ``ModelConfig.weights`` (default memory 1,
queue 2, expected latency 8: the expected time decides — a candidate 10 % slower loses
unless it is much less loaded — the queue breaks its ties below capacity toward the less
loaded worker, memory leans toward roomier GPUs).

Expected latency (the default's main scorer). The expected completion time of this request
on a worker is its service time for the model × max(1, (work ahead + 1) / capacity): work
ahead = the gateway's live in-flight there + the worker's queue the gateway did not send
(scraped pending beyond the gateway's in-flight at the scrape); capacity = the requests the
worker executes at once, learned from its model configs (``capacity_units``; else its
slots). Below capacity a request runs at once and takes one service time; above, it waits
for the ones ahead to drain at capacity / service time per second. On a worker whose
execution units are all busy, the shell's queue counts too (``queue_wait_s``: its waiters
for the model over the fleet's completion rate): they take the next free units first, so as
the queue grows a slower worker with a free unit becomes the better place — the queue's wait
is weighed against the slow worker's service time. Triton's own queue time
for the model (fresh scrape) can only raise the predicted wait, by half the gap: queueing
the gateway cannot see (other clients, other models on the GPU) counts, and an idle worker's
last-interval figure costs it little. The service time is :class:`ServiceTimes`' peak EWMA
per (worker, model) — the gateway's own measurement, Finagle's and Linkerd's "peak EWMA":
a slower sample replaces the estimate at once, faster ones pull it down with time constant
``SERVICE_DECAY_S``; each sample is first divided by the same max(1, (ahead + 1) /
capacity) factor, so queueing inside the worker is not counted twice. A worker with no
request of the model in flight sees its estimate decay toward zero with time constant
``IDLE_DECAY_S`` (2 s), so a worker judged slow is re-measured now and then (an 80 ms
worker beside busy 20 ms ones: every 3 s or so) — one probe, since a worker with a request
in flight is judged by its undecayed estimate. Finagle and Linkerd use 10 s, but there the
cost is also multiplied by the worker's load, which keeps a healthy worker in play; here one
outlier (a stall, a cold first run) would keep an equal worker out of the rotation for
~20 s, so the decay is shorter. A
cold worker (no sample yet) is assumed as fast as the fastest measured candidate of the
decision, and ``PROBE_PENALTY`` × that while its first request is in flight: it gets a
probe, then a share by its measurement. Without a ``ServiceTimes`` (snapshot-only
callers) the snapshot's per-worker ``latency_ewma_s`` stands in.

Waiting for a faster worker. The scorer only chooses among workers with a free slot, so when
the fast workers are full, a slow free one would take the request however long it takes
there. Instead, a decision that met full workers on the way (P2C's draws, or the scan; at
most ``MAX_WAITABLE``) weighs waiting for one of them: its service × max((work ahead + 1) /
capacity, 1 + 1 / executing) — the wait for one of its requests to finish, then its run —
plus ``DEFER_QUEUE_WEIGHT`` × the shell's ``queue_wait_s`` (those already waiting go
first; the shell's figure drains them through the whole fleet at its best recent pace, while
requests waiting for the faster workers drain through those alone — counted at face value,
a fleet that needs every worker, at 95 % load, deferred until its queue grew and lost the
slow workers' slots meanwhile: mean 1.11 × least-in-flight's in the event simulation of
``tests/test_routing_defer.py``, 1.02 with 3 ×). When the best free
candidate's expected completion time is more than ``DEFER_RATIO`` × that, the answer is
``NoRoute(saturated=True)``: the shell queues the request, and the next completion wakes
it, to be decided again (the fast worker's freed slot is then the best place). Only a
worker seen draining counts: it runs the model now, and completed one within
``DEFER_DRAIN_FACTOR`` × its service time (a stalled worker is not waited for). Bounds:
the wait counted includes the queue ahead, so deferral stops as the queue grows and the
slow worker takes the rest at once; a woken request keeps its place at the head of the
queue, so it gets the next fast slot; and its expected wait is shorter than the slow
worker's answer (by ``DEFER_RATIO``), so a deadline the wait cannot meet the slow worker
would most likely not meet either. Same pool level only (spill-over stays the pools'
rule), ``load_aware`` with the expected-latency scorer and measured service times only,
never a cold candidate (a probe) or when packing.

Pickers: ``p2c`` draws candidates at random (``choices`` of them, filtered as drawn; a
bounded number of draws, then an exact scan of the pool level) and takes the best score.
Its cost does not grow with the fleet until nearly every worker of a level is saturated
(then the scan finds the last free slots, O(level)); a shell that dispatches its queue
when a request ends should pass ``sticky=<the worker that just freed a slot>``, O(1).
``full_scan`` scores every eligible worker. Baselines: ``round_robin``, ``random``,
``least_inflight`` (full scan on gateway in-flight, ties at random). All share the filters,
pools and stickiness, so a comparison isolates the choice itself.

Pools: route within the most preferred priority level (lowest ``pool_priority``) that has
an eligible worker below saturation — in_flight < slots and (pending + in_flight) / slots
< ``saturation_queue``; spill to the next level only while none has; traffic returns by
itself as soon as room appears. If every level is saturated by queue alone, the least
loaded worker still below its slots takes the request (in the last level P2C takes the
best such worker it drew instead of scanning, so a queued-up fleet costs O(draws)).

Slow start thins rather than scales: a worker with ``traffic_share`` s takes part in a
decision with probability s. Its traffic then ramps roughly in proportion to s; multiplying
its score instead would starve it until the rest of the fleet was nearly full. A thinned
worker is still used when nothing else fits — slow start never fails a request.

Packing (``RoutingConfig.pack``) prefers a worker already running the model (model
in-flight > 0) while it is below saturation: the router sticks to the last worker it picked
for the model until it fills, so that GPU's dynamic batcher forms full batches and the other
GPUs stay free (unfragmented memory) for other models and large requests. The price: higher
per-request latency on the packed GPU (queueing inside its batcher) and less spread when
load is light. Off by default.

Sticky: ``decide(..., sticky=worker_id)`` keeps a sequence on its worker while that worker
passes the filters, whatever its pool; otherwise a normal pick.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, Protocol

from gateway.core.config import ModelConfig, RoutingConfig, WeightsConfig
from gateway.core.types import (
    Decision,
    ModelKey,
    NoRoute,
    Route,
    WorkerId,
    WorkerSignals,
    WorkerSnapshot,
)

NEUTRAL_SCORE: Final = 0.5
DRAWS_PER_CHOICE: Final = 4  # P2C draws up to this many × k (at least MIN_DRAWS) ...
MIN_DRAWS: Final = 8
MAX_DRAWS: Final = 64        # ... and on to this many while none fit, then scans the level

SERVICE_DECAY_S: Final = 1.0    # peak EWMA: time constant of the pull-down after a peak
IDLE_DECAY_S: Final = 2.0       # an idle worker's estimate decays toward 0 (re-measurement)
PROBE_PENALTY: Final = 4.0      # a cold worker's service × this while its probe is in flight
DEFER_RATIO: Final = 1.5        # defer when the best free worker is this × worse than waiting
DEFER_DRAIN_FACTOR: Final = 2.0  # a full worker counts as draining: a completion this recent
DEFER_QUEUE_WEIGHT: Final = 3.0  # the shell's queue wait, counted pessimistically (doc)
MAX_WAITABLE: Final = 16        # full workers remembered per decision as places to wait for
MAX_MODELS_PER_WORKER: Final = 64   # service-time estimates kept per worker (stalest go)
MAX_SERVICE_WORKERS: Final = 65_536  # workers with estimates (oldest go; the shell forgets)
MIN_SERVICE_S: Final = 1e-6

DROP_NOT_READY: Final = "not ready"
DROP_NO_MODEL: Final = "model not ready"
DROP_BREAKER: Final = "breaker open"
DROP_STALLED: Final = "stalled"
DROP_MEMORY: Final = "not enough free GPU memory"
DROP_SATURATED: Final = "saturated"


# ---------------------------------------------------------------- filters and scorers

def required_memory_bytes(model: ModelConfig, batch_size: int = 1,
                          learned_bytes_per_request: float | None = None) -> float:
    """GPU memory the request needs on its worker; 0 = unknown (no memory filter)."""
    per_request = model.memory_bytes_per_request or learned_bytes_per_request or 0.0
    return float(per_request) * max(1, batch_size)


def executing_at_scrape(signals: WorkerSignals) -> int | None:
    """Requests the worker was executing (holding memory) when scraped, as the gateway saw
    it: its in-flight then minus the worker's own queue; None when not recorded."""
    if signals.in_flight_at_scrape is None:
        return None
    return max(0, signals.in_flight_at_scrape - round(signals.pending()))


def live_free_bytes(free_bytes: float, need_bytes: float, executing_then: int | None,
                    in_flight_now: int, idle_free_bytes: float | None = None) -> float:
    """Free GPU memory now: the scraped free bytes, plus the footprint of the requests
    executing at the scrape, minus that of every request in flight now (all counted as
    executing — conservative: a request queued in the worker holds no memory yet). At most
    the free memory seen idle minus every request in flight now: a response still in
    transit at the scrape (a fast out-of-memory failure, typically) would otherwise count as
    executing then and let one request too many through until the next scrape."""
    free = free_bytes
    if executing_then is not None:
        free += need_bytes * (executing_then - in_flight_now)
    if idle_free_bytes is not None:
        free = min(free, idle_free_bytes - need_bytes * in_flight_now)
    return free


def has_memory_for(signals: WorkerSignals | None, need_bytes: float,
                   in_flight: int | None = None) -> bool:
    if need_bytes <= 0 or signals is None or not signals.gpus:
        return True
    free = signals.free_memory_bytes
    if in_flight is not None:
        free = live_free_bytes(free, need_bytes, executing_at_scrape(signals), in_flight,
                               signals.idle_free_bytes)
    return free >= need_bytes


def is_saturated(pending: float, in_flight: int, slots: int, saturation_queue: float) -> bool:
    """Saturated for pool spill-over: at the slot limit, or queued up past the threshold."""
    return in_flight >= slots or pending + in_flight >= saturation_queue * slots


def drop_reason(worker: WorkerSnapshot, key: ModelKey, *, in_flight: int | None = None,
                need_bytes: float = 0.0) -> str | None:
    """Why ``worker`` cannot take this request now (a ``DROP_*`` text), or None if it can."""
    if not worker.ready:
        return DROP_NOT_READY
    if not worker.has_model(key):
        return DROP_NO_MODEL
    if not worker.breaker_allows:
        return DROP_BREAKER
    if worker.stalled:
        return DROP_STALLED
    live = worker.in_flight if in_flight is None else in_flight
    if not has_memory_for(worker.signals, need_bytes, live):
        return DROP_MEMORY
    if live >= worker.slots:
        return DROP_SATURATED
    limit = worker.model_limits.get(key.name)
    if limit is not None and worker.in_flight_model >= limit:
        return DROP_SATURATED
    return None


def memory_score(signals: WorkerSignals | None) -> float:
    if signals is None or not signals.gpus:
        return NEUTRAL_SCORE
    total = signals.total_memory_bytes
    return min(1.0, signals.free_memory_bytes / total) if total > 0 else NEUTRAL_SCORE


def queue_score(pending: float, in_flight: int, slots: int) -> float:
    return 1.0 / (1.0 + max(0.0, pending + in_flight) / max(1, slots))


def latency_score(latency_s: float, fastest_s: float) -> float:
    if latency_s <= 0 or fastest_s <= 0:
        return NEUTRAL_SCORE
    return min(1.0, fastest_s / latency_s)


def expected_completion_s(service_s: float, ahead: float, capacity: int,
                          triton_queue_s: float = 0.0) -> float:
    """Expected completion time of one more request on a worker (module doc): one service
    time, plus the wait for the ``ahead`` requests to drain when they fill its capacity;
    Triton's measured queue time raises the wait by half of what it exceeds it by."""
    service_s = max(MIN_SERVICE_S, service_s)
    wait = service_s * max(0.0, (ahead + 1.0) / max(1, capacity) - 1.0)
    if triton_queue_s > wait:
        wait += (triton_queue_s - wait) / 2
    return service_s + wait


def expected_latency_score(expected_s: float, best_s: float) -> float:
    if expected_s <= 0 or best_s <= 0:
        return NEUTRAL_SCORE
    return min(1.0, best_s / expected_s)


# memory, queue, latency, expected latency — normalised to sum 1
Weights = tuple[float, float, float, float]


def normalised_weights(weights: WeightsConfig) -> Weights:
    total = weights.memory + weights.queue + weights.latency + weights.expected_latency
    if total <= 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (weights.memory / total, weights.queue / total, weights.latency / total,
            weights.expected_latency / total)


def combined_score(weights: Weights, memory: float, queue: float, latency: float,
                   expected: float = NEUTRAL_SCORE) -> float:
    return (weights[0] * memory + weights[1] * queue + weights[2] * latency
            + weights[3] * expected)


# ---------------------------------------------------------------- service times

@dataclass(frozen=True, slots=True)
class ServiceTimesStatistics:
    workers: int
    estimates: int      # (worker, model) pairs
    samples: int
    evicted: int


class ServiceTimes:
    """Peak-EWMA service time per (worker, model), fed by the shell with every successful
    request's latency and read by the router (module doc). Pure: time is an argument.

    Bounded: ``MAX_MODELS_PER_WORKER`` estimates per worker (the stalest is dropped),
    ``MAX_SERVICE_WORKERS`` workers (the oldest is dropped); :meth:`forget` a worker that
    left the fleet."""

    __slots__ = ("_by_worker", "_evicted", "_samples")

    def __init__(self) -> None:
        # worker -> model -> [estimate_s, time of the last sample]
        self._by_worker: dict[WorkerId, dict[str, list[float]]] = {}
        self._samples = 0
        self._evicted = 0

    def observe(self, worker: WorkerId, model: str, latency_s: float, now: float, *,
                in_flight: int = 0, capacity: int = 1) -> None:
        """One completed request: ``latency_s`` from send to response; ``in_flight`` = the
        other requests on the worker when it was sent (those ahead of it)."""
        if not latency_s >= 0.0 or latency_s == float("inf"):
            return
        sample = latency_s / max(1.0, (in_flight + 1) / max(1, capacity))
        self._samples += 1
        models = self._by_worker.get(worker)
        if models is None:
            if len(self._by_worker) >= MAX_SERVICE_WORKERS:
                del self._by_worker[next(iter(self._by_worker))]
                self._evicted += 1
            models = self._by_worker[worker] = {}
        cell = models.get(model)
        if cell is None:
            if len(models) >= MAX_MODELS_PER_WORKER:
                stalest = min(models, key=lambda m: models[m][1])
                del models[stalest]
                self._evicted += 1
            models[model] = [sample, now]
            return
        value, stamp = cell
        if sample >= value:
            cell[0] = sample   # peak: a slower sample counts at once
        else:
            w = math.exp(-max(0.0, now - stamp) / SERVICE_DECAY_S)
            cell[0] = value * w + sample * (1.0 - w)
        cell[1] = max(stamp, now)

    def estimate(self, worker: WorkerId, model: str, now: float, *,
                 probing: bool = False) -> float | None:
        """The service-time estimate now; None = cold (never measured). ``probing``: a
        request of the model is in flight there — no idle decay (module doc)."""
        models = self._by_worker.get(worker)
        if models is None:
            return None
        cell = models.get(model)
        if cell is None:
            return None
        value, stamp = cell
        if probing or now <= stamp:
            return value
        return value * math.exp(-(now - stamp) / IDLE_DECAY_S)

    def forget(self, worker: WorkerId) -> None:
        self._by_worker.pop(worker, None)

    def statistics(self) -> ServiceTimesStatistics:
        return ServiceTimesStatistics(len(self._by_worker),
                                      sum(len(m) for m in self._by_worker.values()),
                                      self._samples, self._evicted)

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<ServiceTimes workers={s.workers} estimates={s.estimates} samples={s.samples}>"


# ---------------------------------------------------------------- live load

class LoadSource(Protocol):
    """The gateway's live in-flight counts, owned by the shell."""

    def in_flight(self, worker: WorkerId) -> int: ...

    def in_flight_model(self, worker: WorkerId, model: str) -> int: ...


@dataclass(frozen=True, slots=True)
class InFlightStatistics:
    in_flight: int
    busy_workers: int
    begun: int
    ended: int


class InFlightCounters:
    """Live per-worker and per-(worker, model) in-flight counts; a :class:`LoadSource`.

    Bounded by the requests in flight: a count that returns to zero is deleted."""

    __slots__ = ("_begun", "_by_model", "_ended", "_total")

    def __init__(self) -> None:
        self._total: dict[WorkerId, int] = {}
        self._by_model: dict[tuple[WorkerId, str], int] = {}
        self._begun = 0
        self._ended = 0

    def begin(self, worker: WorkerId, model: str) -> None:
        self._total[worker] = self._total.get(worker, 0) + 1
        self._by_model[worker, model] = self._by_model.get((worker, model), 0) + 1
        self._begun += 1

    def end(self, worker: WorkerId, model: str) -> None:
        total = self._total.get(worker, 0)
        per_model = self._by_model.get((worker, model), 0)
        if total <= 0 or per_model <= 0:
            raise ValueError(f"end() without begin() for {worker} {model}")
        if total == 1:
            del self._total[worker]
        else:
            self._total[worker] = total - 1
        if per_model == 1:
            del self._by_model[worker, model]
        else:
            self._by_model[worker, model] = per_model - 1
        self._ended += 1

    def in_flight(self, worker: WorkerId) -> int:
        return self._total.get(worker, 0)

    def in_flight_model(self, worker: WorkerId, model: str) -> int:
        return self._by_model.get((worker, model), 0)

    def statistics(self) -> InFlightStatistics:
        return InFlightStatistics(self._begun - self._ended, len(self._total),
                                  self._begun, self._ended)

    def __repr__(self) -> str:
        return (f"<InFlightCounters in_flight={self._begun - self._ended} "
                f"busy_workers={len(self._total)}>")


# ---------------------------------------------------------------- the index

class _Entry:
    """One worker as the router sees it between rebuilds (figures precomputed)."""

    __slots__ = ("ahead_extra", "capacity", "executing_then", "free_bytes", "has_gpu", "id",
                 "idle_free", "in_flight", "in_flight_model", "latency_s", "memory_score",
                 "model_limits", "pending", "priority", "queue_time_s", "share", "slots",
                 "snapshot")

    def __init__(self, snapshot: WorkerSnapshot) -> None:
        self.refresh(snapshot)

    def refresh(self, s: WorkerSnapshot) -> None:
        sig = s.signals
        self.snapshot = s
        self.id = s.id
        self.priority = s.pool_priority
        self.slots = s.slots
        self.model_limits = s.model_limits
        self.in_flight = s.in_flight
        self.in_flight_model = s.in_flight_model
        self.pending = sig.pending() if sig is not None else 0.0
        self.has_gpu = sig is not None and sig.has_gpu
        self.free_bytes = sig.free_memory_bytes if sig is not None else 0.0
        executing = executing_at_scrape(sig) if sig is not None else None
        self.executing_then = -1 if executing is None else executing
        idle = sig.idle_free_bytes if sig is not None else None
        self.idle_free = -1.0 if idle is None else idle
        self.memory_score = memory_score(sig)
        self.latency_s = s.latency_ewma_s
        self.share = min(1.0, max(0.0, s.traffic_share))
        self.capacity = s.capacity_units if s.capacity_units > 0 else max(1, s.slots)
        # The worker's queue the gateway did not send (other clients): work ahead beyond
        # the gateway's own in-flight. Without the in-flight at the scrape, all of it.
        self.ahead_extra = (self.pending if sig is None or sig.in_flight_at_scrape is None
                            else max(0.0, self.pending - sig.in_flight_at_scrape))
        # Triton's queue time per model where it queued at all (usually empty).
        self.queue_time_s = ({m: v.queue_time_s for m, v in sig.models.items()
                              if v.queue_time_s > 0} if sig is not None else {})


def _plain_models(s: WorkerSnapshot) -> frozenset[str]:
    return frozenset(m for m in s.models_ready if "/" not in m)


def _index_key(s: WorkerSnapshot) -> tuple[bool, str, frozenset[str], int]:
    reason = (DROP_NOT_READY if not s.ready else DROP_BREAKER if not s.breaker_allows
              else DROP_STALLED if s.stalled else "")
    return (not reason, reason, _plain_models(s), s.pool_priority)


Level = tuple[int, list[_Entry]]


@dataclass(frozen=True, slots=True)
class TableStatistics:
    workers: int
    models: int
    indexed: int      # (worker, model) pairs routable
    sidelined: int    # (worker, model) pairs held back: not ready or breaker open


class RoutingTable:
    """Per-model lists of statically eligible workers, by pool priority (see module doc).

    Models are indexed by the plain names in ``models_ready`` (types.py: a worker lists
    ``name`` beside any ``name/<version>``); versions are checked per decision."""

    __slots__ = ("_entries", "_index", "_keys", "_levels", "_sidelined")

    def __init__(self, snapshots: Iterable[WorkerSnapshot] = ()) -> None:
        self._entries: dict[WorkerId, _Entry] = {}
        self._keys: dict[WorkerId, tuple[bool, str, frozenset[str], int]] = {}
        self._index: dict[str, dict[int, list[_Entry]]] = {}
        self._levels: dict[str, tuple[Level, ...]] = {}
        self._sidelined: dict[str, dict[WorkerId, str]] = {}
        for s in snapshots:
            self.update(s)

    def update(self, snapshot: WorkerSnapshot) -> None:
        """Add or refresh one worker: O(1) if only its signals/counters changed."""
        key = _index_key(snapshot)
        entry = self._entries.get(snapshot.id)
        if entry is not None and self._keys[snapshot.id] == key:
            entry.refresh(snapshot)
            return
        if entry is not None:
            self._unindex(entry)
        entry = _Entry(snapshot)
        self._entries[snapshot.id] = entry
        self._keys[snapshot.id] = key
        eligible, reason, models, priority = key
        for name in models:
            if eligible:
                levels = self._index.setdefault(name, {})
                if priority not in levels:
                    levels[priority] = []
                    self._levels.pop(name, None)
                levels[priority].append(entry)
            else:
                self._sidelined.setdefault(name, {})[snapshot.id] = reason

    def remove(self, worker: WorkerId) -> bool:
        entry = self._entries.pop(worker, None)
        if entry is None:
            return False
        self._unindex(entry)
        del self._keys[worker]
        return True

    def _unindex(self, entry: _Entry) -> None:
        eligible, _, models, priority = self._keys[entry.id]
        for name in models:
            if not eligible:
                held = self._sidelined[name]
                del held[entry.id]
                if not held:
                    del self._sidelined[name]
                continue
            levels = self._index[name]
            level = levels[priority]
            level.remove(entry)
            if not level:
                del levels[priority]
                self._levels.pop(name, None)
                if not levels:
                    del self._index[name]

    def _levels_for(self, name: str) -> tuple[Level, ...]:
        cached = self._levels.get(name)
        if cached is None:
            levels = self._index.get(name)
            if not levels:
                return ()
            cached = tuple(sorted(levels.items()))
            self._levels[name] = cached
        return cached

    def _why_absent(self, key: ModelKey) -> str:
        held = self._sidelined.get(key.name)
        if not held:
            return f"no worker serves model {key}"
        counts: dict[str, int] = {}
        for reason in held.values():
            counts[reason] = counts.get(reason, 0) + 1
        detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
        return f"no worker can serve model {key}: {detail}"

    def snapshot(self, worker: WorkerId) -> WorkerSnapshot | None:
        entry = self._entries.get(worker)
        return entry.snapshot if entry is not None else None

    def models(self) -> frozenset[str]:
        return frozenset(self._index)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, worker: object) -> bool:
        return worker in self._entries

    def statistics(self) -> TableStatistics:
        indexed = sum(len(lv) for levels in self._index.values() for lv in levels.values())
        sidelined = sum(len(h) for h in self._sidelined.values())
        return TableStatistics(len(self._entries), len(self._index), indexed, sidelined)

    def __repr__(self) -> str:
        return f"<RoutingTable workers={len(self._entries)} models={len(self._index)}>"


# ---------------------------------------------------------------- the decision

_OK, _BUSY, _FULL, _NO_MEMORY, _NO_VERSION = range(5)


class _Query:
    """One decision's inputs, gathered once."""

    __slots__ = ("exclude", "key", "load", "name", "need_bytes", "now", "queue_wait_s",
                 "saturation_queue", "service", "versioned", "weights")

    def __init__(self, key: ModelKey, load: LoadSource | None, need_bytes: float,
                 saturation_queue: float, weights: Weights,
                 exclude: AbstractSet[WorkerId] = frozenset(),
                 service: ServiceTimes | None = None, now: float = 0.0,
                 queue_wait_s: float = 0.0) -> None:
        self.exclude = exclude
        self.service = service
        self.now = now
        self.queue_wait_s = queue_wait_s
        self.key = key
        self.name = key.name
        self.versioned = bool(key.version)
        self.load = load
        self.need_bytes = need_bytes
        self.saturation_queue = saturation_queue
        self.weights = weights


def _classify(e: _Entry, q: _Query, in_flight: int) -> int:
    if q.exclude and e.id in q.exclude:
        return _NO_VERSION  # filtered like a worker without the model
    if q.versioned and not e.snapshot.has_model(q.key):
        return _NO_VERSION
    if q.need_bytes > 0 and e.has_gpu:
        free = e.free_bytes if e.executing_then < 0 else (
            e.free_bytes + q.need_bytes * (e.executing_then - in_flight))
        if e.idle_free >= 0:
            free = min(free, e.idle_free - q.need_bytes * in_flight)
        if free < q.need_bytes:
            return _NO_MEMORY
    if in_flight >= e.slots:
        return _FULL
    if e.model_limits:
        limit = e.model_limits.get(q.name)
        if limit is not None and (e.in_flight_model if q.load is None else
                                  q.load.in_flight_model(e.id, q.name)) >= limit:
            return _FULL
    if e.pending + in_flight >= q.saturation_queue * e.slots:
        return _BUSY
    return _OK


def _expected_on(e: _Entry, service_s: float, in_flight: int, model: str,
                 queue_wait_s: float) -> float:
    """:func:`expected_completion_s` over a table entry (the decision's hot path), plus
    the shell's queue wait where every execution unit is busy."""
    ahead = in_flight + e.ahead_extra
    rounds = (ahead + 1.0) / e.capacity
    wait = service_s * (rounds - 1.0) if rounds > 1.0 else 0.0
    if ahead >= e.capacity:
        wait += queue_wait_s
    if e.queue_time_s:
        triton = e.queue_time_s.get(model, 0.0)
        if triton > wait:
            wait += (triton - wait) / 2
    return service_s + wait


_Pick = tuple[_Entry, int, str, float]  # worker, its in-flight, reason, score (-1: unscored)


class _Tally:
    """What the scanned levels held back, for spill-over and the NoRoute reason."""

    __slots__ = ("busy", "busy_in_flight", "full", "no_memory", "no_version", "waitable")

    def __init__(self) -> None:
        self.busy: list[_Entry] = []
        self.busy_in_flight: list[int] = []
        self.full = 0
        self.no_memory = 0
        self.no_version = 0
        # Workers met full (or short of memory) — places a request could wait for: their
        # in-flight, up to MAX_WAITABLE of them (see Router._defer).
        self.waitable: list[tuple[_Entry, int]] = []

    def reject(self, verdict: int) -> None:
        """Count a worker a filter held back (full, short of memory, or without the model)."""
        if verdict == _FULL:
            self.full += 1
        elif verdict == _NO_MEMORY:
            self.no_memory += 1
        else:
            self.no_version += 1


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    policy: str
    picker: str
    decisions: int
    routed: int
    refused: int
    refused_saturated: int
    spilled: int            # routed below the most preferred pool level
    queue_fallbacks: int    # every level saturated by queue; least loaded below slots
    sticky: int
    packed: int
    scan_fallbacks: int     # P2C draws found nothing; the level was scanned
    deferred: int           # NoRoute(saturated) to wait for a faster worker's slot


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


class Router:
    """Makes routing decisions over a :class:`RoutingTable` (see the module doc)."""

    __slots__ = ("_config", "_counts", "_k", "_model_need", "_model_weights",
                 "_p2c", "_pack", "_pack_targets", "_policy", "_rng", "_rr", "_weights")

    def __init__(self, config: RoutingConfig, models: Mapping[str, ModelConfig] | None = None,
                 *, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._policy = config.policy
        self._p2c = config.picker == "p2c"
        self._k = max(1, config.choices)
        self._pack = config.pack
        self._weights = normalised_weights(config.weights)
        models = models or {}
        self._model_weights = {name: normalised_weights(m.weights)
                               for name, m in models.items() if m.weights is not None}
        self._model_need = {name: float(m.memory_bytes_per_request)
                            for name, m in models.items() if m.memory_bytes_per_request}
        # Bounded by the model names of the table: set only after a successful lookup.
        self._rr: dict[str, int] = {}
        self._pack_targets: dict[str, WorkerId] = {}
        self._counts = dict.fromkeys(
            ("decisions", "routed", "refused", "refused_saturated", "spilled",
             "queue_fallbacks", "sticky", "packed", "scan_fallbacks", "deferred"), 0)

    # -- public

    def decide(self, table: RoutingTable, key: ModelKey, load: LoadSource | None = None, *,
               batch_size: int = 1, learned_bytes_per_request: float | None = None,
               sticky: WorkerId | None = None,
               exclude: AbstractSet[WorkerId] = frozenset(),
               service: ServiceTimes | None = None, now: float = 0.0,
               queue_wait_s: float = 0.0, defer: bool = True) -> Decision:
        """Route one request for ``key``; ``load`` gives live in-flight counts (module doc).
        ``defer`` False: never wait for a faster worker (the shell's queue refused to hold
        the request).
        ``exclude``: workers that already failed this request (a retry goes elsewhere).
        ``service``: the measured service times, read at ``now`` (expected-latency scorer;
        without it the snapshots' latency EWMA stands in). ``queue_wait_s``: how long the
        shell's own waiters for the model take to drain, added where every execution unit
        is busy."""
        counts = self._counts
        counts["decisions"] += 1
        levels = table._levels_for(key.name)
        if not levels:
            return self._refuse(table._why_absent(key), saturated=False)
        per_request = self._model_need.get(key.name) or learned_bytes_per_request or 0.0
        need = per_request * batch_size if batch_size > 1 else per_request
        q = _Query(key, load, need, self._config.saturation_queue,
                   self._model_weights.get(key.name, self._weights), exclude, service, now,
                   queue_wait_s)
        if sticky is not None:
            routed = self._sticky(table, sticky, q)
            if routed is not None:
                return routed
        tally = _Tally()
        for depth, (priority, level) in enumerate(levels):
            picked = self._pick_level(table, priority, level, q, tally,
                                      depth == len(levels) - 1)
            if picked is not None:
                entry, in_flight, reason, score = picked
                if tally.waitable and defer:
                    deferred = self._defer(entry, in_flight, q, tally)
                    if deferred is not None:
                        return deferred
                if depth:
                    counts["spilled"] += 1
                    reason += f"; spilled to pool priority {priority}, preferred pools saturated"
                return self._route(entry, in_flight, q, reason, score)
        if tally.busy:
            counts["queue_fallbacks"] += 1
            entry, in_flight, _, score = self._choose(tally.busy, tally.busy_in_flight, q, "")
            deferred = (self._defer(entry, in_flight, q, tally) if tally.waitable and defer
                        else None)
            if deferred is not None:
                return deferred
            return self._route(entry, in_flight, q, "every pool saturated by queue; least "
                               "loaded worker below its slot limit", score)
        return self._refuse_from(tally, q)

    def statistics(self) -> RouterStatistics:
        c = self._counts
        return RouterStatistics(self._policy, self._config.picker, c["decisions"], c["routed"],
                                c["refused"], c["refused_saturated"], c["spilled"],
                                c["queue_fallbacks"], c["sticky"], c["packed"],
                                c["scan_fallbacks"], c["deferred"])

    def __repr__(self) -> str:
        c = self._counts
        return (f"<Router policy={self._policy} picker={self._config.picker} k={self._k} "
                f"pack={self._pack} decisions={c['decisions']} routed={c['routed']} "
                f"refused={c['refused']}>")

    # -- levels

    def _pick_level(self, table: RoutingTable, priority: int, level: list[_Entry], q: _Query,
                    tally: _Tally, last: bool) -> _Pick | None:
        policy = self._policy
        if policy == "round_robin":
            return self._round_robin(level, q, tally)
        if policy == "least_inflight":
            how = "least in-flight"
        elif policy == "random":
            how = "random"
        else:
            how = "p2c" if self._p2c else "full scan"
        sampled = policy == "random" or (policy == "load_aware" and self._p2c)
        if sampled:
            if self._pack and policy == "load_aware":
                packed = self._pack_target(table, priority, q)
                if packed is not None:
                    return packed
            k = 1 if policy == "random" else self._k
            if len(level) > k:
                ok, ok_in_flight, busy, busy_in_flight = self._sample(level, q, k, tally)
                if ok:
                    return self._choose(ok, ok_in_flight, q, how)
                if busy and last and not tally.busy:
                    # Nowhere left to spill: queued-up workers drawn will do (see decide).
                    tally.busy, tally.busy_in_flight = busy, busy_in_flight
                    return None
                self._counts["scan_fallbacks"] += 1
        ok, ok_in_flight = self._scan(level, q, tally)
        if not ok:
            return None
        return self._choose(ok, ok_in_flight, q, how)

    def _sample(self, level: list[_Entry], q: _Query, k: int,
                tally: _Tally) -> tuple[list[_Entry], list[int], list[_Entry], list[int]]:
        """Up to k distinct fit, unsaturated candidates from a bounded number of draws, and
        up to k fit ones saturated by queue only (below their slots) met on the way; full
        ones met go to ``tally.waitable``."""
        rnd = self._rng.random
        load = q.load
        n = len(level)
        enough = max(MIN_DRAWS, DRAWS_PER_CHOICE * k)
        ok: list[_Entry] = []
        ok_in_flight: list[int] = []
        busy: list[_Entry] = []
        busy_in_flight: list[int] = []
        for draw in range(max(enough, MAX_DRAWS)):
            if ok and draw >= enough:
                break
            e = level[int(rnd() * n)]
            if (e.share < 1.0 and rnd() >= e.share) or e in ok:
                continue
            in_flight = e.in_flight if load is None else load.in_flight(e.id)
            verdict = _classify(e, q, in_flight)
            if verdict == _OK:
                ok.append(e)
                ok_in_flight.append(in_flight)
                if len(ok) == k:
                    break
            elif verdict == _BUSY and len(busy) < k and e not in busy:
                busy.append(e)
                busy_in_flight.append(in_flight)
            elif verdict in (_FULL, _NO_MEMORY) and len(tally.waitable) < MAX_WAITABLE:
                tally.waitable.append((e, in_flight))
        return ok, ok_in_flight, busy, busy_in_flight

    def _scan(self, level: list[_Entry], q: _Query,
              tally: _Tally) -> tuple[list[_Entry], list[int]]:
        """Every fit, unsaturated worker of the level (slow-start thinned, never to none)."""
        rnd = self._rng.random
        load = q.load
        ok: list[_Entry] = []
        ok_in_flight: list[int] = []
        thinned: list[_Entry] = []
        thinned_in_flight: list[int] = []
        first_busy = not tally.busy
        for e in level:
            in_flight = e.in_flight if load is None else load.in_flight(e.id)
            verdict = _classify(e, q, in_flight)
            if verdict == _OK:
                if e.share < 1.0 and rnd() >= e.share:
                    thinned.append(e)
                    thinned_in_flight.append(in_flight)
                else:
                    ok.append(e)
                    ok_in_flight.append(in_flight)
            elif verdict == _BUSY:
                if first_busy:  # the queue fallback stays in the most preferred level
                    tally.busy.append(e)
                    tally.busy_in_flight.append(in_flight)
            else:
                tally.reject(verdict)
                if verdict in (_FULL, _NO_MEMORY) and len(tally.waitable) < MAX_WAITABLE:
                    tally.waitable.append((e, in_flight))
        if ok:
            return ok, ok_in_flight
        return thinned, thinned_in_flight

    def _round_robin(self, level: list[_Entry], q: _Query,
                     tally: _Tally) -> _Pick | None:
        load = q.load
        n = len(level)
        start = self._rr.get(q.name, 0)
        for i in range(n):
            e = level[(start + i) % n]
            in_flight = e.in_flight if load is None else load.in_flight(e.id)
            verdict = _classify(e, q, in_flight)
            if verdict == _OK:
                self._rr[q.name] = (start + i + 1) % n
                return e, in_flight, "round robin", -1.0
            if verdict == _BUSY:
                if not tally.busy or tally.busy[0].priority == e.priority:
                    tally.busy.append(e)
                    tally.busy_in_flight.append(in_flight)
            else:
                tally.reject(verdict)
        return None

    # -- choosing among fit candidates

    def _model_in_flight(self, e: _Entry, q: _Query) -> int:
        return e.in_flight_model if q.load is None else q.load.in_flight_model(e.id, q.name)

    def _pack_target(self, table: RoutingTable, priority: int,
                     q: _Query) -> _Pick | None:
        target = self._pack_targets.get(q.name)
        if target is None:
            return None
        e = table._entries.get(target)
        if e is None or e.priority != priority:
            return None
        eligible, _, models, _ = table._keys[target]
        if not eligible or q.name not in models:
            return None
        in_flight = e.in_flight if q.load is None else q.load.in_flight(e.id)
        if _classify(e, q, in_flight) != _OK:
            return None
        running = self._model_in_flight(e, q)
        if running <= 0:
            return None
        return e, in_flight, f"pack: already running {q.key} ({running} in flight)", -1.0

    def _choose(self, ok: list[_Entry], ok_in_flight: list[int], q: _Query,
                how: str) -> _Pick:
        rnd = self._rng.random
        policy = self._policy
        if policy == "random":
            i = int(rnd() * len(ok))
            return ok[i], ok_in_flight[i], how, -1.0
        if policy == "least_inflight":
            best_i, ties = 0, 0
            least = min(ok_in_flight)
            for i, in_flight in enumerate(ok_in_flight):
                if in_flight == least:
                    ties += 1
                    if rnd() * ties < 1.0:
                        best_i = i
            return (ok[best_i], ok_in_flight[best_i], f"{how} ({least} of {ok[best_i].slots})",
                    -1.0)
        candidates = range(len(ok))
        if self._pack:
            running = [self._model_in_flight(e, q) for e in ok]
            packable = [i for i in candidates if running[i] > 0]
            if packable:
                if not self._p2c:
                    most = max(running[i] for i in packable)
                    packable = [i for i in packable if running[i] == most]
                i, score = self._best(ok, ok_in_flight, q, packable)
                return ok[i], ok_in_flight[i], (f"pack: already running {q.key} "
                                                f"({running[i]} in flight)"), score
        i, score = self._best(ok, ok_in_flight, q, candidates)
        return ok[i], ok_in_flight[i], f"{how}: best of {len(ok)}", score

    def _best(self, ok: list[_Entry], ok_in_flight: list[int], q: _Query,
              indices: Iterable[int]) -> tuple[int, float]:
        """Index and score of the best among ``indices``; ties broken at random."""
        rnd = self._rng.random
        wm, wq, wl, we = q.weights
        fastest = min((e.latency_s for e in ok if e.latency_s > 0), default=0.0) if wl else 0.0
        idx = indices if isinstance(indices, list) else list(indices)
        expected = self._expected(ok, ok_in_flight, q, idx) if we else None
        best_expected = min(expected) if expected else 0.0
        best_i, best, ties = -1, -1.0, 0
        for j, i in enumerate(idx):
            e = ok[i]
            score = wm * e.memory_score + wq * queue_score(e.pending, ok_in_flight[i], e.slots)
            if wl:
                score += wl * latency_score(e.latency_s, fastest)
            if expected is not None:
                score += we * min(1.0, best_expected / expected[j])
            if score > best:
                best_i, best, ties = i, score, 1
            elif score == best:
                ties += 1
                if rnd() * ties < 1.0:
                    best_i = i
        return best_i, best

    def _expected(self, ok: list[_Entry], ok_in_flight: list[int], q: _Query,
                  idx: list[int]) -> list[float]:
        """Expected completion time of this request on each candidate of ``idx``, in order
        (module doc). Runs on every decision: ``ServiceTimes.estimate`` is inlined."""
        service, now, name, load = q.service, q.now, q.name, q.load
        by_worker = service._by_worker if service is not None else None
        out: list[float] = []
        cold: list[int] = []            # positions of candidates never measured
        fastest = math.inf
        for j, i in enumerate(idx):
            e = ok[i]
            running = (e.in_flight_model if load is None
                       else load.in_flight_model(e.id, name)) > 0
            s = -1.0
            if by_worker is not None:
                models = by_worker.get(e.id)
                cell = models.get(name) if models is not None else None
                if cell is not None:
                    s, stamp = cell
                    if not running and now > stamp:
                        s *= math.exp((stamp - now) / IDLE_DECAY_S)
                    s = s if s > MIN_SERVICE_S else MIN_SERVICE_S
            elif e.latency_s > 0:
                s = e.latency_s
            if s < 0:
                cold.append(j)
                out.append(-1.0 if running else -2.0)
                continue
            if s < fastest:
                fastest = s
            out.append(_expected_on(e, s, ok_in_flight[i], name, q.queue_wait_s))
        if cold:
            reference = 1.0 if fastest == math.inf else fastest
            for j in cold:
                s = reference * PROBE_PENALTY if out[j] == -1.0 else reference
                out[j] = _expected_on(ok[idx[j]], s, ok_in_flight[idx[j]], name,
                                       q.queue_wait_s)
        return out

    # -- waiting for a faster worker

    def _defer(self, e: _Entry, in_flight: int, q: _Query, tally: _Tally) -> NoRoute | None:
        """``NoRoute(saturated=True)`` when waiting in the shell's queue for a slot of a
        faster, full worker met by this decision is expected to finish clearly sooner than
        ``e``, the best free candidate (module doc, "Waiting for a faster worker"); else
        None. Runs only when the decision met a full worker: O(MAX_WAITABLE)."""
        if q.service is None or q.weights[3] <= 0 or self._policy != "load_aware" \
                or self._pack:
            return None
        by_worker = q.service._by_worker
        now, name, load = q.now, q.name, q.load
        running = (e.in_flight_model if load is None else load.in_flight_model(e.id, name)) > 0
        s = q.service.estimate(e.id, name, now, probing=running)
        if s is None:
            return None  # a cold candidate is a probe: send it
        free_s = _expected_on(e, max(MIN_SERVICE_S, s), in_flight, name, q.queue_wait_s)
        best_s, best = free_s / DEFER_RATIO, None
        for f, f_in_flight in tally.waitable:
            if f.priority != e.priority:
                continue  # pools: spill-over is the operator's rule, not deferred
            if (f.in_flight_model if load is None else load.in_flight_model(f.id, name)) <= 0:
                continue  # full of other models: its completions free no slot for this one
            f_cell = by_worker.get(f.id, {}).get(name)
            if f_cell is None:
                continue
            f_s, f_stamp = f_cell
            if now - f_stamp > DEFER_DRAIN_FACTOR * f_s:
                continue  # not seen completing lately: stalled, or its estimate is stale
            executing = max(1, min(f_in_flight, f.capacity))
            rounds = max((f_in_flight + f.ahead_extra + 1.0) / f.capacity, 1.0 + 1.0 / executing)
            wait_s = f_s * rounds + DEFER_QUEUE_WEIGHT * q.queue_wait_s
            if wait_s < best_s:
                best_s, best = wait_s, f
        if best is None:
            return None
        self._counts["deferred"] += 1
        refused = self._refuse(f"deferred: {best.id} is expected to answer in "
                               f"{best_s * 1000:.0f} ms after a wait for its slot, {e.id} "
                               f"(free) in {free_s * 1000:.0f} ms", saturated=True)
        return NoRoute(refused.reason, saturated=True, deferred=True)

    # -- outcomes

    def _sticky(self, table: RoutingTable, worker: WorkerId, q: _Query) -> Route | None:
        e = table._entries.get(worker)
        if e is None:
            return None
        eligible, _, models, _ = table._keys[worker]
        if not eligible or q.name not in models:
            return None
        in_flight = e.in_flight if q.load is None else q.load.in_flight(e.id)
        if _classify(e, q, in_flight) not in (_OK, _BUSY):
            return None
        self._counts["sticky"] += 1
        return self._route(e, in_flight, q, "sticky: the sequence's worker is still eligible")

    def _route(self, e: _Entry, in_flight: int, q: _Query, reason: str,
               score: float = -1.0) -> Route:
        counts = self._counts
        counts["routed"] += 1
        if self._pack:
            self._pack_targets[q.name] = e.id
            if reason.startswith("pack"):
                counts["packed"] += 1
        if score < 0:  # not scored by a picker: latency judged against itself
            score = combined_score(q.weights, e.memory_score,
                                   queue_score(e.pending, in_flight, e.slots),
                                   latency_score(e.latency_s, e.latency_s), 1.0)
        return Route(e.id, reason, score)

    def _refuse(self, reason: str, saturated: bool) -> NoRoute:
        self._counts["refused"] += 1
        if saturated:
            self._counts["refused_saturated"] += 1
        return NoRoute(reason, saturated)

    def _refuse_from(self, tally: _Tally, q: _Query) -> NoRoute:
        if tally.full:
            extra = (f"; {tally.no_memory} more lack {_mib(q.need_bytes)} free GPU memory"
                     if tally.no_memory else "")
            return self._refuse(f"all {tally.full} eligible workers for {q.key} are at their "
                                f"slot limit{extra}", saturated=True)
        if tally.no_memory:
            return self._refuse(f"no worker serving {q.key} has {_mib(q.need_bytes)} of free "
                                f"GPU memory ({tally.no_memory} checked)", saturated=False)
        return self._refuse(f"model {q.key} is not ready on any worker", saturated=False)


def route(snapshots: Iterable[WorkerSnapshot], key: ModelKey, config: RoutingConfig, *,
          rng: random.Random, models: Mapping[str, ModelConfig] | None = None,
          load: LoadSource | None = None, batch_size: int = 1,
          learned_bytes_per_request: float | None = None,
          sticky: WorkerId | None = None, service: ServiceTimes | None = None,
          now: float = 0.0) -> Decision:
    """One-shot decision over a list of snapshots (builds a table; for tests and tools)."""
    return Router(config, models, rng=rng).decide(
        RoutingTable(snapshots), key, load, batch_size=batch_size,
        learned_bytes_per_request=learned_bytes_per_request, sticky=sticky,
        service=service, now=now)
