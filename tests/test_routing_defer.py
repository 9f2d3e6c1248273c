"""Routing core, waiting for a faster worker: when the best free worker is clearly slower
than waiting in the gateway's queue for a slot of a faster, full one, the decision is
``NoRoute(saturated=True)`` (the shell queues it). Tables with time as an argument, and an
open-loop event simulation of the shell's queue (woken on each completion, as
``gateway.engine.dispatch`` does) that checks a deferred request is served and never starved."""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from dataclasses import replace

import pytest

from gateway.core import routing
from gateway.core.config import RoutingConfig, WeightsConfig
from gateway.core.routing import InFlightCounters, Router, RoutingTable, ServiceTimes
from gateway.core.types import ModelKey, ModelSignal, NoRoute, Route, WorkerSignals, WorkerSnapshot

M = ModelKey("m")


def worker(wid: str, *, slots: int = 4, capacity: int = 4, priority: int = 0,
           models: tuple[str, ...] = ("m",)) -> WorkerSnapshot:
    return WorkerSnapshot(id=wid, pool_priority=priority, ready=True,
                          models_ready=frozenset(models), slots=slots, in_flight=0,
                          in_flight_model=0, signals=None, breaker_allows=True,
                          capacity_units=capacity)


def router(policy: str = "load_aware", picker: str = "full_scan", seed: int = 1,
           **cfg: object) -> Router:
    return Router(RoutingConfig(policy=policy, picker=picker, **cfg),  # type: ignore[arg-type]
                  rng=random.Random(seed))


def fill(load: InFlightCounters, wid: str, n: int, model: str = "m") -> None:
    for _ in range(n):
        load.begin(wid, model)


def measured(now: float = 0.0, **service_s: float) -> ServiceTimes:
    st = ServiceTimes()
    for wid, s in service_s.items():
        st.observe(wid, "m", s, now)
    return st


# fast: 20 ms, 4 slots, full; slow: 80 ms, free. Waiting for fast: 20 × (1 + 1/4) = 25 ms
# plus 3 × the queue's wait, against 80 ms on the free slow worker (deferred when 1.5 ×
# less).
@pytest.mark.parametrize(("case", "queue_wait_s", "last_done_s", "slow_s", "fast_model",
                          "deferred"), [
    ("waiting is clearly sooner", 0.0, 0.005, 0.080, "m", True),
    ("the queue is short enough", 0.005, 0.005, 0.080, "m", True),     # 40 × 1.5 < 80
    ("the queue would take longer", 0.010, 0.005, 0.080, "m", False),  # 55 × 1.5 > 80
    ("only a little slower", 0.0, 0.005, 0.035, "m", False),           # 25 × 1.5 > 35
    ("fast not seen completing", 0.0, 0.045, 0.080, "m", False),       # 45 ms > 2 × 20
    ("fast full of another model", 0.0, 0.005, 0.080, "x", False),
])
def test_defer_table(case: str, queue_wait_s: float, last_done_s: float, slow_s: float,
                     fast_model: str, deferred: bool) -> None:
    now = 1.0
    table = RoutingTable([worker("fast"), worker("slow")])
    st = measured(now - last_done_s, fast=0.020)
    st.observe("slow", "m", slow_s, now)
    load = InFlightCounters()
    fill(load, "fast", 4, fast_model)
    d = router().decide(table, M, load, service=st, now=now, queue_wait_s=queue_wait_s)
    if deferred:
        assert isinstance(d, NoRoute) and d.saturated, case
        assert d.reason.startswith("deferred: fast"), d.reason
    else:
        assert isinstance(d, Route) and d.worker == "slow", case


