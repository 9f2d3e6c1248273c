"""Capacity math: the article's worked example, the knee finder, HPA and predictive rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.capacity import (
    HOURS_PER_MONTH,
    LoadPoint,
    PlanInputs,
    ceil_tolerant,
    find_knee,
    fleet_saturation,
    fleet_utilisation,
    headroom,
    make_plan,
    predictive_desired_replicas,
    reactive_desired_replicas,
    required_gpus,
    sensitivity,
)


@pytest.mark.parametrize(
    ("peak", "instance", "overhead", "redundancy", "target", "expected"),
    [
        (10_000, 5, 0.2, 0, None, 2400),     # the article's worked example
        (10_000, 4, 0.2, 0, None, 3000),     # the article's "drops to 4 RPS"
        (10_000, 5, 0.2, 1, None, 2401),     # N+1
        (10_000, 5, 0.0, 0, None, 2000),
        (10_000, 5, 0.2, 0, 0.8, 3000),      # 2400 / 0.8: overhead and target multiply
        (10_000, 3, 0.0, 0, None, 3334),     # a true fraction still rounds up
        (1, 5, 0.2, 0, None, 1),
        (0, 5, 0.2, 2, None, 2),             # no load: only the spares
        (100, 7, 0.1, 0, 0.7, 23),           # 100/7*1.1/0.7 = 22.45 → 23
        (999.9, 10, 0.0, 0, None, 100),
    ],
)
def test_required_gpus_table(peak: float, instance: float, overhead: float, redundancy: int,
                             target: float | None, expected: int) -> None:
    assert required_gpus(peak, instance, overhead, redundancy, target) == expected


def test_worked_example_plan_and_sensitivity() -> None:
    inputs = PlanInputs(peak_rps=10_000, instance_rps=5, overhead=0.2, redundancy=0,
                        gpu_hour_cost=2.0)
    plan = make_plan(inputs)
    assert plan.gpus == 2400
    assert plan.cost_per_hour == 4800.0
    assert plan.cost_per_month == 4800.0 * HOURS_PER_MONTH
    assert plan.utilisation_at_peak == pytest.approx(1 / 1.2)
    rows = {r.label: r for r in sensitivity(inputs)}
    minus_one = rows["instance 4 RPS (-1)"]
    assert minus_one.gpus == 3000
    assert minus_one.delta_cost_per_hour == 1200.0
    assert rows["redundancy N+1 (+1)"].delta_gpus == 1
    assert rows["overhead 30% (+10 pts)"].gpus == 2600


def test_sensitivity_leaves_out_impossible_rates() -> None:
    labels = [r.label for r in sensitivity(PlanInputs(peak_rps=10, instance_rps=1))]
    assert not any("(-1)" in label for label in labels)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2400.0000000000005, 2400), (2400.000001, 2401), (0.0, 0), (1e-12, 0), (0.5, 1)],
)
def test_ceil_tolerant(value: float, expected: int) -> None:
    assert ceil_tolerant(value) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"peak_rps": -1, "instance_rps": 5},
        {"peak_rps": 1, "instance_rps": 0},
        {"peak_rps": 1, "instance_rps": 5, "overhead": -0.1},
        {"peak_rps": 1, "instance_rps": 5, "redundancy": -1},
        {"peak_rps": 1, "instance_rps": 5, "target_utilisation": 0.0},
        {"peak_rps": 1, "instance_rps": 5, "target_utilisation": 1.5},
        {"peak_rps": math.inf, "instance_rps": 5},
    ],
)
def test_required_gpus_rejects_bad_input(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        required_gpus(**kwargs)  # type: ignore[arg-type]


@given(peak=st.floats(0, 1e6), instance=st.floats(0.01, 1e4), overhead=st.floats(0, 2),
       target=st.floats(0.05, 1.0))
def test_required_gpus_covers_demand(peak: float, instance: float, overhead: float,
                                     target: float) -> None:
    gpus = required_gpus(peak, instance, overhead, 0, target)
    demand = peak / instance * (1 + overhead) / target
    assert gpus >= demand - 1e-9 * max(1.0, demand)
    assert gpus < demand + 1
    assert required_gpus(peak * 1.5, instance, overhead, 0, target) >= gpus


# --- knee -----------------------------------------------------------------------------------


def _points(*pairs: tuple[float, float]) -> list[LoadPoint]:
    return [LoadPoint(t, p) for t, p in pairs]


def test_knee_interpolates_between_last_within_and_first_beyond() -> None:
    knee = find_knee(_points((10, 50), (20, 80), (30, 150), (40, 250), (45, 900)), 200)
    assert knee is not None
    assert knee.throughput_rps == pytest.approx(35.0)  # halfway from 150 to 250 ms
    assert knee.p99_ms == 200
    assert knee.interpolated and knee.budget_reached and knee.index == 2


def test_knee_on_exact_budget_point_is_that_point() -> None:
    knee = find_knee(_points((10, 50), (20, 200), (30, 400)), 200)
    assert knee is not None and knee.throughput_rps == pytest.approx(20.0)


def test_knee_ignores_points_after_the_first_breach() -> None:
    knee = find_knee(_points((10, 50), (20, 300), (50, 100)), 200)
    assert knee is not None and knee.throughput_rps < 20


def test_knee_collapse_past_saturation_is_not_interpolated() -> None:
    # throughput fell while latency exploded: no chord to follow, keep the last good point
    knee = find_knee(_points((10, 50), (30, 120), (25, 5000)), 200)
    assert knee is not None
    assert knee.throughput_rps == 30 and not knee.interpolated and knee.budget_reached


def test_knee_when_budget_never_reached_is_a_lower_bound() -> None:
    knee = find_knee(_points((10, 50), (20, 60)), 200)
    assert knee is not None
    assert knee.throughput_rps == 20 and not knee.budget_reached


def test_knee_none_when_first_point_over_budget() -> None:
    assert find_knee(_points((10, 500), (20, 900)), 200) is None
    assert find_knee([], 200) is None


# --- live signals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("busy", "slots", "expected"),
    [(0, 10, 0.0), (5, 10, 0.5), (12, 10, 1.0), (0, 0, 0.0), (3, 0, 1.0)],
)
def test_fleet_utilisation(busy: float, slots: float, expected: float) -> None:
    assert fleet_utilisation(busy, slots) == expected


def test_saturation_and_headroom() -> None:
    assert fleet_saturation(8, 4, 10) == pytest.approx(1.2)
    assert fleet_saturation(0, 0, 0) == 0.0
    assert fleet_saturation(1, 0, 0) == math.inf
    assert headroom(0.0, 0.7) == 1.0
    assert headroom(0.7, 0.7) == pytest.approx(0.0)
    assert headroom(0.84, 0.7) == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("current", "utilisation", "target", "k", "lo", "hi", "expected"),
    [
        (10, 0.7, 0.7, 0, 1, 100, 10),    # at target
        (10, 0.75, 0.7, 0, 1, 100, 10),   # +7 %: inside HPA's 10 % tolerance
        (10, 0.65, 0.7, 0, 1, 100, 10),   # −7 %: inside
        (10, 0.8, 0.7, 0, 1, 100, 12),    # +14 %: ceil(10 × 0.8 / 0.7) = 12
        (10, 0.35, 0.7, 0, 1, 100, 5),    # scale in
        (10, 1.0, 0.7, 0, 1, 100, 15),    # saturated: at most ×1/target per step
        (10, 0.8, 0.7, 1, 1, 100, 13),    # N+1
        (11, 0.7 * 10 / 11, 0.7, 1, 1, 100, 11),  # fixed point with the spare counted
        (10, 0.0, 0.7, 0, 2, 100, 2),     # floor
        (10, 1.0, 0.7, 0, 1, 12, 12),     # ceiling
        (0, 0.0, 0.7, 1, 0, 100, 1),      # nothing running: just the spare
    ],
)
def test_reactive_desired_replicas(current: int, utilisation: float, target: float, k: int,
                                   lo: int, hi: int, expected: int) -> None:
    assert reactive_desired_replicas(current, utilisation, target, k, lo, hi) == expected


@pytest.mark.parametrize(
    ("forecast", "per_replica", "target", "k", "lo", "hi", "expected"),
    [
        (100, 10, 1.0, 0, 0, 1000, 10),
        (100, 10, 0.7, 0, 0, 1000, 15),   # 14.29 → 15
        (100, 10, 0.7, 1, 0, 1000, 16),
        (70, 10, 0.7, 0, 0, 1000, 10),    # exactly 10 despite float noise
        (0, 10, 0.7, 1, 2, 1000, 2),
        (-5, 10, 0.7, 0, 0, 1000, 0),
        (1e6, 10, 0.7, 0, 0, 64, 64),
    ],
)
def test_predictive_desired_replicas(forecast: float, per_replica: float, target: float, k: int,
                                     lo: int, hi: int, expected: int) -> None:
    assert predictive_desired_replicas(forecast, per_replica, target, k, lo, hi) == expected
