"""loadtest.autoscale.hpa_step: Kubernetes' HPA rules (tolerance, stabilisation windows, rate
policies, bounds) as tables, time an argument."""

from __future__ import annotations

import math

import pytest

from loadtest.autoscale import HpaRules, HpaState, hpa_step

# Each step: (now_s, metric, current replicas, expected desired). ``current`` is what the
# Deployment has at that sync (a test may let it lag the last decision).
Steps = list[tuple[float, float, int, int]]


def run(steps: Steps, rules: HpaRules = HpaRules()) -> list[int]:
    state = HpaState()
    out = []
    for now, metric, current, _ in steps:
        decision = hpa_step(state, now, metric, current, rules)
        state = decision.state
        out.append(decision.desired)
    return out


CASES: dict[str, tuple[Steps, HpaRules]] = {
    "signal followed up at once": ([(0, 10, 10, 10), (15, 14, 10, 14), (30, 20, 14, 20)],
                                   HpaRules()),
    "within tolerance: no change": ([(0, 10.9, 10, 10), (15, 9.1, 10, 10), (30, 11.1, 10, 12)],
                                    HpaRules()),
    "tolerance is a ratio, so 3 → 2 replicas moves (-33 %)": (
        [(0, 3, 3, 3), (100, 2, 3, 3), (401, 2, 3, 2)], HpaRules(down_percent=100)),
    # Down: the highest recommendation of the last 300 s wins.
    "scale-down waits for the window": (
        [(0, 20, 20, 20), (60, 10, 20, 20), (120, 10, 20, 20), (299, 10, 20, 20),
         (301, 10, 20, 16)], HpaRules()),
    "a short dip never removes a replica": (
        [(0, 20, 20, 20), (60, 5, 20, 20), (120, 20, 20, 20), (400, 20, 20, 20)], HpaRules()),
    "after a dip, the window's peak, not the latest value": (
        [(0, 30, 30, 30), (100, 20, 30, 30), (200, 10, 30, 30), (350, 10, 30, 24),
         (460, 10, 24, 19)], HpaRules()),
    # Down by at most 20 % of the replicas at the start of each 60 s period.
    "scale-down rate: 20 % a minute": (
        [(0, 10, 100, 80), (30, 10, 80, 80), (61, 10, 80, 64), (122, 10, 64, 51)],
        HpaRules(down_window_s=0)),
    # Up by at most max(100 %, 4 pods) per 15 s.
    "scale-up rate: doubling per 15 s": (
        [(0, 100, 10, 20), (5, 100, 20, 20), (16, 100, 20, 40), (32, 100, 40, 80),
         (48, 100, 80, 100)], HpaRules()),
    "scale-up rate: at least 4 pods": ([(0, 50, 1, 5), (16, 50, 5, 10)], HpaRules()),
    "bounds": ([(0, 0, 5, 2), (1, 500, 2, 6), (20, 500, 6, 8)],
               HpaRules(min_replicas=2, max_replicas=8, down_window_s=0, down_percent=100)),
    "missing metric: keep what there is": (
        [(0, math.nan, 7, 7), (15, -1, 7, 7), (30, math.inf, 7, 7)], HpaRules()),
    "an up window stabilises scale-up to the window's lowest": (
        [(0, 10, 10, 10), (10, 20, 10, 10), (40, 20, 10, 10), (71, 20, 10, 20)],
        HpaRules(up_window_s=60)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hpa_rules(name: str) -> None:
    steps, rules = CASES[name]
    assert run(steps, rules) == [expected for *_, expected in steps]


def test_old_recommendations_are_forgotten() -> None:
    state = HpaState()
    for t in range(0, 3600, 15):
        state = hpa_step(state, float(t), 10.0, 10).state
    assert len(state.recommendations) <= 300 // 15 + 1
    assert all(3600 - t <= 300 for t, _ in state.recommendations)


def test_decision_reports_each_stage() -> None:
    state = hpa_step(HpaState(), 0.0, 100.0, 100).state
    d = hpa_step(state, 30.0, 10.0, 100)
    assert (d.recommendation, d.stabilised, d.desired) == (10, 100, 100)
    d = hpa_step(d.state, 331.0, 10.0, 100)
    assert (d.recommendation, d.stabilised, d.desired) == (10, 10, 80)
