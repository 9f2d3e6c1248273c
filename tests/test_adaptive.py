"""Adaptive concurrency limit: convergence on a simulated worker (fake clock), step changes
of capacity and of base latency, bounds, the app-limited guard."""

from __future__ import annotations

import heapq

import pytest

from gateway.core.adaptive import AdaptiveLimit
from gateway.core.config import AdaptiveConfig

CFG = AdaptiveConfig(enabled=True, min_limit=1, smoothing=0.2, tolerance=1.5)


class SimWorker:
    """A worker that runs ``capacity`` requests at once, ``service_s`` each, FIFO beyond;
    closed-loop demand of ``demand`` clients, gated by the adaptive limit."""

    def __init__(self, limiter: AdaptiveLimit, capacity: int, service_s: float,
                 demand: int) -> None:
        self.limiter = limiter
        self.capacity = capacity
        self.service_s = service_s
        self.demand = demand
        self.now = 0.0
        self.free_at = [0.0] * capacity
        self.in_flight: list[tuple[float, float, int]] = []   # (finish, start, in_flight)
        self.limits: list[tuple[float, int]] = []
        self.rtts: list[tuple[float, float]] = []

    def set_capacity(self, capacity: int) -> None:
        busy = sorted(self.free_at)
        self.free_at = (busy + [self.now] * capacity)[:capacity] if capacity > len(busy) \
            else busy[-capacity:]
        heapq.heapify(self.free_at)
        self.capacity = capacity

    def _admit(self) -> None:
        while len(self.in_flight) < self.demand and self.limiter.can_admit(len(self.in_flight)):
            start = max(self.now, heapq.heappop(self.free_at))
            finish = start + self.service_s
            heapq.heappush(self.free_at, finish)
            heapq.heappush(self.in_flight, (finish, self.now, len(self.in_flight) + 1))

    def run(self, until_s: float) -> None:
        self._admit()
        while self.now < until_s:
            if not self.in_flight:          # nothing admitted: idle a moment
                self.now += 0.001
                self._admit()
                continue
            finish, started, in_flight = heapq.heappop(self.in_flight)
            self.now = finish
            self.limiter.on_sample(self.now, finish - started, in_flight)
            self.rtts.append((self.now, finish - started))
            self.limits.append((self.now, self.limiter.limit))
            self._admit()

    def mean_limit(self, since_s: float) -> float:
        values = [limit for t, limit in self.limits if t >= since_s]
        return sum(values) / len(values)

    def mean_rtt(self, since_s: float) -> float:
        values = [rtt for t, rtt in self.rtts if t >= since_s]
        return sum(values) / len(values)


def test_converges_near_the_workers_concurrency() -> None:
    limiter = AdaptiveLimit(CFG, max_limit=200, min_rtt_interval_s=10.0)
    sim = SimWorker(limiter, capacity=20, service_s=0.01, demand=500)
    sim.run(8.0)
    assert limiter.statistics().min_rtt_s == pytest.approx(0.01)
    assert 16 <= sim.mean_limit(3.0) <= 40
    assert sim.mean_rtt(3.0) <= 2.5 * 0.01          # queueing stays bounded
    assert all(1 <= limit <= 200 for _, limit in sim.limits)


def test_follows_capacity_down_and_up() -> None:
    limiter = AdaptiveLimit(CFG, max_limit=200, min_rtt_interval_s=10.0)
    sim = SimWorker(limiter, capacity=40, service_s=0.01, demand=500)
    sim.run(5.0)
    high = sim.mean_limit(3.0)
    sim.set_capacity(10)
    sim.run(10.0)
    low = sim.mean_limit(7.0)
    assert 8 <= low <= 25 < high
    sim.set_capacity(40)
    sim.run(15.0)
    assert sim.mean_limit(12.0) >= 32


def test_new_base_latency_is_learned_at_the_next_probe() -> None:
    limiter = AdaptiveLimit(CFG, max_limit=200, min_rtt_interval_s=5.0)
    sim = SimWorker(limiter, capacity=20, service_s=0.01, demand=500)
    sim.run(4.0)
    sim.service_s = 0.03                 # a heavier model version: slower, same concurrency
    sim.run(12.0)
    stats = limiter.statistics()
    assert stats.probes >= 2
    assert stats.min_rtt_s == pytest.approx(0.03, rel=0.1)
    assert 16 <= sim.mean_limit(9.0) <= 40


def test_app_limited_limit_does_not_run_away() -> None:
    limiter = AdaptiveLimit(CFG, max_limit=1000, initial_limit=20, min_rtt_interval_s=10.0)
    sim = SimWorker(limiter, capacity=50, service_s=0.01, demand=5)
    sim.run(5.0)
    assert limiter.limit <= 20


def test_bounds_and_admission() -> None:
    cfg = AdaptiveConfig(enabled=True, min_limit=4, smoothing=0.0, tolerance=1.0)
    limiter = AdaptiveLimit(cfg, max_limit=8, initial_limit=100)
    assert limiter.limit == 8
    assert limiter.can_admit(7) and not limiter.can_admit(8)
    now = 0.0
    limiter.on_sample(now, 0.01, 1)      # starts the min-RTT probe: limit = min_limit
    assert limiter.is_probing and limiter.limit == 4
    for _ in range(10):
        now += 0.01
        limiter.on_sample(now, 0.01, 1)
    assert not limiter.is_probing and limiter.limit == 8
    for _ in range(200):                 # latency 10× the baseline: shrink to the floor
        now += 0.01
        limiter.on_sample(now, 0.1, 8)
    assert limiter.limit == 4
