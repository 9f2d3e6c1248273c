"""Worker lifecycle and the registry of workers the gateway routes to.

Lifecycle, as an enum plus a transition table (illegal transitions raise):

    JOINING ──probe ok ×rise──▶ SERVING ──probe fail ×fall──▶ DOWN ──probe ok ×rise──▶ SERVING
       │                          │                              │
       └────────── removed from config or DNS ──▶ DRAINING ──in-flight reaches 0──▶ GONE

* A worker joins when it appears in the config or in DNS, and serves only after ``rise``
  consecutive successful probes; slow start (see ``gateway.core.breaker``) then ramps its share.
* ``fall`` consecutive failed probes take it out of routing (DOWN); requests in flight on it
  are not touched — they finish or fail on their own.
* A worker removed from the config or DNS is DRAINING: no new requests, in-flight ones finish,
  then it is GONE and its connections are closed. Removal never drops an in-flight request.

The registry is shell state (mutable counters updated on every dispatch and completion); the
router reads immutable :class:`~gateway.core.types.WorkerSnapshot` values made from it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.core.concurrency import ModelCapacity
from gateway.core.types import ModelKey, WorkerId, WorkerSignals, WorkerSnapshot
from gateway.fleet.upstream import Pool, PoolLimits


class State(enum.Enum):
    JOINING = "joining"
    SERVING = "serving"
    DOWN = "down"
    DRAINING = "draining"
    GONE = "gone"


class Event(enum.Enum):
    RISE = "rise"          # `rise` consecutive successful probes
    FALL = "fall"          # `fall` consecutive failed probes
    REMOVE = "remove"      # gone from config / DNS
    DRAINED = "drained"    # no request in flight any more


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.JOINING, Event.RISE): State.SERVING,
    (State.JOINING, Event.FALL): State.DOWN,
    (State.JOINING, Event.REMOVE): State.DRAINING,
    (State.SERVING, Event.FALL): State.DOWN,
    (State.SERVING, Event.REMOVE): State.DRAINING,
    (State.DOWN, Event.RISE): State.SERVING,
    (State.DOWN, Event.REMOVE): State.DRAINING,
    (State.DRAINING, Event.DRAINED): State.GONE,
}


class IllegalTransition(RuntimeError):
    pass


def transition(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.value}") from None


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    state: State
    changed: bool
    ok_streak: int
    fail_streak: int


def after_probe(state: State, ok: bool, ok_streak: int, fail_streak: int,
                rise: int, fall: int) -> ProbeOutcome:
    """Pure rise/fall bookkeeping for one probe result."""
    ok_streak, fail_streak = (ok_streak + 1, 0) if ok else (0, fail_streak + 1)
    new = state
    if state in (State.JOINING, State.DOWN) and ok and ok_streak >= rise:
        new = transition(state, Event.RISE)
    elif state in (State.JOINING, State.SERVING) and not ok and fail_streak >= fall:
        new = transition(state, Event.FALL)
    return ProbeOutcome(new, new is not state, ok_streak, fail_streak)


def worker_id(url: str) -> WorkerId:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 8000}"


class Worker:
    """Shell-side state of one worker; mutated only by the event loop's thread."""

    __slots__ = (
        "_busy_mark",
        "busy_s_by_model",
        "configured_slots",
        "derived_slots",
        "derived_units",
        "fail_streak",
        "host",
        "id",
        "idle_free_bytes",
        "in_flight",
        "in_flight_by_model",
        "latency_ewma_s",
        "metrics_path",
        "metrics_pool",
        "model_capacity",
        "models_ready",
        "name",
        "ok_streak",
        "passes_timeout",
        "pool",
        "pool_name",
        "pool_priority",
        "port",
        "priority_levels",
        "raw_metrics",
        "raw_metrics_at",
        "scrape_errors",
        "serving_since",
        "signals",
        "slots",
        "state",
        "stateful_models",
        "url",
    )

    def __init__(self, url: str, metrics_url: str, *, pool_name: str, pool_priority: int,
                 slots: int, limits: PoolLimits, name: str | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 8000
        self.id: WorkerId = worker_id(url)
        self.name = name or self.id
        m = urlsplit(metrics_url)
        self.metrics_path = (m.path or "/metrics") + (f"?{m.query}" if m.query else "")
        self.pool = Pool(self.host, self.port, limits)
        self.metrics_pool = Pool(m.hostname or self.host, m.port or 8002,
                                 PoolLimits(max_connections=1,
                                            connect_timeout_s=limits.connect_timeout_s,
                                            read_timeout_s=limits.read_timeout_s))
        self.pool_name = pool_name
        self.pool_priority = pool_priority
        self.slots = slots
        self.configured_slots: int | None = None
        self.derived_slots: int | None = None
        # What the worker can execute at once, learned from its models' configs: Σ instances
        # (× max_batch_size where Triton's dynamic batcher merges requests). None: unknown.
        self.derived_units: int | None = None
        # Per model, what its config says it executes at once (gateway.core.concurrency); empty
        # while unknown, or where the operator set the worker's slots.
        self.model_capacity: dict[str, ModelCapacity] = {}
        # Models whose config lets a request set Triton's ``timeout`` (schedule policy):
        # the dispatcher passes each request's remaining time on to them.
        self.passes_timeout: frozenset[str] = frozenset()
        # Models with Triton priority levels: the request's class goes on as ``priority``.
        self.priority_levels: dict[str, int] = {}
        # Models whose config has sequence_batching (stateful): never sent twice.
        self.stateful_models: frozenset[str] = frozenset()
        self.state = State.JOINING
        self.ok_streak = 0
        self.fail_streak = 0
        self.in_flight = 0
        self.in_flight_by_model: dict[str, int] = {}
        # In-flight request-seconds per model, integrated as counts change (utilisation as a
        # time average, the same figure in every replica that adds the others' integrals).
        self.busy_s_by_model: dict[str, float] = {}
        self._busy_mark: dict[str, float] = {}
        self.models_ready: frozenset[str] = frozenset()
        self.signals: WorkerSignals | None = None
        self.raw_metrics: object | None = None
        self.raw_metrics_at: float | None = None
        self.scrape_errors = 0
        self.idle_free_bytes: float | None = None
        self.latency_ewma_s = 0.0
        self.serving_since: float | None = None

    @property
    def capacity_units(self) -> int:
        """Requests the worker executes at once (utilisation's denominator): learned from
        its models, or the slot limit when the operator set one or nothing was learned."""
        if self.configured_slots is None and self.derived_units:
            return self.derived_units
        return max(1, self.slots)

    def __repr__(self) -> str:
        return (f"<Worker {self.id} {self.state.value} in_flight={self.in_flight}/{self.slots} "
                f"models={len(self.models_ready)}>")

    @property
    def is_routable(self) -> bool:
        return self.state is State.SERVING

    def _integrate(self, model: str, now: float) -> None:
        n = self.in_flight_by_model.get(model, 0)
        if n:
            self.busy_s_by_model[model] = self.busy_s_by_model.get(model, 0.0) + n * (
                now - self._busy_mark.get(model, now))
        elif model not in self.busy_s_by_model and len(self.busy_s_by_model) < 256:
            self.busy_s_by_model[model] = 0.0
        self._busy_mark[model] = now

    def busy_seconds(self) -> dict[str, float]:
        """In-flight request-seconds per model since the worker was added, up to now."""
        now = time.monotonic()
        for model in list(self.in_flight_by_model):
            self._integrate(model, now)
        return self.busy_s_by_model

    def begin(self, model: str) -> None:
        if model in self._busy_mark or len(self._busy_mark) < 256:
            self._integrate(model, time.monotonic())
        self.in_flight += 1
        self.in_flight_by_model[model] = self.in_flight_by_model.get(model, 0) + 1

    def end(self, model: str, latency_s: float | None = None) -> None:
        if model in self._busy_mark:
            self._integrate(model, time.monotonic())
        self.in_flight -= 1
        n = self.in_flight_by_model.get(model, 0) - 1
        if n > 0:
            self.in_flight_by_model[model] = n
        else:
            self.in_flight_by_model.pop(model, None)
        if latency_s is not None:
            self.latency_ewma_s = (latency_s if self.latency_ewma_s == 0.0
                                   else 0.8 * self.latency_ewma_s + 0.2 * latency_s)

    def fresh_signals(self, now: float, stale_after_s: float) -> WorkerSignals | None:
        s = self.signals
        if s is None or now - s.scraped_at > stale_after_s:
            return None
        return s

    def snapshot(self, key: ModelKey, now: float, stale_after_s: float, *,
                 breaker_allows: bool = True, traffic_share: float = 1.0,
                 stalled: bool = False) -> WorkerSnapshot:
        return WorkerSnapshot(
            id=self.id,
            pool_priority=self.pool_priority,
            ready=self.is_routable,
            models_ready=self.models_ready,
            slots=self.slots,
            in_flight=self.in_flight,
            in_flight_model=self.in_flight_by_model.get(key.name, 0),
            signals=self.fresh_signals(now, stale_after_s),
            breaker_allows=breaker_allows,
            traffic_share=traffic_share,
            stalled=stalled,
            latency_ewma_s=self.latency_ewma_s,
            capacity_units=self.capacity_units,
        )
