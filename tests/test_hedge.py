"""Hedged requests (gateway.core.hedge): when to hedge, as tables with time as an argument;
the per-try timeout from a model's latencies; the windowed quantiles."""

from __future__ import annotations

import random

import pytest

from gateway.core.config import HedgeConfig
from gateway.core.hedge import (
    BUCKET_RATIO,
    HedgeVerdict,
    LatencyQuantiles,
    bucket_of,
    bucket_upper_s,
    decide_hedge,
    per_try_timeout_s,
)
from gateway.core.retrybudget import is_repeatable

CFG = HedgeConfig(p99_factor=3.0, min_delay_s=0.1, max_delay_s=5.0, min_samples=50)
H = HedgeVerdict


@pytest.mark.parametrize(("p99_s", "expected"), [
    (0.080, 0.24),      # 3 × p99
    (0.010, 0.1),       # the floor
    (3.0, 5.0),         # the ceiling
    (None, 5.0),        # too few samples: the ceiling
])
def test_per_try_timeout(p99_s: float | None, expected: float) -> None:
    assert per_try_timeout_s(p99_s, CFG) == pytest.approx(expected)


# now, sent_at, timeout, stalled, repeatable, attempts, max, deadline, expected, budget → verdict
@pytest.mark.parametrize(("now", "sent", "stalled", "repeatable", "attempts", "deadline",
                          "budget", "verdict"), [
    (1.10, 1.0, False, True, 1, 4.0, True, H.WAIT),          # 100 ms < 240 ms
    (1.25, 1.0, False, True, 1, 4.0, True, H.HEDGE),         # past its per-try timeout
    (1.05, 1.0, True, True, 1, 4.0, True, H.HEDGE),          # on a stalled worker: at once
    (1.25, 1.0, False, False, 1, 4.0, True, H.NOT_SAFE),     # a sequence, a stateful model…
    (1.05, 1.0, True, False, 1, 4.0, True, H.NOT_SAFE),      # … even on a stalled worker
    (1.25, 1.0, False, True, 2, 4.0, True, H.ATTEMPTS_EXHAUSTED),
    (1.25, 1.0, False, True, 1, 1.28, True, H.NO_TIME),      # 30 ms left, 50 ms typical
    (1.25, 1.0, False, True, 1, 4.0, False, H.BUDGET_EXHAUSTED),
])
def test_decide_hedge(now: float, sent: float, stalled: bool, repeatable: bool, attempts: int,
                      deadline: float, budget: bool, verdict: HedgeVerdict) -> None:
    assert decide_hedge(now=now, sent_at=sent, timeout_s=0.24, worker_stalled=stalled,
                        repeatable=repeatable, attempts=attempts, max_attempts=2,
                        deadline=deadline, expected_s=0.05, budget_allows=budget) is verdict


@pytest.mark.parametrize(("sequence", "stateful", "model_repeatable", "stream_started",
                          "safe"), [
    (False, False, True, False, True),     # plain inference: safe by default
    (True, False, True, False, False),     # a request of a sequence
    (False, True, True, False, False),     # a model with sequence_batching
    (False, False, False, False, False),   # models.<m>.repeatable: false
    (False, False, True, True, False),     # a streamed answer already started
])
def test_what_is_safe_to_repeat(sequence: bool, stateful: bool, model_repeatable: bool,
                                stream_started: bool, safe: bool) -> None:
    assert is_repeatable(sequence=sequence, stateful=stateful,
                         model_repeatable=model_repeatable,
                         stream_started=stream_started) is safe


# ------------------------------------------------------------------ quantiles

@pytest.mark.parametrize("latency_s", [1e-5, 1e-4, 0.001, 0.05, 0.0537, 1.0, 59.0, 1e4])
def test_a_bucket_holds_its_latency(latency_s: float) -> None:
    i = bucket_of(latency_s)
    assert latency_s <= bucket_upper_s(i) * (1 + 1e-9) or latency_s > 600
    if 1e-4 < latency_s < 600:
        assert bucket_upper_s(i) <= latency_s * BUCKET_RATIO * (1 + 1e-9)


def test_p99_of_a_known_distribution_within_a_bucket() -> None:
    q = LatencyQuantiles(window_s=10.0)
    rng = random.Random(1)
    samples = sorted(rng.uniform(0.045, 0.055) for _ in range(990)) + [0.3] * 10
    for i, s in enumerate(samples):
        q.observe("m", s, i * 0.001)
    p99 = q.quantile("m", 0.99, 1.0)
    assert p99 is not None and 0.055 <= p99 <= 0.055 * BUCKET_RATIO
    p995 = q.quantile("m", 0.995, 1.0)
    assert p995 is not None and 0.3 <= p995 <= 0.3 * BUCKET_RATIO
    median = q.quantile("m", 0.5, 1.0)
    assert median is not None and 0.045 < median < 0.06
    assert q.quantile("other", 0.99, 1.0) is None


def test_too_few_samples_then_the_window_forgets() -> None:
    q = LatencyQuantiles(window_s=10.0)
    for i in range(49):
        q.observe("m", 0.05, i * 0.01)
    assert q.quantile("m", 0.99, 0.5, min_samples=50) is None
    q.observe("m", 0.05, 0.5)
    assert q.quantile("m", 0.99, 0.5, min_samples=50) is not None
    # the half the samples were in rotates out after 5 s, and out of the window after 10
    assert q.samples("m", 6.0) == 50
    assert q.samples("m", 11.0) == 0
    assert q.quantile("m", 0.99, 11.0, min_samples=1) is None


def test_a_slowdown_moves_the_p99_within_a_window() -> None:
    """Every request 3 × slower: the per-try timeout follows within one window, so a
    fleet-wide slowdown stops looking like a stuck request."""
    q = LatencyQuantiles(window_s=10.0)
    t = 0.0
    while t < 10.0:
        q.observe("m", 0.05, t)
        t += 0.01
    before = per_try_timeout_s(q.quantile("m", 0.99, t, min_samples=50), CFG)
    while t < 20.0:
        q.observe("m", 0.15, t)
        t += 0.01
    after = per_try_timeout_s(q.quantile("m", 0.99, t, min_samples=50), CFG)
    assert before == pytest.approx(0.15, rel=0.1) and after == pytest.approx(0.45, rel=0.1)


def test_the_quantile_is_cached_briefly() -> None:
    q = LatencyQuantiles()
    for _ in range(100):
        q.observe("m", 0.05, 0.0)
    first = q.quantile("m", 0.99, 0.0)
    for _ in range(1000):
        q.observe("m", 1.0, 0.01)
    assert q.quantile("m", 0.99, 0.05) == first            # within QUANTILE_REFRESH_S
    later = q.quantile("m", 0.99, 0.2)
    assert later is not None and later > 0.9
