"""Circuit breakers: transition table, scenario scripts on a fake clock, the ejection cap,
jitter bounds, half-open probes, slow start, latency outliers."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.breaker import (
    SLOW_START_FLOOR,
    BreakerBoard,
    BreakerEvent,
    BreakerState,
    BreakerTransitionError,
    WindowCounts,
    max_ejected,
    next_state,
    slow_start_share,
)
from gateway.core.config import BreakerConfig

C, O, H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN  # noqa: E741

CFG = BreakerConfig(consecutive_failures=3, error_rate=0.5, window_s=10.0, min_requests=6,
                    open_s=5.0, max_open_s=40.0, jitter=0.0, half_open_probes=2,
                    max_ejected_fraction=1.0, slow_start_s=10.0)


def board(cfg: BreakerConfig = CFG, workers: int = 1, seed: int = 0) -> BreakerBoard:
    b = BreakerBoard(cfg, random.Random(seed))
    for i in range(workers):
        b.add_worker(f"w{i}", 0.0)
    return b


@pytest.mark.parametrize(("state", "event", "expected"), [
    (C, BreakerEvent.TRIP, O),
    (O, BreakerEvent.COOLED, H),
    (H, BreakerEvent.PROBES_PASSED, C),
    (H, BreakerEvent.PROBE_FAILED, O),
])
def test_legal_transitions(state: BreakerState, event: BreakerEvent,
                           expected: BreakerState) -> None:
    assert next_state(state, event) is expected


@pytest.mark.parametrize(("state", "event"), [
    (C, BreakerEvent.COOLED), (C, BreakerEvent.PROBES_PASSED), (C, BreakerEvent.PROBE_FAILED),
    (O, BreakerEvent.TRIP), (O, BreakerEvent.PROBES_PASSED), (O, BreakerEvent.PROBE_FAILED),
    (H, BreakerEvent.TRIP), (H, BreakerEvent.COOLED),
])
def test_illegal_transitions_raise(state: BreakerState, event: BreakerEvent) -> None:
    with pytest.raises(BreakerTransitionError):
        next_state(state, event)


# (time, action, expected state after). Actions: ok / fail = record an outcome,
# allow+ / allow- = allow() returns True / False, tick = only look at the state.
SCRIPT_CONSECUTIVE = [
    (0.0, "allow+", C), (0.1, "fail", C), (0.2, "fail", C), (0.3, "ok", C),   # run broken
    (0.4, "fail", C), (0.5, "fail", C), (0.6, "fail", O),                      # 3 in a row
    (1.0, "allow-", O), (1.0, "ok", O),              # late outcome while open: ignored
    (5.5, "tick", O), (5.6, "tick", H),              # open 5 s from 0.6
    (5.7, "allow+", H), (5.7, "allow+", H), (5.7, "allow-", H),   # exactly 2 probes
    (5.8, "ok", H), (5.9, "fail", O),                # a probe fails: reopen for 10 s
    (15.8, "tick", O), (15.9, "tick", H),
    (16.0, "allow+", H), (16.0, "allow+", H), (16.1, "ok", H), (16.2, "ok", C),
    (16.3, "allow+", C),
]

SCRIPT_ERROR_RATE = [
    (0.0, "ok", C), (0.1, "fail", C), (0.2, "ok", C), (0.3, "fail", C), (0.4, "ok", C),
    (0.5, "fail", O),                                # 3/6 failed ≥ 0.5, volume 6 ≥ 6
    (5.5, "tick", H),
]

SCRIPT_WINDOW_EXPIRES = [
    (0.0, "fail", C), (0.1, "ok", C), (0.2, "fail", C), (0.3, "ok", C),
    (20.0, "ok", C), (20.1, "fail", C), (20.2, "ok", C),    # old failures fell out
    (20.3, "ok", C), (20.4, "fail", C), (20.5, "ok", C),    # 2/6 < 0.5
]


@pytest.mark.parametrize("script", [SCRIPT_CONSECUTIVE, SCRIPT_ERROR_RATE,
                                    SCRIPT_WINDOW_EXPIRES],
                         ids=["consecutive", "error_rate", "window_expires"])
def test_scenario(script: list[tuple[float, str, BreakerState]]) -> None:
    b = board()
    for step, (now, action, expected) in enumerate(script):
        if action == "ok":
            b.record("w0", now, ok=True)
        elif action == "fail":
            b.record("w0", now, ok=False)
        elif action == "allow+":
            assert b.allow("w0", now), f"step {step}"
        elif action == "allow-":
            assert not b.allow("w0", now), f"step {step}"
        assert b.state("w0", now) is expected, f"step {step}: {action} at {now}"


def trip(b: BreakerBoard, worker: str, now: float, n: int = 3) -> None:
    for _ in range(n):
        b.record(worker, now, ok=False)


def reopen_interval(b: BreakerBoard, worker: str) -> float:
    stats = b.statistics(0.0).workers[worker]
    assert stats.reopen_at is not None
    return stats.reopen_at


def test_open_interval_doubles_and_is_capped() -> None:
    b = board()
    now = 0.0
    intervals = []
    for _ in range(6):
        if b.state("w0", now) is C:
            trip(b, "w0", now)
        else:
            assert b.state("w0", now) is H
            assert b.allow("w0", now)
            b.record("w0", now, ok=False)
        reopen_at = b.statistics(now).workers["w0"].reopen_at
        assert reopen_at is not None
        intervals.append(reopen_at - now)
        now = reopen_at
    assert intervals == pytest.approx([5.0, 10.0, 20.0, 40.0, 40.0, 40.0])


def test_consecutive_open_count_resets_after_stable_period() -> None:
    b = board()
    trip(b, "w0", 0.0)                   # open 5 s
    assert b.allow("w0", 5.0) and b.allow("w0", 5.0)
    b.record("w0", 5.0, ok=True)
    b.record("w0", 5.0, ok=True)         # closed at 5.0, opened_count stays 1 for now
    assert b.statistics(5.0).workers["w0"].opened_count == 1
    assert b.statistics(14.9).workers["w0"].opened_count == 1   # stable needs ≥ window_s
    assert b.statistics(15.0).workers["w0"].opened_count == 0
    trip(b, "w0", 16.0)
    assert b.statistics(16.0).workers["w0"].reopen_at == pytest.approx(21.0)  # 5 s again


def test_failing_again_soon_after_closing_doubles() -> None:
    b = board()
    trip(b, "w0", 0.0)
    assert b.allow("w0", 5.0) and b.allow("w0", 5.0)
    b.record("w0", 5.0, ok=True)
    b.record("w0", 5.0, ok=True)
    trip(b, "w0", 6.0)
    assert b.statistics(6.0).workers["w0"].reopen_at == pytest.approx(16.0)


def test_jitter_bounds_and_spread() -> None:
    cfg = replace(CFG, jitter=0.2)
    intervals = []
    for seed in range(200):
        b = board(cfg, seed=seed)
        trip(b, "w0", 0.0)
        intervals.append(reopen_interval(b, "w0"))
    assert all(4.0 <= i <= 6.0 for i in intervals)
    assert max(intervals) - min(intervals) > 1.5     # the herd is spread out
    # the same seed gives the same interval: the generator is the only source of randomness
    again = board(cfg, seed=7)
    trip(again, "w0", 0.0)
    assert reopen_interval(again, "w0") == intervals[7]


def test_jitter_applies_at_the_cap() -> None:
    cfg = replace(CFG, jitter=0.5, open_s=100.0, max_open_s=100.0)
    seen = set()
    for seed in range(20):
        b = board(cfg, seed=seed)
        trip(b, "w0", 0.0)
        value = reopen_interval(b, "w0")
        assert 50.0 <= value <= 150.0
        seen.add(round(value, 3))
    assert len(seen) > 10


@pytest.mark.parametrize(("fraction", "workers", "expected"), [
    (0.5, 4, 2), (0.5, 1, 1), (0.1, 5, 1), (0.1, 20, 2), (0.0, 10, 0), (1.0, 3, 3),
    (0.5, 0, 0), (0.3, 10, 3),
])
def test_max_ejected(fraction: float, workers: int, expected: int) -> None:
    assert max_ejected(fraction, workers) == expected


def test_ejection_cap_keeps_breaker_closed_and_records_it() -> None:
    b = board(replace(CFG, max_ejected_fraction=0.5), workers=4)
    trip(b, "w0", 0.0)
    trip(b, "w1", 0.0)
    trip(b, "w2", 0.0)
    assert [b.state(w, 0.0) for w in ("w0", "w1", "w2", "w3")] == [O, O, C, C]
    stats = b.statistics(0.0)
    assert stats.ejected == 2 and stats.max_ejected == 2
    assert stats.suppressed_total == 1
    assert stats.workers["w2"].suppressed_total == 1
    assert stats.workers["w2"].last_suppressed_reason == "consecutive_failures"
    assert b.allow("w2", 0.1)
    # room frees up when w0 closes again; w2's next failure then trips it at once
    assert b.allow("w0", 5.0) and b.allow("w0", 5.0)
    b.record("w0", 5.0, ok=True)
    b.record("w0", 5.0, ok=True)
    b.record("w2", 5.1, ok=False)
    assert b.state("w2", 5.1) is O


def test_half_open_counts_against_the_cap() -> None:
    b = board(replace(CFG, max_ejected_fraction=0.25), workers=4)
    trip(b, "w0", 0.0)
    assert b.state("w0", 5.0) is H
    trip(b, "w1", 5.0)
    assert b.state("w1", 5.0) is C


def test_half_open_probe_count_and_cancel() -> None:
    b = board(replace(CFG, half_open_probes=3))
    trip(b, "w0", 0.0)
    assert [b.allow("w0", 5.0) for _ in range(5)] == [True, True, True, False, False]
    b.cancel("w0", 5.1)                 # one probe was cancelled: its slot comes back
    assert b.allow("w0", 5.2)
    assert not b.allow("w0", 5.2)
    for _ in range(3):
        b.record("w0", 5.3, ok=True)
    assert b.state("w0", 5.3) is C


def test_lost_probes_are_reissued_after_max_open() -> None:
    b = board()
    trip(b, "w0", 0.0)
    assert b.allow("w0", 5.0) and b.allow("w0", 5.0)
    assert not b.allow("w0", 44.0)
    assert b.allow("w0", 45.0)


@pytest.mark.parametrize(("elapsed_s", "share"), [
    (0.0, SLOW_START_FLOOR), (2.5, 0.325), (5.0, 0.55), (7.5, 0.775), (10.0, 1.0), (50.0, 1.0),
])
def test_slow_start_ramp_after_join(elapsed_s: float, share: float) -> None:
    b = BreakerBoard(CFG, random.Random(0))
    b.add_worker("w0", 100.0)
    assert b.traffic_share("w0", 100.0 + elapsed_s) == pytest.approx(share)


def test_slow_start_after_breaker_closes_and_shares_while_open() -> None:
    b = board()
    trip(b, "w0", 20.0)
    assert b.traffic_share("w0", 21.0) == 0.0
    assert b.allow("w0", 25.0)
    assert b.traffic_share("w0", 25.0) == SLOW_START_FLOOR
    assert b.allow("w0", 25.0)
    b.record("w0", 25.0, ok=True)
    b.record("w0", 25.0, ok=True)
    assert b.traffic_share("w0", 25.0) == pytest.approx(SLOW_START_FLOOR)
    assert b.traffic_share("w0", 30.0) == pytest.approx(0.55)
    assert b.traffic_share("w0", 35.0) == 1.0


def test_no_slow_start_for_initial_fleet_or_zero_window() -> None:
    b = BreakerBoard(CFG, random.Random(0))
    b.add_worker("w0", 0.0, slow_start=False)
    assert b.traffic_share("w0", 0.0) == 1.0
    assert slow_start_share(0.0, 0.0, 0.0) == 1.0


def test_latency_outlier_is_ejected() -> None:
    cfg = replace(CFG, latency_outlier_factor=3.0, min_requests=5)
    b = board(cfg, workers=4)
    now = 0.0
    for _ in range(5):
        now += 0.3
        for w, latency in (("w0", 0.01), ("w1", 0.012), ("w2", 0.011), ("w3", 0.2)):
            b.record(w, now, ok=True, latency_s=latency)
    assert b.state("w3", now) is O
    assert b.statistics(now).workers["w3"].last_trip_reason == "latency_outlier"
    assert all(b.state(w, now) is C for w in ("w0", "w1", "w2"))


def test_latency_rule_off_by_default_and_needs_a_fleet() -> None:
    b = board(replace(CFG, min_requests=2), workers=4)
    for i in range(10):
        b.record("w3", float(i), ok=True, latency_s=5.0)
        b.record("w0", float(i), ok=True, latency_s=0.01)
    assert b.state("w3", 10.0) is C
    b2 = board(replace(CFG, latency_outlier_factor=2.0, min_requests=2), workers=2)
    for i in range(10):
        b2.record("w1", float(i), ok=True, latency_s=5.0)
        b2.record("w0", float(i), ok=True, latency_s=0.01)
    assert b2.state("w1", 10.0) is C        # no median of two


def test_disabled_breaker_never_opens_and_unknown_workers() -> None:
    b = board(replace(CFG, enabled=False))
    trip(b, "w0", 0.0, n=50)
    assert b.state("w0", 0.0) is C and b.allow("w0", 0.0)
    b.record("gone", 0.0, ok=False)           # a request finishing after its worker left
    with pytest.raises(KeyError):
        b.allow("gone", 0.0)


def test_remove_and_rejoin_starts_fresh() -> None:
    b = board()
    trip(b, "w0", 0.0)
    b.remove_worker("w0")
    b.add_worker("w0", 1.0)
    assert b.state("w0", 1.0) is C
    assert b.traffic_share("w0", 1.0) == SLOW_START_FLOOR


def test_reconfigure_keeps_state() -> None:
    b = board()
    trip(b, "w0", 0.0)
    b.reconfigure(replace(CFG, half_open_probes=1, window_s=30.0))
    assert b.state("w0", 1.0) is O
    assert b.allow("w0", 5.0) and not b.allow("w0", 5.0)


def test_window_counts_are_bounded() -> None:
    w = WindowCounts(10.0, buckets=10)
    for i in range(100_000):
        w.add(i * 0.001, a=1)
    assert w.totals(99.999) == (10_000, 0)
    assert len(w._a) == 10


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.floats(0, 3)), max_size=300),
       st.sampled_from([0.1, 0.34, 0.5, 1.0]))
def test_cap_never_exceeded(events: list[tuple[int, bool, float]], fraction: float) -> None:
    b = board(replace(CFG, max_ejected_fraction=fraction), workers=6)
    cap = max_ejected(fraction, 6)
    now = 0.0
    for worker, ok, dt in events:
        now += dt
        if b.allow(f"w{worker}", now) or ok:
            b.record(f"w{worker}", now, ok=ok)
        assert b.statistics(now).ejected <= cap


def test_late_outcomes_while_half_open_are_ignored() -> None:
    b = board()
    trip(b, "w0", 0.0)
    assert b.state("w0", 5.0) is H
    b.record("w0", 5.1, ok=False)          # a request sent before the trip: no probe out
    b.record("w0", 5.1, ok=True)
    assert b.state("w0", 5.1) is H
    assert b.statistics(5.1).workers["w0"].probes_succeeded == 0
    assert b.allow("w0", 5.2)
    b.record("w0", 5.3, ok=False)          # the probe's own failure counts
    assert b.state("w0", 5.3) is O


def test_breaker_state_gauge_values() -> None:
    assert [s.gauge for s in (C, H, O)] == [0, 1, 2]