@pytest.mark.parametrize(("case", "table", "st", "cfg"), [
    ("fast never measured (cold)", [worker("fast"), worker("slow")],
     {"slow": 0.080}, {}),
    ("the free worker is cold: its probe goes", [worker("fast"), worker("slow")],
     {"fast": 0.020}, {}),
    ("no expected-latency weight", [worker("fast"), worker("slow")],
     {"fast": 0.020, "slow": 0.080}, {"weights": WeightsConfig(expected_latency=0.0)}),
    ("least in-flight baseline", [worker("fast"), worker("slow")],
     {"fast": 0.020, "slow": 0.080}, {"policy": "least_inflight"}),
    ("packing", [worker("fast"), worker("slow")],
     {"fast": 0.020, "slow": 0.080}, {"pack": True}),
    ("fast in a preferred pool: spill-over stays the pools' rule",
     [worker("fast"), worker("slow", priority=1)], {"fast": 0.020, "slow": 0.080}, {}),
])
def test_no_deferral(case: str, table: list[WorkerSnapshot], st: dict[str, float],
                     cfg: dict[str, object]) -> None:
    load = InFlightCounters()
    fill(load, "fast", 4)
    r = Router(RoutingConfig(**{"policy": "load_aware", "picker": "full_scan", **cfg}),  # type: ignore[arg-type]
               rng=random.Random(1))
    d = r.decide(RoutingTable(table), M, load, service=measured(**st), now=0.001)
    assert isinstance(d, Route) and d.worker == "slow", case


@pytest.mark.parametrize(("fast_slots", "fast_in_flight", "capacity", "slow_s", "deferred"), [
    (4, 4, 4, 0.035, False),   # 20 × 5/4 = 25 ms; × 1.5 = 37.5 > 35
    (4, 4, 4, 0.040, True),
    (8, 8, 4, 0.060, False),   # 20 × 9/4 = 45 ms: the 4 queued inside count; × 1.5 = 67.5
    (8, 8, 4, 0.070, True),
    (2, 2, 4, 0.040, False),   # at its slots with units free: one of 2 ends, 20 × 1.5 = 30
    (2, 2, 4, 0.050, True),
])
def test_the_wait_for_a_slot_counts_the_work_ahead(fast_slots: int, fast_in_flight: int,
                                                   capacity: int, slow_s: float,
                                                   deferred: bool) -> None:
    table = RoutingTable([worker("fast", slots=fast_slots, capacity=capacity),
                          worker("slow")])
    load = InFlightCounters()
    fill(load, "fast", fast_in_flight)
    d = router().decide(table, M, load, service=measured(fast=0.020, slow=slow_s), now=0.0)
    assert isinstance(d, NoRoute) is deferred


def test_a_deferred_request_takes_the_fast_workers_freed_slot() -> None:
    table = RoutingTable([worker("fast"), worker("slow")])
    load = InFlightCounters()
    fill(load, "fast", 4)
    st = measured(fast=0.020, slow=0.080)
    r = router()
    d = r.decide(table, M, load, service=st, now=0.002)
    assert isinstance(d, NoRoute) and d.saturated
    load.end("fast", "m")                    # a slot of fast frees: the queued one goes
    st.observe("fast", "m", 0.020, 0.010)
    d = r.decide(table, M, load, service=st, now=0.010, queue_wait_s=0.002)
    assert isinstance(d, Route) and d.worker == "fast"
    assert r.statistics().deferred == 1


def test_a_deferral_says_so_and_the_shell_can_decline_it() -> None:
    """A deferral is a NoRoute marked ``deferred`` (a worker is free); with ``defer=False``
    (the queue would not hold the request) the free, slower worker takes it; a fleet that
    is really full is never marked deferred."""
    table = RoutingTable([worker("fast"), worker("slow")])
    load = InFlightCounters()
    fill(load, "fast", 4)
    st = measured(fast=0.020, slow=0.080)
    d = router().decide(table, M, load, service=st, now=0.002)
    assert isinstance(d, NoRoute) and d.saturated and d.deferred
    d = router().decide(table, M, load, service=st, now=0.002, defer=False)
    assert isinstance(d, Route) and d.worker == "slow"
    fill(load, "slow", 4)
    d = router().decide(table, M, load, service=st, now=0.002)
    assert isinstance(d, NoRoute) and d.saturated and not d.deferred


