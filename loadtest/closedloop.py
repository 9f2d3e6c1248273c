"""The closed scaling loop with the real gateway in it (issue 23, item 2): the pieces.

``python -m loadtest.autoscale`` runs it (the command, the defaults and what it reports are
there). This module holds the parts, each usable alone (the drain-before-remove test uses
them without the trace):

* :class:`SimWorker` — one simulated Triton worker (``python -m gateway sim --workers 1``), its
  own process, so a worker can be added and removed alone; started ahead in a pool, because
  a Python process takes longer to start than a compressed warm-up lasts;
* :class:`Fleet` — the workers the scaler owns: ordered (paid from the order), warming,
  in the gateway's config once warm, draining through the gateway, stopped only once the
  gateway has let them go (its ``/metrics`` no longer lists them: nothing in flight there);
* :func:`scrape` — the gateway's ``/metrics``, read as the shipped manifests query it;
* :class:`OpenLoop` — Poisson arrivals at a rate that follows a function of time, each request
  with a deadline header, over a keep-alive connection pool; every answer recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import SimProcess

REPO = Path(__file__).resolve().parents[1]
INFER_PATH = "/v2/models/simple/infer"
INFER_BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                     "data": [1.0] * 16}]}).encode()
ANSWER_TIMEOUT_S = 30.0
# What a lost request looks like: no answer at all, or a worker's failure passed on. The
# gateway's own refusals (429, 503, 504: overload, deadline) are refusals, counted apart.
LOST_STATUSES = frozenset({0, 500, 502})


# ------------------------------------------------------------------------- the workers

class SimWorker(SimProcess):
    """One simulated worker in its own process, started at once; ``wait`` for its port."""

    def __init__(self, *, slots: int, service_ms: float, service_dist: str = "fixed",
                 seed: int = 0) -> None:
        super().__init__(1, slots=slots, base_ms=service_ms, with_control=False,
                         extra=["--service-dist", service_dist, "--seed", str(seed)])
        self.spawn()

    def wait(self, timeout_s: float = 60.0) -> SimWorker:
        self.wait_started(timeout_s)
        return self

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def id(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"


@dataclass
class Replica:
    sim: SimWorker
    ordered_at: float          # real seconds on the run's clock
    ready_at: float
    in_config: bool = False
    draining_since: float | None = None
    stopped_at: float | None = None


@dataclass
class FleetEvent:
    at: float
    what: str                  # order, ready, cancel, drain, gone
    worker: str
    in_flight: int = 0


class Fleet:
    """The scaler's workers in front of one gateway. ``size`` is what the Deployment has
    (ordered, warming or ready, not draining); GPU time counts from the order to the stop."""

    def __init__(self, gateway: GatewayProcess, *, slots: int, service_ms: float,
                 warmup_s: float, spares: int, clock: Callable[[], float],
                 service_dist: str = "fixed", seed: int = 0) -> None:
        self.gateway = gateway
        self.slots, self.service_ms, self.warmup_s = slots, service_ms, warmup_s
        self.service_dist = service_dist
        self._seeds = itertools.count(seed * 100_003)   # each worker its own RNG stream
        self.clock = clock
        self.spares = spares
        self.pool: list[SimWorker] = [self._spawn() for _ in range(spares)]
        self.replicas: list[Replica] = []
        self.events: list[FleetEvent] = []

    def start_ready(self, count: int) -> list[str]:
        """``count`` workers ready from the start (the fleet before the replay); their URLs."""
        for _ in range(count):
            sim = self._take()
            now = self.clock()
            self.replicas.append(Replica(sim, now, now, in_config=True))
        return [r.sim.url for r in self.replicas]

    def _take(self) -> SimWorker:
        """The oldest spare (started first, so the first to listen), replaced when fewer than
        ``spares`` are left (cancelled workers come back to the pool)."""
        sim = self.pool.pop(0).wait()
        if len(self.pool) < self.spares:
            self.pool.append(self._spawn())
        return sim

    def _spawn(self) -> SimWorker:
        return SimWorker(slots=self.slots, service_ms=self.service_ms,
                         service_dist=self.service_dist, seed=next(self._seeds))

    @property
    def active(self) -> list[Replica]:
        return [r for r in self.replicas if r.draining_since is None and r.stopped_at is None]

    @property
    def size(self) -> int:
        return len(self.active)

    @property
    def ready(self) -> int:
        return sum(r.in_config for r in self.active)

    def order(self, count: int) -> None:
        now = self.clock()
        for _ in range(count):
            r = Replica(self._take(), now, now + self.warmup_s)
            self.replicas.append(r)
            self.events.append(FleetEvent(now, "order", r.sim.id))

    def promote(self) -> bool:
        """Warm workers into the gateway's config; True when the config changed."""
        now = self.clock()
        warm = [r for r in self.active if not r.in_config and r.ready_at <= now]
        for r in warm:
            r.in_config = True
            self.events.append(FleetEvent(now, "ready", r.sim.id))
        if warm:
            self.apply()
        return bool(warm)

    def remove(self, count: int, in_flight: dict[str, int]) -> None:
        """Take ``count`` workers away, freeing whole workers soonest: a warming worker first
        (never in the config: stopped at once, newest order first), then the ready workers
        with the fewest requests in flight (drained through the gateway)."""
        now = self.clock()
        warming = sorted((r for r in self.active if not r.in_config),
                         key=lambda r: -r.ordered_at)
        ready = sorted((r for r in self.active if r.in_config),
                       key=lambda r: (in_flight.get(r.sim.id, 0), -r.ordered_at))
        drained = False
        for r in (warming + ready)[:count]:
            if r.in_config:
                r.draining_since = now
                r.in_config = False
                drained = True
                self.events.append(FleetEvent(now, "drain", r.sim.id,
                                              in_flight.get(r.sim.id, 0)))
            else:
                # Never in the config, never served: its process goes back to the pool (a
                # fresh one would cost the machine a Python start-up).
                r.stopped_at = now
                self.pool.append(r.sim)
                self.events.append(FleetEvent(now, "cancel", r.sim.id))
        if drained:
            self.apply()

    def reap(self, listed: set[str]) -> None:
        """Stop the draining workers the gateway no longer lists (drained, gone)."""
        now = self.clock()
        for r in self.replicas:
            if r.draining_since is not None and r.stopped_at is None and r.sim.id not in listed:
                r.stopped_at = now
                r.sim.stop()
                self.events.append(FleetEvent(now, "gone", r.sim.id))

    def apply(self) -> None:
        """The gateway's config with the workers in it; SIGHUP re-reads it (a worker left out
        drains: no new requests, those in flight finish)."""
        cfg = dict(self.gateway.config)
        cfg["workers"] = [{"url": r.sim.url} for r in self.replicas if r.in_config]
        self.gateway.write_config(cfg)
        self.gateway.signal(signal.SIGHUP)

    def gpu_seconds(self, start: float, end: float) -> float:
        """Worker-seconds paid within [start, end]: from each order to its stop."""
        total = 0.0
        for r in self.replicas:
            lo, hi = max(start, r.ordered_at), min(end, r.stopped_at or end)
            total += max(0.0, hi - lo)
        return total

    def stop(self) -> None:
        for r in self.replicas:
            if r.stopped_at is None:
                r.sim.stop()
        for sim in self.pool:
            sim.stop()


