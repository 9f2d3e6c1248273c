"""Per-worker circuit breakers, slow start and latency-outlier ejection (pure, ``now`` in).

The rules
---------
Each worker has a breaker in one of three states::

    CLOSED ──TRIP──▶ OPEN ──COOLED──▶ HALF_OPEN ──PROBES_PASSED──▶ CLOSED
                       ▲                  │
                       └───PROBE_FAILED───┘

* CLOSED: every request is allowed. The breaker TRIPs on ``consecutive_failures`` failures in
  a row, or when the failure ratio over the last ``window_s`` reaches ``error_rate`` with at
  least ``min_requests`` outcomes in the window, or (``latency_outlier_factor`` set) when the
  worker's latency EWMA exceeds that factor × the median EWMA of the fleet.
* OPEN: nothing is allowed. The open interval is ``open_s × 2^(n − 1)`` for the n-th
  consecutive opening, capped at ``max_open_s``, then multiplied by ``1 ± jitter`` (uniform,
  from the injected ``random.Random``) so that a fleet ejected together does not come back
  together. The cap applies before the jitter: ejections at the cap still spread out.
* HALF_OPEN: once the interval has passed, ``half_open_probes`` requests are let through
  (``allow()`` counts them). All succeed → CLOSED; any fails → OPEN with the next, longer
  interval. A probe whose outcome never comes (the request was cancelled) is handed back
  with ``cancel()``; as a safety net a half-open breaker re-issues lost probes after
  ``max_open_s``.
* The count of consecutive openings resets once the breaker has stayed CLOSED for a stable
  period: the un-jittered length of its last open interval, and at least ``window_s``.
* Slow start: after a worker joins (``add_worker``) or its breaker closes, its traffic share
  ramps linearly from ``SLOW_START_FLOOR`` to 1.0 over ``slow_start_s``. OPEN → 0.0,
  HALF_OPEN → the floor. The router multiplies its preference by the share.
* The :class:`BreakerBoard` owns every worker's breaker and enforces ``max_ejected_fraction``:
  at most ``max(1, floor(fraction × workers))`` breakers may be non-CLOSED at once (0 when the
  fraction is 0; Envoy's "at least one host" rule). A breaker that would TRIP beyond the cap
  stays CLOSED; the suppression is counted and its reason kept in ``statistics()``. Its
  failure counts are kept, so it trips as soon as room frees up.

Any other transition is a bug and raises :class:`BreakerTransitionError`.

Every state change is also a :class:`BreakerTransition` value (worker, time, states, reason
and a sentence for people: "5 consecutive failures", "error rate 60 % (12 of 20) over 10 s"),
kept in a bounded buffer of the board (``MAX_TRANSITIONS_KEPT``, oldest dropped and counted)
that the shell drains with ``drain_transitions()`` and logs; nothing here does I/O.

Outcomes arriving while OPEN, or while HALF_OPEN with no probe outstanding (requests sent
before the trip), are ignored. ``record()`` for a
removed worker is ignored (a request may finish after its worker left); ``allow()``,
``state()`` and ``traffic_share()`` for an unknown worker raise ``KeyError``.
"""

from __future__ import annotations

import collections
import enum
import math
import random
import statistics as _stats
from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.config import BreakerConfig
from gateway.core.types import WorkerId

