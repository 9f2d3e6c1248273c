"""Prometheus metrics and the capacity signals (the only module importing prometheus-client).

Two kinds of series:

* **events**, updated on the hot path: requests by outcome, rejections by reason, end-to-end
  and upstream latency histograms, queue wait, batch sizes;
* **state**, read from snapshots at scrape time by a custom collector: per worker (in flight,
  slots, utilisation, pending, free/total GPU memory, breaker state, ready) and per fleet
  (utilisation, headroom, saturation, arrival rate, desired replicas).

The gateway has one priority queue for all models, so ``gateway_queue_length`` is a fleet
gauge; ``gateway_queue_wait_seconds{model}`` observes each queued request once, from entering
the queue to leaving it (routed, timed out or abandoned). Counters of configured and served
models are exported at 0 before their first event, so ``rate()`` sees the first burst.

Label cardinality is bounded: ``model`` is a configured or discovered model name (at most
``MAX_MODELS``; anything else is reported as ``_other``), ``worker`` is a fleet member,
``reason``/``outcome`` are fixed sets.

Capacity signals (definitions in ``gateway.core.capacity``), sampled once a second:

* utilisation = busy slots / slots of ready workers (the busy slots an EWMA of one-second
  samples, half-life ``UTILISATION_HALF_LIFE_S`` ≈ 3.1 s, over the slots ready now),
  fleet-wide and per model (the model's in-flight requests over the slots of the workers
  serving it);
* headroom = 1 − utilisation / target (``capacity.target_utilisation``, default 0.7);
* saturation = share of the last minute during which requests had to queue for a slot;
* arrival rate = requests per second per model (decayed, half-life ``ARRIVAL_HALF_LIFE_S``),
  counted when a request for a known model arrives, before rate limits — demand, not goodput;
* ``gateway_desired_replicas{mode="reactive"}`` = HPA formula on the model's utilisation vs the
  target, + N+k: ``ceil(current × utilisation / target) + k`` (two workers at 100 % with a
  0.7 target and k = 1 → ceil(2 / 0.7) + 1 = 4);
* ``gateway_desired_replicas{mode="predictive"}`` = the peak forecast arrival rate over the
  next ``lead_time_s`` (``gateway.core.forecast``, daily and weekly seasonality, model chosen by
  backtest on the gateway's own per-step history), floored by the rate observed now, over the
  per-replica throughput at the target, + N+k.

Per-replica throughput (the predictive rule's denominator) is measured, not configured:
requests completed per busy slot-second, times slots per replica, over a sliding window of
``THROUGHPUT_WINDOW_S`` one-second samples. By Little's law that is ``slots / service time``,
the rate one replica sustains at 100 % slot utilisation; it is the same model of a replica as
the reactive rule's (at a steady rate both give ``ceil(current × utilisation / target) + k``).
The estimate is only updated once the window holds ``MIN_BUSY_SLOT_S`` of busy slot-time, so
an idle model keeps its last estimate; before any estimate predictive equals reactive.
Requests merged into one gateway batch count one slot and one completion per member, so both
the forecast and the throughput are in client requests.

The forecaster runs on :class:`~gateway.core.capacity.CapacityClock`: Unix time ×
``capacity.time_scale`` (1 in production; a time-compressed benchmark sets e.g. 300, and then
the signals are sampled every 1/time_scale s, at least ``MIN_SAMPLE_INTERVAL_S``, and both
averaged signals' half-lives, the arrival meter's and the utilisation's, shrink with it, to
the same floor ``MIN_SIGNAL_HALF_LIFE_S`` of real time: :func:`signal_half_life_s`). Each
model's forecaster starts from ``capacity.history_file`` when set (read once, at start).

Why one floor for both: compression shrinks the requests behind a trace minute by
``time_scale`` (at 300, a trace minute at 150 req/s is 30 real requests, not 9,000), so a
signal averaged over a fixed span of *scaled* time is √``time_scale`` times noisier than in
production. The floor keeps a few hundred arrivals behind each signal; applied to one signal
and not the other, the reactive rule (utilisation) would read a noisier signal than the
predictive one (arrival rate) and the HPA, which scales up at once and down only after five
minutes, would turn that noise into replicas ordered and cancelled during their warm-up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.core import capacity
from gateway.core.admission import RateMeter
from gateway.core.breaker import BreakerState, BreakerTransition
from gateway.core.errors import GatewayError
from gateway.core.forecast import Forecaster, parse_history
from gateway.core.schema import ConfigError
from gateway.core.shares import Report
from gateway.ops.accesslog import CLIENT_DISCONNECTED, AccessLog

if TYPE_CHECKING:
    from gateway.core.config import AccessLogConfig
    from gateway.ops.state import GatewayState

breaker_log = logging.getLogger("gateway.core.breaker")
log = logging.getLogger("gateway.ops.telemetry")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_MODELS = 256
ARRIVAL_HALF_LIFE_S = 10.0
# The utilisation's EWMA: weight 0.2 per one-second sample, i.e. a half-life of
# ln 2 / ln 1.25 ≈ 3.1 s.
UTILISATION_HALF_LIFE_S = math.log(2.0) / math.log(1.25)
# The floor under a time-compressed half-life, real seconds, the same for every averaged
# signal: a decayed rate or utilisation needs a few hundred arrivals behind it, or its noise
# alone moves the desired replicas.
MIN_SIGNAL_HALF_LIFE_S = 1.0
MIN_ARRIVAL_HALF_LIFE_S = MIN_SIGNAL_HALF_LIFE_S
THROUGHPUT_WINDOW_S = 60
SAMPLE_INTERVAL_S = 1.0
MIN_SAMPLE_INTERVAL_S = 0.05    # the floor under a time-compressed run's sampling
MIN_BUSY_SLOT_S = 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}
OUTCOMES = ("ok", "client_error", "upstream_error", "rejected")
# what the connection layer's own answers mean, by status (the access log's reason)
_CONNECTION_REASONS = {400: "bad_request", 408: "client_timeout", 431: "headers_too_large",
                       503: "connections_full"}
REJECTION_REASONS = ("rate_limited", "overloaded", "no_worker", "deadline", "rejected",
                     "unauthorized", "payload_too_large", "bad_request")

# ``*_created`` timestamps double the series count and no rule or dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def signal_half_life_s(half_life_s: float, clock: capacity.CapacityClock) -> float:
    """A signal's half-life in real seconds: ``half_life_s`` of capacity time, at least
    ``MIN_SIGNAL_HALF_LIFE_S`` (at ``time_scale`` 1 both shipped half-lives are above it)."""
    return max(MIN_SIGNAL_HALF_LIFE_S, clock.real_s(half_life_s))


def ewma_weight(interval_s: float, half_life_s: float) -> float:
    """The weight of a new sample taken ``interval_s`` after the last in an EWMA of that
    half-life (both real seconds): 0.2 for one-second samples at ``UTILISATION_HALF_LIFE_S``."""
    return 1.0 - math.pow(0.5, interval_s / half_life_s)


def outcome_of(status: int) -> str:
    """Outcome of a request a worker answered (the gateway's own refusals are counted in
    ``request_failed``)."""
    if status < 400:
        return "ok"
    return "client_error" if status < 500 else "upstream_error"


def read_history(path: str | None) -> tuple[list[float], list[float]] | None:
    """``capacity.history_file`` read and checked (a bad file is a configuration error)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return parse_history(f, path)
    except OSError as exc:
        raise ConfigError("capacity.history_file",
                          f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("capacity.history_file", str(exc)) from None


class ModelCapacity:
    """Per-model capacity state: forecaster, arrival meter, smoothed busy slots (``busy``)
    and the utilisation they make over the slots ready now, and the per-replica throughput
    window (``(busy slot-seconds, completions, slots per replica)`` per one-second sample)."""

    __slots__ = ("arrival_meter", "arrivals_seen", "busy", "completions_seen", "forecaster",
                 "per_replica_rps", "utilisation", "window")

    def __init__(self, step_s: float, max_points: int, lead_time_s: float,
                 arrival_half_life_s: float = ARRIVAL_HALF_LIFE_S) -> None:
        self.forecaster = Forecaster(step_s=step_s, max_points=max_points,
                                     selection_horizon_s=lead_time_s)
        self.arrival_meter = RateMeter(arrival_half_life_s)
        self.busy = 0.0
        self.utilisation = 0.0
        self.per_replica_rps = 0.0
        self.arrivals_seen = 0
        self.completions_seen = 0
        self.window: collections.deque[tuple[float, int, float]] = collections.deque(
            maxlen=THROUGHPUT_WINDOW_S)

    def update_throughput(self, busy_slot_s: float, completed: int,
                          slots_per_replica: float) -> None:
        self.window.append((busy_slot_s, completed, slots_per_replica))
        busy = sum(b for b, _, _ in self.window)
        done = sum(c for _, c, _ in self.window)
        if busy >= MIN_BUSY_SLOT_S and done > 0:
            slots = sum(s * b for b, _, s in self.window) / busy  # busy-weighted mean
            self.per_replica_rps = done / busy * slots


class Telemetry:
    def __init__(self, service: GatewayState) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gateway_requests", "Requests by model and outcome",
                                ["model", "outcome"], registry=r)
        self.rejections = Counter("gateway_rejections", "Requests the gateway refused, by "
                                  "reason", ["model", "reason"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "End-to-end latency "
                                  "seen by the gateway", ["model"], buckets=LATENCY_BUCKETS,
                                  registry=r)
        self.upstream = Histogram("gateway_upstream_duration_seconds", "Worker latency "
                                  "(from dispatch to full response)", ["model"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("gateway_queue_wait_seconds", "Time spent waiting for a "
                                    "worker slot (queued requests only)", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("gateway_batch_size", "Requests merged per gateway batch",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_fill: dict[str, float] = {}
        self.models: dict[str, ModelCapacity] = {}
        self.arrival_counts: collections.Counter[str] = collections.Counter()
        self._done_children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}
        self._refused_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.completion_counts: collections.Counter[str] = collections.Counter()
        self.saturation_samples: collections.deque[float] = collections.deque(maxlen=60)
        self.fleet_utilisation = 0.0
        self.fleet_busy = 0.0
        self.recent_rejections: collections.deque[dict[str, object]] = collections.deque(
            maxlen=50)
        self._last_saturation_s = 0.0
        self._last_sample: float | None = None
        self._access_cfg: AccessLogConfig = service.cfg.access_log
        self.access_log: AccessLog | None = AccessLog.from_config(self._access_cfg)
        self._suppressed_seen = 0
        self._suppressed_logged_at = -math.inf
        # Replicas as one (set by the service when coordinating): the other replicas' live
        # reports, whose counters and in-flight counts join this replica's in every signal,
        # so that each replica reports the fleet, not its slice of the traffic.
        self.peers: Callable[[], Sequence[Report]] = tuple
        self._peer_seen: dict[str, dict[str, float]] = {}
        self._busy_seen: dict[tuple[str, str], float] = {}
        self._busy_at: float | None = None
        # The forecaster's clock (capacity.time_scale, Unix time) and the recorded history it
        # starts from (capacity.history_file): both read once, at start.
        cap = service.cfg.capacity
        self.capacity_clock = capacity.CapacityClock(cap.time_scale,
                                                     time.time() - service.clock())
        self.sample_interval_s = max(MIN_SAMPLE_INTERVAL_S,
                                     self.capacity_clock.real_s(SAMPLE_INTERVAL_S))
        # The utilisation's EWMA weight per sample: 0.2 at one-second samples in real time;
        # under compression the half-life shrinks like the arrival meter's, to the same floor.
        self.utilisation_weight = ewma_weight(
            self.sample_interval_s,
            signal_half_life_s(UTILISATION_HALF_LIFE_S, self.capacity_clock))
        self.history = read_history(cap.history_file)
        r.register(_StateCollector(self))

    # hot path ---------------------------------------------------------------------------
    def label(self, model: str) -> str:
        if model in self.models or (self.service.model_known(model)
                                    and len(self.models) < MAX_MODELS):
            return model
        return "_other"

    def arrival(self, model: str) -> None:
        self.arrival_counts[self.label(model)] += 1

    def request_done(self, model: str, status: int, total_s: float, upstream_s: float, *,
                     rid: bytes | None = None, tenant: str | None = None,
                     worker: str | None = None, queue_s: float | None = None,
                     trace_id: str | None = None) -> None:
        """A request a worker answered (or a batch it joined)."""
        if self.access_log is not None:
            self.access_log.record(self.service.clock(), time.time(), rid=rid, tenant=tenant,
                                   model=model, worker=worker, status=status,
                                   latency_s=total_s, queue_s=queue_s, reason=None,
                                   trace_id=trace_id)
        m = self.label(model)
        children = self._done_children.get((m, status))
        if children is None:
            # labels() costs a lock and a dict walk; the children per (model, status) are
            # few (bounded models × HTTP statuses seen) and looked up once.
            if len(self._done_children) >= 4096:
                self._done_children.clear()
            children = self._done_children[(m, status)] = (
                self.requests.labels(m, outcome_of(status)), self.duration.labels(m),
                self.upstream.labels(m))
        requests, duration, upstream = children
        requests.inc()
        self.completion_counts[m] += 1
        duration.observe(total_s)
        upstream.observe(upstream_s)

    def request_failed(self, model: str, exc: GatewayError, *, is_rejection: bool,
                       rid: bytes | None = None, tenant: str | None = None,
                       worker: str | None = None, queue_s: float | None = None,
                       latency_s: float | None = None, trace_id: str | None = None) -> None:
        """The gateway's own error answer ``exc``, ``latency_s`` after the request came."""
        if self.access_log is not None:
            self.access_log.record(self.service.clock(), time.time(), rid=rid, tenant=tenant,
                                   model=model, worker=worker, status=exc.status,
                                   latency_s=latency_s, queue_s=queue_s, reason=exc.reason,
                                   trace_id=trace_id)
        m = self.label(model)
        if is_rejection or exc.status in (401, 413):
            refused = self._refused_children.get((m, exc.reason))
            if refused is None:   # as in request_done: labels() once per (model, reason)
                if len(self._refused_children) >= 4096:
                    self._refused_children.clear()
                refused = self._refused_children[(m, exc.reason)] = (
                    self.requests.labels(m, "rejected"), self.rejections.labels(m, exc.reason))
            refused[0].inc()
            refused[1].inc()
            self.recent_rejections.append({"at": time.time(), "model": m, "reason": exc.reason,
                                           "status": exc.status, "tenant": tenant})
        elif exc.status >= 500:
            self.requests.labels(m, "upstream_error").inc()
            if exc.status == 504:   # the request's deadline ran out: counted by reason too
                self.rejections.labels(m, "upstream_timeout").inc()
                self.recent_rejections.append({"at": time.time(), "model": m,
                                               "reason": "upstream_timeout", "status": 504})
        else:
            self.requests.labels(m, "client_error").inc()
            if exc.reason == "bad_request":
                self.rejections.labels(m, "bad_request").inc()

    def request_aborted(self, model: str, *, rid: bytes | None = None,
                        tenant: str | None = None, worker: str | None = None,
                        queue_s: float | None = None, latency_s: float | None = None,
                        trace_id: str | None = None) -> None:
        if self.access_log is not None:
            self.access_log.record(self.service.clock(), time.time(), rid=rid, tenant=tenant,
                                   model=model, worker=worker, status=CLIENT_DISCONNECTED,
                                   latency_s=latency_s, queue_s=queue_s,
                                   reason="client_disconnected", trace_id=trace_id)
        self.requests.labels(self.label(model), "client_error").inc()

    def connection_refused(self, status: int, rid: bytes, latency_s: float) -> None:
        """A request the connection layer answered itself (``gateway.server``): malformed
        (400), too slow (408), a head over the header bounds (431), no room for another
        connection (503)."""
        exc = GatewayError("answered by the connection layer")
        exc.status = status
        exc.reason = _CONNECTION_REASONS.get(status, "bad_request")
        self.request_failed("_none", exc, is_rejection=status == 503, rid=rid,
                            latency_s=latency_s)

    def observe_batch(self, model: str, size: int, fill_ratio: float) -> None:
        m = self.label(model)
        self.batch_size.labels(m).observe(size)
        self.batch_fill[m] = fill_ratio

    def observe_queue_wait(self, model: str, wait_s: float) -> None:
        self.queue_wait.labels(self.label(model)).observe(max(0.0, wait_s))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # once a second ------------------------------------------------------------------------
    async def run(self) -> None:
        logged_at = self.service.clock()
        while True:
            await asyncio.sleep(self.sample_interval_s)
            now = self.service.clock()
            self.sample(now)
            if now - logged_at >= SAMPLE_INTERVAL_S - 1e-3:
                logged_at = now
                self.tick_logs(now, time.time())

    # logs, once a second ------------------------------------------------------------------
    def tick_logs(self, now: float, wall: float) -> None:
        """Breaker state changes out to the log; the access log's summary and flush; a
        reloaded ``access_log`` section in force."""
        board = self.service.breakers
        for t in board.drain_transitions():
            log_breaker_transition(t)
        suppressed = board.suppressed_total
        if suppressed > self._suppressed_seen and now - self._suppressed_logged_at >= 10.0:
            breaker_log.warning(
                "%d breaker openings refused by the ejection cap "
                "(admission.breaker.max_ejected_fraction) since the last report; the failing "
                "workers keep traffic", suppressed - self._suppressed_seen)
            self._suppressed_seen = suppressed
            self._suppressed_logged_at = now
        cfg = self.service.cfg.access_log
        if cfg != self._access_cfg:
            self.close()
            self._access_cfg = cfg
            self.access_log = AccessLog.from_config(cfg)
        if self.access_log is not None:
            self.access_log.tick(now, wall)

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None

    def sample(self, now: float) -> None:
        svc = self.service
        ready = [w for w in svc.workers() if w.is_routable]
        peers = self.peers()
        peer_counts, peer_saturation_s = self._peer_deltas(peers)
        # Requests in flight per (worker, model), averaged over the time since the last
        # sample: this replica's integral (gateway.fleet.workers) plus the other replicas'
        # (their reports' counters). A time average, not one instant's count: every replica
        # adds the same integrals and so reports the same figure, and so does one gateway.
        mono = time.monotonic()
        span_s = 1.0 if self._busy_at is None else max(1e-3, mono - self._busy_at)
        self._busy_at = mono
        seen: dict[tuple[str, str], float] = {}
        avg: dict[tuple[str, str], float] = collections.defaultdict(float)
        for w in ready:
            for model, busy_s in w.busy_seconds().items():
                seen[w.id, model] = busy_s
                avg[w.id, model] += max(0.0, busy_s - self._busy_seen.get((w.id, model),
                                                                          busy_s)) / span_s
        self._busy_seen = seen
        for name, delta in peer_counts.items():
            if name.startswith("busy\t"):
                _, wid, model = name.split("\t", 2)
                avg[wid, model] += delta / span_s
        per_worker: dict[str, float] = collections.defaultdict(float)
        for (wid, _), n in avg.items():
            per_worker[wid] += n
        slots = sum(w.capacity_units for w in ready)
        busy = sum(min(per_worker.get(w.id, 0.0), float(w.capacity_units)) for w in ready)
        # The busy slots are averaged, not the ratio: a worker that joins or leaves changes
        # the slots at once and the busy work not at all, so ``current × utilisation`` (the
        # reactive rule's busy replicas) does not jump with the membership.
        w_util = self.utilisation_weight
        self.fleet_busy += w_util * (busy - self.fleet_busy)
        self.fleet_utilisation = capacity.fleet_utilisation(self.fleet_busy, slots)
        dt = 1.0 if self._last_sample is None else min(5.0, max(0.0, now - self._last_sample))
        self._last_sample = now
        sat_s = max(svc.saturation_seconds() - self._last_saturation_s, peer_saturation_s)
        self.saturation_samples.append(min(1.0, max(0.0, sat_s / dt)) if dt > 0 else 0.0)
        self._last_saturation_s = svc.saturation_seconds()
        # Every configured or served model gets signals, traffic or not (an idle model's
        # desired replicas is the floor); names come from config and workers, never clients.
        served = {m for w in ready for m in w.models_ready if "/" not in m}
        clock = self.capacity_clock
        for name in sorted(set(self.arrival_counts) | set(self.models) | set(svc.cfg.models)
                           | served | {k.split(":", 1)[1] for k in peer_counts
                                       if k.startswith("arrivals:")}):
            mc = self.models.get(name)
            if mc is None:
                if len(self.models) >= MAX_MODELS:
                    continue
                mc = self.models[name] = self._new_model(name, now)
            count = self.arrival_counts.get(name, 0)
            arrived = count - mc.arrivals_seen + peer_counts.get(f"arrivals:{name}", 0.0)
            mc.arrivals_seen = count
            mc.forecaster.record(clock.at(now), clock.arrivals(float(arrived)))
            mc.arrival_meter.add(now, float(arrived))
            done = self.completion_counts.get(name, 0)
            completed = done - mc.completions_seen + int(peer_counts.get(
                f"completions:{name}", 0.0))
            mc.completions_seen = done
            serving = [w for w in ready if name in w.models_ready]
            m_slots = sum(w.capacity_units for w in serving)
            m_busy = sum(avg.get((w.id, name), 0.0) for w in serving)
            mc.busy += w_util * (min(m_busy, m_slots) - mc.busy)
            mc.utilisation = capacity.fleet_utilisation(mc.busy, m_slots)
            if serving:
                mc.update_throughput(m_busy * dt, completed, m_slots / len(serving))

    def _new_model(self, name: str, now: float) -> ModelCapacity:
        cap = self.service.cfg.capacity
        clock = self.capacity_clock
        mc = ModelCapacity(cap.history_step_s, cap.history_max_points, cap.lead_time_s,
                           signal_half_life_s(ARRIVAL_HALF_LIFE_S, clock))
        if self.history is not None:
            steps = mc.forecaster.preload(*self.history, clock.at(now))
            log.info("capacity history for %s: %d steps of %g s from %s", name, steps,
                     cap.history_step_s, cap.history_file)
        self._zero_counters(name)
        return mc

    def counters(self) -> dict[str, float]:
        """This replica's cumulative counts that the capacity signals are made of, for the
        other replicas (gateway.core.shares.Report.counters)."""
        out = {f"arrivals:{m}": float(n) for m, n in self.arrival_counts.items()}
        out.update((f"completions:{m}", float(n)) for m, n in self.completion_counts.items())
        out["saturation_s"] = self.service.saturation_seconds()
        for w in self.service.workers():
            if w.is_routable:
                for model, busy_s in w.busy_seconds().items():
                    out[f"busy\t{w.id}\t{model}"] = busy_s
        return out

    def _peer_deltas(self, peers: Sequence[Report]) -> tuple[dict[str, float], float]:
        """What the other replicas counted since the last sample (summed; the saturation
        seconds as the largest), from their cumulative counters; a replica seen for the
        first time counts from there."""
        summed: dict[str, float] = collections.defaultdict(float)
        saturation = 0.0
        seen: dict[str, dict[str, float]] = {}
        for p in peers:
            last = self._peer_seen.get(p.member)
            seen[p.member] = dict(p.counters)
            if last is None:
                continue
            for name, value in p.counters.items():
                delta = max(0.0, value - last.get(name, value))
                if name == "saturation_s":
                    saturation = max(saturation, delta)
                else:
                    summed[name] += delta
        self._peer_seen = seen
        return summed, saturation

    def _zero_counters(self, model: str) -> None:
        """Export a model's counters at 0 before its first event: ``rate()`` over a series
        that is born at N sees no increase, so the first burst of, say, rejections would be
        invisible to the rules."""
        for outcome in OUTCOMES:
            self.requests.labels(model, outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(model, reason)

    def saturation(self) -> float:
        s = self.saturation_samples
        return sum(s) / len(s) if s else 0.0

    def desired_replicas(self, name: str, now: float) -> tuple[int, int]:
        svc = self.service
        cap = svc.cfg.capacity
        mc = self.models.get(name)
        serving = [w for w in svc.workers()
                   if w.is_routable and name in w.models_ready]
        current = len(serving)
        util = mc.utilisation if mc else 0.0
        reactive = capacity.reactive_desired_replicas(
            current, util, cap.target_utilisation, cap.redundancy, cap.min_replicas,
            cap.max_replicas)
        if mc is None or mc.per_replica_rps <= 0:
            return reactive, reactive
        now_rate = mc.arrival_meter.rate(now)
        # The peak over the lead time: capacity must also cover the minutes before new
        # replicas are warm.
        predicted = max(mc.forecaster.forecast_peak(self.capacity_clock.at(now),
                                                    cap.lead_time_s), now_rate)
        predictive = capacity.predictive_desired_replicas(
            predicted, mc.per_replica_rps, cap.target_utilisation, cap.redundancy,
            cap.min_replicas, cap.max_replicas)
        return reactive, predictive

    def fleet_view(self, now: float) -> dict[str, float | int]:
        svc = self.service
        cap = svc.cfg.capacity
        reactive = predictive = 0
        for name in self.models:
            r, p = self.desired_replicas(name, now)
            reactive, predictive = max(reactive, r), max(predictive, p)
        arrival = sum(m.arrival_meter.rate(now) for m in self.models.values())
        return {
            "utilisation": self.fleet_utilisation,
            "headroom": capacity.headroom(self.fleet_utilisation, cap.target_utilisation),
            "saturation": self.saturation(),
            "arrival_rate_per_s": arrival,
            "desired_reactive": reactive,
            "desired_predictive": predictive,
        }


class _StateCollector(Collector):
    def __init__(self, telemetry: Telemetry) -> None:
        self.t = telemetry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        t = self.t
        svc = t.service
        now = svc.clock()
        stale = svc.cfg.scrape.stale_after_s
        g = {name: GaugeMetricFamily(name, doc, labels=["worker"]) for name, doc in (
            ("gateway_worker_in_flight", "Requests in flight from this gateway"),
            ("gateway_worker_slots", "Maximum in-flight requests allowed"),
            ("gateway_worker_capacity_units", "Requests the worker executes at once "
             "(learned from its model configs: instances × batch where Triton batches)"),
            ("gateway_worker_utilisation", "Busy slots / slots"),
            ("gateway_worker_pending", "Triton pending requests (last scrape)"),
            ("gateway_worker_gpu_free_bytes", "Free GPU memory (last scrape)"),
            ("gateway_worker_gpu_total_bytes", "Total GPU memory (last scrape)"),
            ("gateway_worker_breaker_state", "0 closed, 1 half-open, 2 open"),
            ("gateway_worker_ready", "1 when the worker takes traffic"),
            ("gateway_worker_stalled", "1 while the worker is stalled: requests await its "
             "answer, none came for several service times while the others answer (no new "
             "requests but a probe until it answers again)"),
        )}
        board = svc.breakers
        for w in svc.workers():
            g["gateway_worker_in_flight"].add_metric([w.id], w.in_flight)
            g["gateway_worker_slots"].add_metric([w.id], w.slots)
            g["gateway_worker_capacity_units"].add_metric([w.id], w.capacity_units)
            g["gateway_worker_utilisation"].add_metric([w.id], w.in_flight / w.capacity_units
                                                       if w.slots else 0.0)
            g["gateway_worker_ready"].add_metric([w.id], 1.0 if w.is_routable else 0.0)
            g["gateway_worker_stalled"].add_metric(
                [w.id], 0.0 if svc.stall_state(w.id) == "serving" else 1.0)
            sig = w.fresh_signals(now, stale)
            if sig is not None:
                g["gateway_worker_pending"].add_metric([w.id], sig.pending())
                if sig.has_gpu:
                    g["gateway_worker_gpu_free_bytes"].add_metric([w.id], sig.free_memory_bytes)
                    g["gateway_worker_gpu_total_bytes"].add_metric([w.id],
                                                                   sig.total_memory_bytes)
            if w.id in board:
                g["gateway_worker_breaker_state"].add_metric([w.id],
                                                             board.state(w.id, now).gauge)
        yield from g.values()
        limit = GaugeMetricFamily("gateway_model_concurrency_limit",
                                  "In-flight limit of a model on a worker, learned from its "
                                  "config and adapted online (upstream.model_limits)",
                                  labels=["worker", "model"])
        for m in svc.model_limits():
            limit.add_metric([m.worker, m.model], m.limit)
        yield limit
        view = t.fleet_view(now)
        for name, doc, key in (
            ("gateway_fleet_utilisation", "Busy slots / slots of ready workers", "utilisation"),
            ("gateway_fleet_headroom", "1 - utilisation / target", "headroom"),
            ("gateway_fleet_saturation", "Share of the last minute spent queueing",
             "saturation"),
        ):
            fam = GaugeMetricFamily(name, doc)
            value = float(view[key])
            fam.add_metric([], value if math.isfinite(value) else 1.0)
            yield fam
        ql = GaugeMetricFamily("gateway_queue_length", "Requests waiting for a worker slot")
        ql.add_metric([], svc.queue_length)
        yield ql
        stats = svc.dispatch_statistics()
        repeated = CounterMetricFamily(
            "gateway_attempts_repeated", "Requests sent again to another worker, from the "
            "retry budget: retry (failed before any answer, or 503), hedge (stuck on a stalled "
            "or slow worker)", labels=["kind"])
        repeated.add_metric(["retry"], stats.get("retries", 0.0))
        repeated.add_metric(["hedge"], stats.get("hedges", 0.0))
        yield repeated
        won = CounterMetricFamily("gateway_hedges_won", "Hedges whose answer came first")
        won.add_metric([], stats.get("hedges_won", 0.0))
        yield won
        stalls = CounterMetricFamily("gateway_worker_stalls", "Times a worker was found "
                                     "stalled (gateway_worker_stalled)")
        stalls.add_metric([], stats.get("stalls", 0.0))
        yield stalls
        cluster = svc.cluster()
        members = GaugeMetricFamily("gateway_cluster_members", "Gateway replicas sharing the "
                                    "fleet, this one included (1: alone)")
        share = GaugeMetricFamily("gateway_cluster_share", "This replica's part of the "
                                  "fleet's concurrency budget (1: alone)")
        healthy = GaugeMetricFamily("gateway_cluster_coordinated", "1 while the replicas' "
                                    "exchange answers (or the gateway is alone), 0 while it "
                                    "serves on its last known share")
        members.add_metric([], float(cluster["members"]) if cluster else 1.0)  # type: ignore[arg-type]
        share.add_metric([], float(cluster["share"]) if cluster else 1.0)  # type: ignore[arg-type]
        healthy.add_metric([], 0.0 if cluster and not cluster["healthy"] else 1.0)
        yield members
        yield share
        yield healthy
        lag = GaugeMetricFamily("gateway_event_loop_lag_seconds",
                                "How late the gateway's event loop runs (recent, decayed): "
                                "the intake delay each request's deadline already counts")
        lag.add_metric([], svc.loop_lag_s())
        yield lag
        arrival = GaugeMetricFamily("gateway_arrival_rate_per_s", "Arrival rate (decayed)",
                                    labels=["model"])
        desired = GaugeMetricFamily("gateway_desired_replicas", "Replicas needed now "
                                    "(reactive) and one lead time ahead (predictive)",
                                    labels=["model", "mode"])
        fill = GaugeMetricFamily("gateway_batch_fill_ratio", "Last batch size / batch limit",
                                 labels=["model"])
        for name, mc in list(t.models.items()):
            arrival.add_metric([name], mc.arrival_meter.rate(now))
            r, p = t.desired_replicas(name, now)
            desired.add_metric([name, "reactive"], r)
            desired.add_metric([name, "predictive"], p)
        for name, ratio in t.batch_fill.items():
            fill.add_metric([name], ratio)
        yield arrival
        yield desired
        yield fill
        yield from _fair_share_families(svc)


def _fair_share_families(svc: GatewayState) -> Iterator[Metric]:
    """Per tenant (configured tenants and ``(anonymous)``: bounded by the configuration):
    GPU-seconds settled, recent share, queueing delay; Jain's index over active tenants."""
    fair = svc.fair_share()
    gpu = CounterMetricFamily("gateway_tenant_gpu_seconds", "GPU-seconds of the tenant's "
                              "completed requests (learned cost per worker, model and batch "
                              "bucket)", labels=["tenant"])
    done = CounterMetricFamily("gateway_tenant_requests_settled", "Completed requests "
                               "charged to the tenant", labels=["tenant"])
    queued = CounterMetricFamily("gateway_tenant_queue_wait_seconds", "Time the tenant's "
                                 "completed requests waited for a worker slot",
                                 labels=["tenant"])
    share = GaugeMetricFamily("gateway_tenant_gpu_share", "The tenant's share of the recent "
                              "GPU-seconds of all tenants (decayed, half-life 10 s)",
                              labels=["tenant"])
    weight = GaugeMetricFamily("gateway_tenant_weight", "admission.tenants.<name>.weight",
                               labels=["tenant"])
    for ts in fair.tenants:
        gpu.add_metric([ts.tenant], ts.gpu_s)
        done.add_metric([ts.tenant], ts.requests)
        queued.add_metric([ts.tenant], ts.queued_s)
        share.add_metric([ts.tenant], ts.share)
        weight.add_metric([ts.tenant], ts.weight)
    jain = GaugeMetricFamily("gateway_fairness_jain_index", "Jain's fairness index of the "
                             "active tenants' recent GPU-seconds over their weights (1 = "
                             "shares in proportion to weights; 1/n = one tenant has it all)")
    jain.add_metric([], fair.jain_index)
    yield from (gpu, done, queued, share, weight, jain)


def log_breaker_transition(t: BreakerTransition) -> None:
    """One line per breaker state change; an opening is a WARNING."""
    if t.new is BreakerState.OPEN:
        verb = "re-opened" if t.old is BreakerState.HALF_OPEN else "opened"
        breaker_log.warning("breaker of worker %s %s: %s; ejected for %.1f s (opening #%d in "
                            "a row)", t.worker, verb, t.detail, t.open_for_s or 0.0, t.opening)
    elif t.new is BreakerState.HALF_OPEN:
        breaker_log.info("breaker of worker %s half-open: %s", t.worker, t.detail)
    else:
        breaker_log.info("breaker of worker %s closed: %s", t.worker, t.detail)