# ---------------------------------------------------------------------- the gateway's view

_SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Scrape:
    desired: dict[str, float]          # mode → max over models (what the manifests query)
    in_flight: dict[str, int]          # worker id → in flight
    ready: dict[str, bool]


def parse_metrics(text: str) -> Scrape:
    desired: dict[str, float] = {}
    in_flight: dict[str, int] = {}
    ready: dict[str, bool] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2) or "")), m.group(3)
        if name == "gateway_desired_replicas":
            mode = labels.get("mode", "")
            desired[mode] = max(desired.get(mode, 0.0), float(value))
        elif name == "gateway_worker_in_flight":
            in_flight[labels["worker"]] = int(float(value))
        elif name == "gateway_worker_ready":
            ready[labels["worker"]] = float(value) > 0
    return Scrape(desired, in_flight, ready)


def _ready_count(base_url: str) -> int:
    try:
        return sum(scrape(base_url).ready.values())
    except OSError:
        return -1


def scrape(base_url: str, timeout_s: float = 2.0) -> Scrape:
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as resp:
        return parse_metrics(resp.read().decode())


# --------------------------------------------------------------------------- the load

@dataclass(slots=True)
class Answer:
    sent_at: float             # real seconds on the run's clock
    status: int                # 0: no answer
    latency_s: float