def test_p2c_meets_full_workers_while_drawing_and_stays_bounded() -> None:
    fleet = [worker(f"f{i}") for i in range(100)] + [worker("slow")]
    load = InFlightCounters()
    st = measured(slow=0.080)
    for i in range(100):
        fill(load, f"f{i}", 4)
        st.observe(f"f{i}", "m", 0.020, 0.0)
    r = router(picker="p2c", seed=3)
    table = RoutingTable(fleet)
    outcomes = Counter(type(r.decide(table, M, load, service=st, now=0.001)).__name__
                       for _ in range(200))
    # Drawn: the lone free worker is found by the level scan after the bounded draws; the
    # full fast workers met on the way are where it waits instead.
    assert outcomes["NoRoute"] == 200


# ---------------------------------------------------------------- the shell's queue

def open_loop(policy: str, *, rate_per_s: float, seconds: float = 20.0,
              service_s: tuple[float, ...] = (0.02, 0.02, 0.08),
              slots: int | tuple[int, ...] = 8,
              capacity: int = 4, seed: int = 7) -> tuple[list[float], Counter[str], float]:
    """Poisson arrivals at a gateway in front of workers executing ``capacity`` requests at
    once (FIFO beyond, up to ``slots`` sent). As ``gateway.engine.dispatch`` does: a new request
    is decided at once; a saturated one joins a FIFO queue; each completion wakes the
    queue's head, which is decided again (and keeps its place if deferred again);
    ``queue_wait_s`` = waiters (the head included) over the completion rate, at least
    Little's law over the busy units. Returns sorted latencies (s, from arrival), picks
    per worker, and the longest any request waited in the queue."""
    names = [f"w{i}" for i in range(len(service_s))]
    per_worker = slots if isinstance(slots, tuple) else (slots,) * len(names)
    table = RoutingTable(worker(n, slots=k, capacity=min(k, capacity))
                         for n, k in zip(names, per_worker, strict=True))
    capacity_of = dict(zip(names, (min(k, capacity) for k in per_worker), strict=True))
    r = router(policy=policy, picker="p2c", seed=seed)
    rng = random.Random(seed)
    load, st = InFlightCounters(), ServiceTimes()
    running = dict.fromkeys(names, 0)
    inner: dict[str, deque[tuple[float, float, int]]] = {n: deque() for n in names}
    events: list[tuple[float, int, str, float, float, int]] = []
    queue: deque[float] = deque()
    done_at: deque[float] = deque()
    picks: Counter[str] = Counter()
    latencies: list[float] = []
    longest_wait = 0.0
    seq = 0
    units = sum(min(k, capacity) for k in per_worker)
    fastest = min(service_s)

    def push(at: float, kind: str, arrived: float = 0.0, sent: float = 0.0,
             ahead: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, arrived, sent, ahead))

    def queue_wait(now: float) -> float:
        if not queue:
            return 0.0
        while done_at and done_at[0] < now - 1.0:
            done_at.popleft()
        busy = min(units, sum(running.values()))
        rate = max(float(len(done_at)), busy / fastest)
        return len(queue) / rate if rate > 0 else 0.0

    def send(arrived: float, now: float) -> bool:
        d = r.decide(table, M, load, service=st, now=now, queue_wait_s=queue_wait(now))
        if isinstance(d, NoRoute):
            assert d.saturated
            return False
        w = d.worker
        ahead = load.in_flight(w)
        load.begin(w, "m")
        picks[w] += 1
        if running[w] < capacity_of[w]:
            running[w] += 1
            push(now + service_s[names.index(w)], w, arrived, now, ahead)
        else:
            inner[w].append((arrived, now, ahead))
        return True

    push(rng.expovariate(rate_per_s), "arrival")
    while events:
        now, _, kind, arrived, sent, ahead = heapq.heappop(events)
        if kind == "arrival":
            if now < seconds:
                push(now + rng.expovariate(rate_per_s), "arrival")
                if not send(now, now):
                    queue.append(now)
            continue
        w = kind
        running[w] -= 1
        if inner[w]:
            running[w] += 1
            a, s, ah = inner[w].popleft()
            push(now + service_s[names.index(w)], w, a, s, ah)
        load.end(w, "m")
        st.observe(w, "m", now - sent, now, in_flight=ahead, capacity=capacity_of[w])
        done_at.append(now)
        if arrived > 1.0:
            latencies.append(now - arrived)
        if queue and send(queue[0], now):
            longest_wait = max(longest_wait, now - queue.popleft())
    assert not queue
    return sorted(latencies), picks, longest_wait