SLOW_START_FLOOR = 0.1          # share of a worker at the very start of its ramp
LATENCY_EWMA_ALPHA = 0.2         # weight of a new latency sample
LATENCY_MIN_FLEET = 3            # the latency-outlier rule needs a median of at least this many
WINDOW_BUCKETS = 10              # buckets of the rolling error-rate window
MEDIAN_REFRESH_S = 1.0           # the fleet latency median is recomputed at most this often
MAX_TRANSITIONS_KEPT = 256       # state changes buffered for the shell's log, at most


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """Value for gateway_worker_breaker_state (0 closed, 1 half_open, 2 open)."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class BreakerEvent(enum.Enum):
    TRIP = "trip"
    COOLED = "cooled"
    PROBES_PASSED = "probes_passed"
    PROBE_FAILED = "probe_failed"


_TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBES_PASSED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE_FAILED): BreakerState.OPEN,
}


class BreakerTransitionError(RuntimeError):
    """An event that the current state does not accept (a bug in the caller)."""


def next_state(state: BreakerState, event: BreakerEvent) -> BreakerState:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise BreakerTransitionError(f"{event.value} is not allowed in state {state.value}") \
            from None


class WindowCounts:
    """Two counters (``a``, ``b``) over a rolling window, in ``buckets`` fixed slots.

    Memory is O(buckets) whatever the traffic; the window covers between
    ``(buckets − 1) / buckets`` and all of ``window_s``.
    """

    __slots__ = ("_a", "_b", "_epochs", "_width_s", "buckets")

    def __init__(self, window_s: float, buckets: int = WINDOW_BUCKETS) -> None:
        self.buckets = buckets
        self._width_s = window_s / buckets
        self._epochs = [-1] * buckets
        self._a = [0] * buckets
        self._b = [0] * buckets

    def _slot(self, now: float) -> int:
        epoch = math.floor(now / self._width_s)
        slot = epoch % self.buckets
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._a[slot] = 0
            self._b[slot] = 0
        return slot

    def add(self, now: float, a: int = 0, b: int = 0) -> None:
        slot = self._slot(now)
        self._a[slot] += a
        self._b[slot] += b

    def totals(self, now: float) -> tuple[int, int]:
        oldest = math.floor(now / self._width_s) - self.buckets + 1
        sum_a = sum_b = 0
        for slot in range(self.buckets):
            if self._epochs[slot] >= oldest:
                sum_a += self._a[slot]
                sum_b += self._b[slot]
        return sum_a, sum_b

    def clear(self) -> None:
        self._epochs = [-1] * self.buckets
        self._a = [0] * self.buckets
        self._b = [0] * self.buckets


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change, for the shell to log."""

    worker: str
    at: float                      # monotonic seconds
    old: BreakerState
    new: BreakerState
    reason: str                    # trip reason, "probe_failed", "cooled" or "probes_passed"
    detail: str                    # the same for people, with the numbers behind it
    open_for_s: float | None       # OPEN: how long this ejection lasts (jitter included)
    opening: int                   # consecutive openings, this one included


TransitionSink = Callable[[BreakerTransition], None]


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    state: BreakerState
    opened_count: int              # consecutive openings (drives the interval)
    opened_total: int
    reopen_at: float | None        # when an OPEN breaker turns HALF_OPEN
    window_requests: int
    window_failures: int
    consecutive_failures: int
    probes_issued: int
    probes_succeeded: int
    traffic_share: float
    latency_ewma_s: float
    last_trip_reason: str | None
    suppressed_total: int          # trips refused by the board's ejection cap
    last_suppressed_reason: str | None