@dataclass
class OpenLoop:
    """Poisson arrivals at ``rate(t)`` req/s (``t`` on the run's clock) from ``start`` to
    ``end``, each with ``X-Request-Timeout-Ms``; keep-alive connections reused."""

    port: int
    rate: Callable[[float], float]
    clock: Callable[[], float]
    deadline_ms: int
    seed: int = 1
    answers: list[Answer] = field(default_factory=list)
    max_lag_s: float = 0.0
    retried_stale: int = 0     # requests sent again after a stale keep-alive connection

    def _request(self) -> bytes:
        head = (f"POST {INFER_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(INFER_BODY)}\r\n"
                f"X-Request-Timeout-Ms: {self.deadline_ms}\r\n\r\n")
        return head.encode() + INFER_BODY

    async def run(self, start: float, end: float) -> None:
        rng = random.Random(self.seed)
        payload = self._request()
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        tasks: set[asyncio.Task[None]] = set()

        async def one(sent_at: float) -> None:
            status = 0
            conn = None
            # A kept-alive connection the server closed while idle fails before any answer
            # byte: tried again once on a new connection, as HTTP clients do. The newest idle
            # connection is taken first, so the oldest age out rather than fail often.
            for reused in (bool(idle), False):
                conn = idle.pop() if reused else None
                try:
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", self.port)
                    reader, writer = conn
                    writer.write(payload)
                    status = await asyncio.wait_for(_read_status(reader), ANSWER_TIMEOUT_S)
                    break
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    stale = isinstance(exc, ConnectionError) or (
                        isinstance(exc, asyncio.IncompleteReadError) and not exc.partial)
                    if not (reused and stale):
                        break
                    self.retried_stale += 1
            self.answers.append(Answer(sent_at, status, self.clock() - sent_at))
            if conn is not None:
                idle.append(conn)

        t = start
        while True:
            rate = max(1e-3, self.rate(t))
            t += rng.expovariate(rate)
            if t >= end:
                break
            wait = t - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                self.max_lag_s = max(self.max_lag_s, -wait)
            task = asyncio.ensure_future(one(self.clock()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for _, writer in idle:
            writer.close()


async def _read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def gateway_config(worker_urls: list[str], **capacity: Any) -> dict[str, Any]:
    """The gateway in front of the loop's workers: fast probes (a warm worker serves within a
    probe or two), one slot per worker (the replay's M/M/c replica), capacity as given."""
    return {
        "workers": [{"url": u} for u in worker_urls],
        "health": {"interval_s": 0.05, "timeout_s": 0.5, "rise": 1, "fall": 3},
        "scrape": {"interval_s": 0.25, "timeout_s": 0.5, "stale_after_s": 2.0},
        "upstream": {"default_slots": 1},
        "capacity": capacity,
    }


# ----------------------------------------------------------------------------- the run

TRACE = REPO / "loadtest" / "data" / "azure_v2_cpu.csv"
MINUTES_PER_DAY = 1440
SYNC_S = 15.0                 # the HPA's sync period, in trace seconds
MIN_SYNC_REAL_S = 0.1
LEAD_IN_MIN = 60              # trace minutes of the day before, replayed first, not counted
# The scaler starts this far into the lead-in, the fleet held at its first size until then:
# the gateway's averaged signals start from nothing (no traffic before the lead-in) and need a
# few half-lives of it (under compression at least 1 real second each, five trace minutes at
# 300x) before they read the load. A scaler reading them cold would take a fleet sized for the
# load for an idle one and shrink it, in every mode.
SCALER_START_MIN = 30
MAX_REPLICAS = 40
MIN_REPLICAS = 2
REDUNDANCY = 1
HISTORY_STEP_S = 300.0


@dataclass(frozen=True, slots=True)
class LoopParams:
    mode: str
    day: int = 28
    history_days: int = 14
    peak_rps: float = 200.0
    time_scale: float = 300.0
    startup_min: int = 10
    target_utilisation: float = 0.85
    service_ms: float = 50.0
    service_dist: str = "fixed"     # the workers' service times: fixed or exponential (M/M/c)
    p99_budget_ms: float = 200.0
    deadline_ms: int = 2000
    hours: float = 24.0
    start_hour: float = 0.0
    seed: int = 1

    @property
    def first_minute(self) -> int:
        """The replay's first minute, as an index into the per-minute trace."""
        return self.day * MINUTES_PER_DAY + round(self.start_hour * 60)


def _history_csv(minutes: Any, first: int, day_start: int, t0_capacity_s: float) -> str:
    rows = ["# the days before the replayed one, on the gateway's capacity clock",
            "time_s,rate"]
    for i in range(first, day_start):
        rows.append(f"{t0_capacity_s + (i - day_start) * 60.0:.3f},{float(minutes[i]):.4f}")
    return "\n".join(rows) + "\n"


def run_loop(p: LoopParams, minutes: Any, workdir: Path) -> dict[str, Any]:
    """One mode over ``p.hours`` of day ``p.day`` of the per-minute trace ``minutes``, from
    ``p.start_hour``; the forecaster's history runs up to that hour."""
    import numpy as np

    from gateway.core.capacity import predictive_desired_replicas
    from loadtest.autoscale import HpaRules, HpaState, hpa_step

    scale = p.time_scale
    per_replica_rps = 1000.0 / p.service_ms
    day_start = p.day * MINUTES_PER_DAY
    replay_start = p.first_minute
    n_min = round(p.hours * 60)
    lead_in_s = LEAD_IN_MIN * 60.0 / scale
    end_s = n_min * 60.0 / scale
    warmup_s = p.startup_min * 60.0 / scale
    grid = np.arange(len(minutes), dtype=np.float64)

    def rate(t: float) -> float:
        return float(np.interp(replay_start + t * scale / 60.0, grid, minutes))

    initial = predictive_desired_replicas(rate(-lead_in_s), per_replica_rps,
                                          p.target_utilisation, REDUNDANCY, MIN_REPLICAS,
                                          MAX_REPLICAS)
    t0 = [0.0]

    def clock() -> float:
        return time.monotonic() - t0[0]

    gw = GatewayProcess({}, workdir)
    fleet = Fleet(gw, slots=1, service_ms=p.service_ms, warmup_s=warmup_s, spares=6,
                  clock=clock, service_dist=p.service_dist, seed=p.seed)
    try:
        urls = fleet.start_ready(initial)
        for r in fleet.replicas:
            r.sim.wait()
        for sim in fleet.pool:
            sim.wait()
        urls = [r.sim.url for r in fleet.replicas]
        # The replayed day starts this far ahead: the gateway starts, then the lead-in.
        t0[0] = time.monotonic() + 8.0 + lead_in_s
        t0_wall = time.time() + (t0[0] - time.monotonic())
        for r in fleet.replicas:        # the fleet before the replay: on the run's clock
            r.ordered_at = r.ready_at = clock()
        history = workdir / "history.csv"
        first = max(0, day_start - p.history_days * MINUTES_PER_DAY)
        history.write_text(_history_csv(minutes, first, replay_start, t0_wall * scale))
        gw.write_config(gateway_config(
            urls, target_utilisation=p.target_utilisation, redundancy=REDUNDANCY,
            lead_time_s=(p.startup_min + 1) * 60.0, history_step_s=HISTORY_STEP_S,
            history_max_points=20160, min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS,
            time_scale=scale, history_file=str(history)))
        gw.start()
        procs.wait_until(lambda: _ready_count(gw.url) == initial, 30.0, proc=gw.proc,
                         what=f"{initial} workers ready")
        if clock() > -lead_in_s:
            raise RuntimeError("setup took longer than its allowance; the history would not "
                               "line up with the replay")
        rules = HpaRules(min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS)
        samples: list[dict[str, float]] = []
        stop = threading.Event()
        errors: list[BaseException] = []
        failed_scrapes = [0]

        def scaler() -> None:
            state = HpaState()
            sync_s = max(MIN_SYNC_REAL_S, SYNC_S / scale)
            next_at = -lead_in_s + SCALER_START_MIN * 60.0 / scale
            try:
                while not stop.is_set():
                    wait = next_at - clock()
                    if wait > 0:
                        time.sleep(wait)
                    next_at += sync_s
                    now = clock()
                    try:
                        s = scrape(gw.url)
                    except OSError:
                        failed_scrapes[0] += 1   # HPA too skips a sync without its metric
                        continue
                    fleet.reap(set(s.in_flight))
                    fleet.promote()
                    metric = s.desired.get(p.mode, float("nan"))
                    d = hpa_step(state, now * scale, metric, fleet.size, rules)
                    state = d.state
                    if d.desired > fleet.size:
                        fleet.order(d.desired - fleet.size)
                    elif d.desired < fleet.size:
                        fleet.remove(fleet.size - d.desired, s.in_flight)
                    samples.append({"t": now, "metric": metric, "desired": d.desired,
                                    "size": fleet.size, "ready": fleet.ready})
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=scaler, daemon=True)
        thread.start()
        load = OpenLoop(gw.port, rate, clock, p.deadline_ms, seed=p.seed)
        asyncio.run(load.run(-lead_in_s, end_s))
        stop.set()
        thread.join(10)
        if errors:
            raise errors[0]
        gpu_s = fleet.gpu_seconds(0.0, end_s)
        events = [e for e in fleet.events if e.at >= 0]
    finally:
        gw.stop()
        fleet.stop()
    result = summarise(p, load, samples, events, gpu_s, n_min,
                       lambda m: float(minutes[replay_start + m]))
    result["failed_scrapes"] = failed_scrapes[0]
    return result


def summarise(p: LoopParams, load: OpenLoop, samples: list[dict[str, float]],
              events: list[FleetEvent], gpu_s: float, n_min: int,
              demand: Callable[[int], float]) -> dict[str, Any]:
    import numpy as np

    per_min_s = 60.0 / p.time_scale
    latencies: list[list[float]] = [[] for _ in range(n_min)]
    counts = [0] * n_min
    refused = [0] * n_min
    lost = [0] * n_min
    statuses: dict[str, int] = {}
    for a in load.answers:
        if a.sent_at < 0:
            continue
        m = min(n_min - 1, int(a.sent_at / per_min_s))
        counts[m] += 1
        statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
        if a.status == 200:
            latencies[m].append(a.latency_s)
        elif a.status in LOST_STATUSES:
            lost[m] += 1
        else:
            refused[m] += 1
    timeline = []
    over = 0
    si = 0
    ready = samples[0]["ready"] if samples else 0.0
    desired = samples[0]["desired"] if samples else 0.0
    for m in range(n_min):
        while si < len(samples) and samples[si]["t"] < (m + 1) * per_min_s:
            ready, desired = samples[si]["ready"], samples[si]["desired"]
            si += 1
        p99_ms = float(np.percentile(latencies[m], 99)) * 1000 if latencies[m] else 0.0
        bad_share = (refused[m] + lost[m]) / counts[m] if counts[m] else 0.0
        is_over = p99_ms > p.p99_budget_ms or bad_share > 0.01
        over += is_over
        timeline.append({"minute": m, "demand_rps": round(demand(m), 2),
                         "offered_rps": round(counts[m] / per_min_s, 1), "ready": ready,
                         "desired": desired, "p99_ms": round(p99_ms, 1),
                         "refused": refused[m], "lost": lost[m], "over": is_over})
    total = sum(counts)
    return {
        "mode": p.mode, "params": {k: getattr(p, k) for k in p.__dataclass_fields__},
        "over_budget_minutes": over, "minutes": n_min,
        "gpu_hours": round(gpu_s * p.time_scale / 3600.0, 2),
        "requests": total, "refused": sum(refused), "lost": sum(lost),
        "statuses": statuses, "generator_max_lag_ms": round(load.max_lag_s * 1000, 1),
        "retried_on_stale_connection": load.retried_stale,
        "peak_replicas": max((s["size"] for s in samples), default=0),
        "orders": sum(e.what == "order" for e in events),
        "drains": [{"at_min": round(e.at / per_min_s, 1), "worker": e.worker,
                    "in_flight": e.in_flight} for e in events if e.what == "drain"],
        "cancelled_while_warming": sum(e.what == "cancel" for e in events),
        "timeline": timeline,
    }


def replay_gpu_hours(minutes: Any, p: LoopParams) -> dict[str, float]:
    """The analytical replay (loadtest.replay) of the same minutes: GPU-hours and over-budget
    minutes per mode, the same target, warm-up and history."""
    from loadtest import replay

    replay.TARGET_UTILISATION = p.target_utilisation
    replay.PER_REPLICA_RPS = 1000.0 / p.service_ms
    n_min = round(p.hours * 60)
    start = p.first_minute
    first = max(0, p.day * MINUTES_PER_DAY - p.history_days * MINUTES_PER_DAY)
    today = minutes[start: start + n_min]
    history = minutes[first:start]
    out: dict[str, float] = {}
    reactive = replay.simulate(today, replay.reactive_policy(), p.startup_min, "reactive")
    predictive, _ = replay.predictive_policy(history, start * 60.0, p.startup_min)
    pred = replay.simulate(today, predictive, p.startup_min, "predictive")
    for r in (reactive, pred):
        out[f"{r.mode}_gpu_hours"] = round(r.gpu_hours, 2)
        out[f"{r.mode}_over_budget_minutes"] = r.over_budget_minutes
    return out


def render(report: dict[str, Any]) -> str:
    lines = [f"{'mode':<12}{'over-budget min':>16}{'GPU-h':>8}{'replay GPU-h':>14}"
             f"{'loop/replay':>12}{'lost':>6}{'refused':>9}{'requests':>10}{'drains':>8}"]
    for name, m in sorted(report["modes"].items()):
        rep = m.get("replay", {}).get(f"{name}_gpu_hours")
        ratio = f"{m['gpu_hours'] / rep:.3f}" if rep else "-"
        lines.append(f"{name:<12}{m['over_budget_minutes']:>16}{m['gpu_hours']:>8.1f}"
                     f"{(rep or 0):>14.1f}{ratio:>12}{m['lost']:>6}{m['refused']:>9}"
                     f"{m['requests']:>10}{len(m['drains']):>8}")
    cmp_ = report.get("predictive_vs_reactive")
    if cmp_:
        lines.append(f"predictive vs reactive: {cmp_['over_budget_minutes_fewer']:.0%} fewer "
                     f"over-budget minutes, {cmp_['gpu_hours_more']:+.1%} GPU-hours "
                     "(target ≥ 50 % fewer at ≤ +5 %)")
    return "\n".join(lines)


def compare(report: dict[str, Any]) -> None:
    modes = report["modes"]
    if "reactive" in modes and "predictive" in modes:
        r, p = modes["reactive"], modes["predictive"]
        fewer = (1 - p["over_budget_minutes"] / r["over_budget_minutes"]
                 if r["over_budget_minutes"] else 0.0)
        report["predictive_vs_reactive"] = {
            "over_budget_minutes_fewer": fewer,
            "gpu_hours_more": p["gpu_hours"] / r["gpu_hours"] - 1}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    colours = {"reactive": "tab:red", "predictive": "tab:blue"}
    demand_drawn = False
    right = top.twinx()
    budget = 0.0
    for name, m in sorted(report["modes"].items()):
        tl = m["timeline"]
        start_h = m["params"].get("start_hour", 0.0)
        hours = [start_h + row["minute"] / 60 for row in tl]
        if not demand_drawn:
            top.plot(hours, [row["demand_rps"] for row in tl], color="grey", lw=1,
                     label="demand (req/s)")
            demand_drawn = True
        right.step(hours, [row["ready"] for row in tl], where="post",
                   color=colours.get(name, "k"), lw=1.2, label=f"ready replicas, {name}")
        bottom.plot(hours, [row["p99_ms"] for row in tl], color=colours.get(name, "k"),
                    lw=0.8, label=f"p99, {name} ({m['over_budget_minutes']} min over)")
        budget = m["params"]["p99_budget_ms"]
    top.set_ylabel("demand, req/s")
    right.set_ylabel("ready replicas")
    handles = top.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    top.legend(handles, [str(h.get_label()) for h in handles], loc="upper left", fontsize=8)
    bottom.axhline(budget, color="k", ls="--", lw=0.8, label=f"budget {budget:g} ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 per trace minute, ms")
    bottom.set_xlabel("hour of the replayed day (trace time)")
    bottom.legend(loc="upper left", fontsize=8)
    params = next(iter(report["modes"].values()))["params"]
    span = ""
    if params.get("start_hour", 0.0) or params["hours"] < 24:
        start_h = params.get("start_hour", 0.0)
        span = f" {start_h:g}–{start_h + params['hours']:g} h"
    top.set_title(f"Closed loop through the real gateway: day {params['day']}{span}, peak "
                  f"{params['peak_rps']:g} req/s, warm-up {params['startup_min']} min, target "
                  f"{params['target_utilisation']}, {params['time_scale']:g}x time"
                  + (", exponential service" if params.get("service_dist") == "exponential"
                     else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from loadtest import autoscale
    from loadtest.trace import TraceError, per_minute, read_trace

    parser = argparse.ArgumentParser(prog="python -m loadtest.autoscale",
                                     description=autoscale.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LoopParams("reactive")
    parser.add_argument("--mode", action="append", choices=("reactive", "predictive"),
                        help="the gateway_desired_replicas mode the scaler reads "
                        "(repeatable; default both, one after the other)")
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--column", default="cpu_usage")
    parser.add_argument("--peak-rps", type=float, default=d.peak_rps)
    parser.add_argument("--day", type=int, default=d.day)
    parser.add_argument("--history-days", type=int, default=d.history_days)
    parser.add_argument("--hours", type=float, default=d.hours,
                        help="replay only HOURS of the day (from --start-hour)")
    parser.add_argument("--start-hour", type=float, default=d.start_hour,
                        help="start the replay at this hour of the day (the forecaster's "
                        "history then runs up to it; an hour before it is the lead-in)")
    parser.add_argument("--time-scale", type=float, default=d.time_scale)
    parser.add_argument("--startup-min", type=int, default=d.startup_min)
    parser.add_argument("--target-utilisation", type=float, default=d.target_utilisation)
    parser.add_argument("--service-ms", type=float, default=d.service_ms)
    parser.add_argument("--service-dist", choices=("fixed", "exponential"),
                        default=d.service_dist,
                        help="the simulated workers' service times: fixed (every request "
                        "--service-ms) or exponential with that mean (the replay's M/M/c)")
    parser.add_argument("--p99-budget-ms", type=float, default=d.p99_budget_ms,
                        help="a trace minute is over budget when its p99 exceeds this")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", default="results/autoscale.json")
    parser.add_argument("--plot", default="results/autoscale.png")
    args = parser.parse_args(argv)
    if not (args.start_hour >= 0 and args.hours > 0 and args.start_hour + args.hours <= 24):
        parser.error("--start-hour and --hours must lie within the day (0 <= start, "
                     "start + hours <= 24)")
    try:
        minutes = per_minute(read_trace(args.trace, args.column, args.peak_rps))
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.json)
    report: dict[str, Any] = {"modes": {}}
    if out.exists():
        report = json.loads(out.read_text())
    for mode in args.mode or ["reactive", "predictive"]:
        p = LoopParams(mode, day=args.day, history_days=args.history_days,
                       peak_rps=args.peak_rps, time_scale=args.time_scale,
                       startup_min=args.startup_min,
                       target_utilisation=args.target_utilisation,
                       service_ms=args.service_ms, service_dist=args.service_dist,
                       p99_budget_ms=args.p99_budget_ms, hours=args.hours,
                       start_hour=args.start_hour, seed=args.seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_loop(p, minutes, Path(tmp))
        result["replay"] = replay_gpu_hours(minutes, p)
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        report["modes"][mode] = result
        compare(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(render(report), flush=True)
    plot(report, Path(args.plot))
    print(f"wrote {out} and {args.plot}")
    return 0