def p99(latencies: list[float]) -> float:
    return latencies[int(0.99 * len(latencies))]


def test_deferred_requests_are_served_by_the_fast_workers_and_never_starved() -> None:
    lat, picks, longest = open_loop("load_aware", rate_per_s=0.85 * 450)
    base, base_picks, _ = open_loop("least_inflight", rate_per_s=0.85 * 450)
    assert len(lat) == len(base)                      # every request served
    assert longest < 0.080                            # no wait beyond the slow service
    share = picks["w2"] / sum(picks.values())
    assert 0.0 < share < base_picks["w2"] / sum(base_picks.values())
    assert p99(lat) <= p99(base)
    assert sum(lat) / len(lat) <= sum(base) / len(base)


@pytest.mark.parametrize("load", [0.7, 0.95])
def test_a_fleet_that_needs_every_worker_loses_nothing_to_deferral(load: float) -> None:
    # The benchmark's heterogeneous fleet (150 ms / speed 1-3, 4 slots): at 95 % every
    # worker is needed, and deferring must not leave the slow ones' slots idle meanwhile.
    service_s = tuple(0.150 / s for s in (1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 3.0, 3.0))
    rate = load * sum(4 / s for s in service_s)
    lat, _, longest = open_loop("load_aware", rate_per_s=rate, service_s=service_s, slots=4)
    base, _, _ = open_loop("least_inflight", rate_per_s=rate, service_s=service_s, slots=4)
    assert sum(lat) <= 1.05 * sum(base)
    assert p99(lat) <= 1.1 * p99(base)
    assert longest < 0.150


def test_a_stalled_fast_worker_is_not_waited_for() -> None:
    # fast full, its last completion long ago (a hang): the slow worker is used at once.
    table = RoutingTable([worker("fast"), worker("slow")])
    load = InFlightCounters()
    fill(load, "fast", 4)
    st = measured(0.0, fast=0.020, slow=0.080)
    r = router()
    for now in (0.05, 1.0, 10.0):
        d = r.decide(table, M, load, service=st, now=now)
        assert isinstance(d, Route) and d.worker == "slow"
        load.begin("slow", "m")
        st.observe("slow", "m", 0.080, now)
        load.end("slow", "m")
    assert routing.DEFER_DRAIN_FACTOR * 0.020 < 0.05


def test_defer_also_when_every_free_worker_is_queued_up() -> None:
    # slow: below its slots but queued up (scraped pending): the queue fallback would take
    # it, 80 ms × 9/4 = 180 ms; fast: full, 20 × 9/4 = 45 ms. Waiting wins there too.
    busy = WorkerSignals(scraped_at=0.0, models={"m": ModelSignal(pending=4.0)})
    table = RoutingTable([worker("fast", slots=8),
                          replace(worker("slow", slots=8), signals=busy)])
    load = InFlightCounters()
    fill(load, "fast", 8)
    fill(load, "slow", 4)
    r = router(picker="p2c")
    d = r.decide(table, M, load, service=measured(fast=0.020, slow=0.080), now=0.001)
    assert isinstance(d, NoRoute) and d.saturated
    assert r.statistics().queue_fallbacks == 1 and r.statistics().deferred == 1