class CircuitBreaker:
    """One worker's breaker. ``record()`` *reports* a CLOSED-state trip reason and the owner
    decides: ``trip()``, or ``suppress()`` when the board's ejection cap is reached. Also used
    alone (e.g. ``gateway.engine.redis_store``'s breaker around Redis)."""

    __slots__ = (
        "_cfg", "_closed_at", "_consecutive", "_half_open_at", "_last_base_s", "_latency_n",
        "_on_transition", "_opened_at", "_ramp_from", "_rng", "_window", "last_suppressed_reason",
        "last_trip_reason", "latency_ewma_s", "name", "opened_count", "opened_total",
        "probes_issued", "probes_succeeded", "reopen_at", "state", "suppressed_total",
    )

    def __init__(self, cfg: BreakerConfig, rng: random.Random, now: float, *,
                 slow_start: bool = True, name: str = "",
                 on_transition: TransitionSink | None = None) -> None:
        self._cfg = cfg
        self._rng = rng
        self.name = name
        self._on_transition = on_transition
        self._opened_at = now
        self.state = BreakerState.CLOSED
        self._window = WindowCounts(cfg.window_s)
        self._consecutive = 0
        self.opened_count = 0
        self.opened_total = 0
        self.reopen_at: float | None = None
        self._half_open_at = 0.0
        self._last_base_s = 0.0
        self._closed_at = now
        self._ramp_from: float | None = now if slow_start else None
        self.probes_issued = 0
        self.probes_succeeded = 0
        self.latency_ewma_s = 0.0
        self._latency_n = 0
        self.last_trip_reason: str | None = None
        self.suppressed_total = 0
        self.last_suppressed_reason: str | None = None

    def reconfigure(self, cfg: BreakerConfig) -> None:
        """New settings; the state is kept (a new window length restarts the window)."""
        if cfg.window_s != self._cfg.window_s:
            self._window = WindowCounts(cfg.window_s)
        self._cfg = cfg

    def __repr__(self) -> str:
        return (f"<CircuitBreaker {self.state.value} opened={self.opened_count} "
                f"consecutive_failures={self._consecutive}>")

    # -- transitions ---------------------------------------------------------------------

    def _fire(self, event: BreakerEvent, now: float, detail: str = "") -> None:
        old = self.state
        self.state = next_state(self.state, event)
        open_for_s: float | None = None
        if self.state is BreakerState.OPEN:
            self.opened_count += 1
            self.opened_total += 1
            base = min(self._cfg.open_s * 2.0 ** (self.opened_count - 1), self._cfg.max_open_s)
            self._last_base_s = base
            jitter = self._cfg.jitter * self._rng.uniform(-1.0, 1.0)
            open_for_s = base * (1.0 + jitter)
            self.reopen_at = now + open_for_s
            self._opened_at = now
        elif self.state is BreakerState.HALF_OPEN:
            detail = (f"after {now - self._opened_at:.1f} s open; "
                      f"{self._cfg.half_open_probes} probe requests let through")
            self.reopen_at = None
            self._half_open_at = now
            self.probes_issued = 0
            self.probes_succeeded = 0
        else:  # CLOSED: start afresh, with a slow-start ramp
            self._consecutive = 0
            self._window.clear()
            self.latency_ewma_s = 0.0
            self._latency_n = 0
            self._closed_at = now
            self._ramp_from = now
            detail = (f"{self._cfg.half_open_probes} half-open probes passed; traffic ramps "
                      f"up over {self._cfg.slow_start_s:g} s")
        if self._on_transition is not None:
            reason = (self.last_trip_reason or "") if self.state is BreakerState.OPEN \
                else event.value
            self._on_transition(BreakerTransition(
                self.name, now, old, self.state, reason, detail or reason, open_for_s,
                self.opened_count))

    def advance(self, now: float) -> BreakerState:
        """Apply the passage of time: OPEN → HALF_OPEN, stable-period reset."""
        if self.state is BreakerState.OPEN and self.reopen_at is not None \
                and now >= self.reopen_at:
            self._fire(BreakerEvent.COOLED, now)
        elif self.state is BreakerState.HALF_OPEN \
                and now - self._half_open_at >= self._cfg.max_open_s:
            self.probes_issued = self.probes_succeeded   # lost probes: issue again
            self._half_open_at = now
        elif self.state is BreakerState.CLOSED and self.opened_count \
                and now - self._closed_at >= max(self._last_base_s, self._cfg.window_s):
            self.opened_count = 0
        return self.state

    def trip(self, now: float, reason: str, detail: str = "") -> None:
        self.last_trip_reason = reason
        self._fire(BreakerEvent.TRIP, now, detail or self.trip_detail(reason, now))

    def trip_detail(self, reason: str, now: float) -> str:
        """The numbers behind a trip reason of :meth:`record`, for people."""
        if reason == "consecutive_failures":
            return f"{self._consecutive} consecutive failures"
        if reason == "error_rate":
            total, failures = self._window.totals(now)
            return (f"error rate {failures / max(1, total):.0%} ({failures} of {total}) over "
                    f"{self._cfg.window_s:g} s, threshold {self._cfg.error_rate:.0%}")
        return reason

    def suppress(self, reason: str) -> None:
        self.suppressed_total += 1
        self.last_suppressed_reason = reason

    # -- requests ------------------------------------------------------------------------

    def allow(self, now: float) -> bool:
        state = self.advance(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self.probes_issued < self._cfg.half_open_probes:
            self.probes_issued += 1
            return True
        return False

    def cancel(self, now: float) -> None:
        """A request let through by ``allow()`` ended without an outcome."""
        if self.advance(now) is BreakerState.HALF_OPEN and \
                self.probes_issued > self.probes_succeeded:
            self.probes_issued -= 1

    def record(self, now: float, ok: bool, latency_s: float | None = None) -> str | None:
        """Count one outcome. Returns a trip reason when CLOSED and a rule fires (the owner
        then calls ``trip`` or ``suppress``); HALF_OPEN transitions happen here."""
        state = self.advance(now)
        if state is BreakerState.OPEN:
            return None
        if state is BreakerState.HALF_OPEN:
            if self.probes_issued <= self.probes_succeeded:
                return None           # no probe outstanding: a late pre-trip outcome
            if not ok:
                self.last_trip_reason = "probe_failed"
                self._fire(BreakerEvent.PROBE_FAILED, now, "a half-open probe failed")
            else:
                self.probes_succeeded += 1
                if self.probes_succeeded >= self._cfg.half_open_probes:
                    self._fire(BreakerEvent.PROBES_PASSED, now)
            return None
        if latency_s is not None and ok:
            if self._latency_n == 0:
                self.latency_ewma_s = latency_s
            else:
                self.latency_ewma_s += LATENCY_EWMA_ALPHA * (latency_s - self.latency_ewma_s)
            self._latency_n += 1
        self._window.add(now, a=1, b=0 if ok else 1)
        if ok:
            self._consecutive = 0
            return None
        self._consecutive += 1
        if self._consecutive >= self._cfg.consecutive_failures:
            return "consecutive_failures"
        total, failures = self._window.totals(now)
        if total >= self._cfg.min_requests and failures / total >= self._cfg.error_rate:
            return "error_rate"
        return None

    @property
    def latency_samples(self) -> int:
        return self._latency_n

    def traffic_share(self, now: float) -> float:
        state = self.advance(now)
        if state is BreakerState.OPEN:
            return 0.0
        if state is BreakerState.HALF_OPEN:
            return SLOW_START_FLOOR
        return slow_start_share(self._ramp_from, now, self._cfg.slow_start_s)

    def statistics(self, now: float) -> BreakerStatistics:
        share = self.traffic_share(now)
        total, failures = self._window.totals(now)
        return BreakerStatistics(
            state=self.state, opened_count=self.opened_count, opened_total=self.opened_total,
            reopen_at=self.reopen_at, window_requests=total, window_failures=failures,
            consecutive_failures=self._consecutive, probes_issued=self.probes_issued,
            probes_succeeded=self.probes_succeeded, traffic_share=share,
            latency_ewma_s=self.latency_ewma_s, last_trip_reason=self.last_trip_reason,
            suppressed_total=self.suppressed_total,
            last_suppressed_reason=self.last_suppressed_reason)


def slow_start_share(ramp_from: float | None, now: float, slow_start_s: float) -> float:
    """Linear ramp from SLOW_START_FLOOR at ``ramp_from`` to 1.0 ``slow_start_s`` later."""
    if ramp_from is None or slow_start_s <= 0:
        return 1.0
    progress = (now - ramp_from) / slow_start_s
    if progress >= 1.0:
        return 1.0
    return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(0.0, progress)


def max_ejected(fraction: float, workers: int) -> int:
    """How many breakers may be non-CLOSED at once."""
    if fraction <= 0 or workers == 0:
        return 0
    return max(1, math.floor(fraction * workers + 1e-9))


@dataclass(frozen=True, slots=True)
class BoardStatistics:
    workers: dict[WorkerId, BreakerStatistics]
    ejected: int                   # breakers OPEN or HALF_OPEN
    max_ejected: int
    suppressed_total: int
    fleet_latency_median_s: float | None


class BreakerBoard:
    """All workers' breakers; the ejection cap and the latency-outlier rule span the fleet.

    Single-threaded (one event loop); every method takes ``now`` (monotonic seconds).
    ``enabled: false`` keeps slow start but never opens a breaker.
    """

    __slots__ = ("_breakers", "_cfg", "_median_at", "_median_s", "_rng", "_suppressed_total",
                 "_transitions", "transitions_dropped")

    def __init__(self, cfg: BreakerConfig, rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._rng = rng if rng is not None else random.Random()
        self._breakers: dict[WorkerId, CircuitBreaker] = {}
        self._suppressed_total = 0
        self._transitions: collections.deque[BreakerTransition] = collections.deque(
            maxlen=MAX_TRANSITIONS_KEPT)
        self.transitions_dropped = 0
        self._median_s: float | None = None
        self._median_at = -math.inf

    def __repr__(self) -> str:
        open_ = sum(b.state is not BreakerState.CLOSED for b in self._breakers.values())
        return f"<BreakerBoard workers={len(self._breakers)} ejected={open_}>"

    def reconfigure(self, cfg: BreakerConfig) -> None:
        """Config reload: new settings for every breaker, states kept."""
        self._cfg = cfg
        for breaker in self._breakers.values():
            breaker.reconfigure(cfg)

    def __contains__(self, worker: WorkerId) -> bool:
        return worker in self._breakers

    def add_worker(self, worker: WorkerId, now: float, *, slow_start: bool = True) -> None:
        """(Re)join: a fresh CLOSED breaker, ramping up unless ``slow_start`` is False
        (e.g. the fleet present at start-up). Adding a known worker keeps its breaker."""
        if worker not in self._breakers:
            self._breakers[worker] = CircuitBreaker(self._cfg, self._rng, now,
                                                    slow_start=slow_start, name=worker,
                                                    on_transition=self._note)

    def _note(self, transition: BreakerTransition) -> None:
        if len(self._transitions) == MAX_TRANSITIONS_KEPT:
            self.transitions_dropped += 1
        self._transitions.append(transition)

    def drain_transitions(self) -> list[BreakerTransition]:
        """State changes since the last call, oldest first (for the shell to log)."""
        out = list(self._transitions)
        self._transitions.clear()
        return out

    @property
    def suppressed_total(self) -> int:
        """Trips refused by the ejection cap, ever."""
        return self._suppressed_total

    def remove_worker(self, worker: WorkerId) -> None:
        self._breakers.pop(worker, None)

    def workers(self) -> list[WorkerId]:
        return list(self._breakers)

    def allow(self, worker: WorkerId, now: float) -> bool:
        """May a request go to ``worker`` now? While HALF_OPEN each True is a probe: report
        its outcome with ``record()`` or hand it back with ``cancel()``."""
        return self._breakers[worker].allow(now)

    def cancel(self, worker: WorkerId, now: float) -> None:
        breaker = self._breakers.get(worker)
        if breaker is not None:
            breaker.cancel(now)

    def record(self, worker: WorkerId, now: float, ok: bool,
               latency_s: float | None = None) -> None:
        breaker = self._breakers.get(worker)
        if breaker is None:
            return
        reason = breaker.record(now, ok, latency_s)
        if reason is None and ok and self._is_latency_outlier(breaker, now):
            reason = "latency_outlier"
        if reason is None or not self._cfg.enabled:
            return
        if self._ejected(now) >= max_ejected(self._cfg.max_ejected_fraction,
                                             len(self._breakers)):
            breaker.suppress(reason)
            self._suppressed_total += 1
            return
        detail = ""
        if reason == "latency_outlier" and self._median_s:
            detail = (f"latency EWMA {breaker.latency_ewma_s * 1000:.0f} ms over "
                      f"{self._cfg.latency_outlier_factor:g} × the fleet median "
                      f"{self._median_s * 1000:.0f} ms")
        breaker.trip(now, reason, detail)

    def state(self, worker: WorkerId, now: float) -> BreakerState:
        return self._breakers[worker].advance(now)

    def traffic_share(self, worker: WorkerId, now: float) -> float:
        return self._breakers[worker].traffic_share(now)

    def _ejected(self, now: float) -> int:
        return sum(b.advance(now) is not BreakerState.CLOSED for b in self._breakers.values())

    def _fleet_latency_median(self) -> float | None:
        samples = [b.latency_ewma_s for b in self._breakers.values()
                   if b.state is BreakerState.CLOSED and b.latency_samples > 0]
        if len(samples) < LATENCY_MIN_FLEET:
            return None
        return _stats.median(samples)

    def _is_latency_outlier(self, breaker: CircuitBreaker, now: float) -> bool:
        factor = self._cfg.latency_outlier_factor
        if factor is None or breaker.state is not BreakerState.CLOSED \
                or breaker.latency_samples < self._cfg.min_requests:
            return False
        if now - self._median_at >= MEDIAN_REFRESH_S:   # O(workers): not on every request
            self._median_s = self._fleet_latency_median()
            self._median_at = now
        median = self._median_s
        return median is not None and median > 0 and breaker.latency_ewma_s > factor * median

    def statistics(self, now: float) -> BoardStatistics:
        workers = {w: b.statistics(now) for w, b in self._breakers.items()}
        return BoardStatistics(
            workers=workers,
            ejected=sum(s.state is not BreakerState.CLOSED for s in workers.values()),
            max_ejected=max_ejected(self._cfg.max_ejected_fraction, len(self._breakers)),
            suppressed_total=self._suppressed_total,
            fleet_latency_median_s=self._fleet_latency_median())
