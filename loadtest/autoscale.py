"""The closed scaling loop with the real gateway in it (issue 23, item 2).

    python -m loadtest.autoscale [--mode reactive --mode predictive] [--day 28]
        [--start-hour 0 --hours 24] [--peak-rps 200] [--time-scale 300] [--startup-min 10]
        [--target-utilisation 0.85] [--service-dist fixed|exponential] [--p99-budget-ms 200]

The real gateway (``python -m gateway serve``) in front of simulated Triton workers
(``gateway sim``, one process each, 1 slot × 50 ms = 20 req/s, the replay's replica; with
``--service-dist exponential`` each service time is drawn with that mean, an M/M/c server) whose
number a scaler changes, time compressed: ``capacity.time_scale`` = 300, one real second is
five trace minutes, a day lasts 288 s. One day of a trace (default: day 28 of the bundled
Azure trace, scaled to a 200 req/s peak: of its days with 14 days of history, the one on which
the analytical replay finds reactive scaling furthest behind) is replayed, per mode:

* the **scaler** reads only the gateway's ``/metrics`` — ``max(gateway_desired_replicas
  {mode=M})``, what the shipped HPA/KEDA manifests query (config/k8s/) — every 15 scaled
  seconds (at least 0.1 s real) and applies Kubernetes' rules (:func:`hpa_step`, below);
* a new worker is **ready after the warm-up** (``--startup-min`` trace minutes): it joins the
  gateway's config only then, and is paid for from the order;
* a worker chosen for **removal** is the one that frees a whole worker soonest (a warming one,
  else the one with the fewest requests in flight); it leaves the config (SIGHUP), the gateway
  drains it (no new requests, those in flight finish), and its process is stopped only once
  the gateway no longer lists it;
* the **load** is open loop: Poisson arrivals following the trace, each with
  ``X-Request-Timeout-Ms``; every answer is recorded;
* the **forecaster** starts from the ``--history-days`` before the replayed day
  (``capacity.history_file``), never the day itself (with ``--start-hour H``, the history
  runs up to hour H of the day and the replay starts there); an hour before the replay is
  replayed first (not counted) so that the loop starts warm, the scaler acting only in its
  second half (the gateway's averaged signals start cold and need the first to warm up).

Reported per mode: over-budget minutes (a trace minute whose p99 exceeds the budget, 200 ms,
or whose refusals and failures exceed 1 %), GPU-hours (in trace hours), requests lost in
scale-down (no answer, or a worker's failure: 0, 500, 502), and the analytical replay's
GPU-hours for the same day and mode (``loadtest.replay``), with the ratio. Prints a table and
writes ``results/autoscale.json`` and the plot ``results/autoscale.png`` (demand, ready
replicas and p99 over the day); each run merges its modes into what is there, so the modes
may run one at a time.

The scaler's rules. It reads one number — ``max(gateway_desired_replicas{mode="predictive"})``
in the shipped manifests — and applies the HPA controller's rules for an External metric with
target ``AverageValue`` (config/k8s/triton-hpa.yaml; KEDA's ScaledObject builds the same HPA):

1. ratio = metric / (target × current); within ``tolerance`` (0.1) of 1 → keep ``current``,
   else the recommendation is ``ceil(metric / target)``;
2. stabilisation: the recommendations of the last ``up_window_s`` (0) and ``down_window_s``
   (300 s) are kept; scaling up goes to the lowest of the up window, scaling down to the
   highest of the down window (a dip shorter than the window never removes a replica);
3. rate policies: up by at most ``up_percent`` (100 %) of the replicas at the start of each
   ``up_period_s`` (15 s), with at least ``up_pods`` (4) (HPA's default policies, the larger
   wins); down by at most ``down_percent`` (20 %) per ``down_period_s`` (60 s) — the
   manifest's behaviour block;
4. clamp to [min_replicas, max_replicas].

Time is an argument: :func:`hpa_step` takes the state and ``now`` and returns the desired
replica count and the next state, so a test drives it as a table (tests/
test_autoscale_rules.py); the loop passes scaled seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class HpaRules:
    target: float = 1.0             # AverageValue: 1 → replicas = the signal
    tolerance: float = 0.1
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    up_percent: float = 100.0
    up_pods: int = 4
    up_period_s: float = 15.0
    down_percent: float = 20.0
    down_period_s: float = 60.0
    min_replicas: int = 1
    max_replicas: int = 1000


@dataclass(frozen=True, slots=True)
class HpaState:
    recommendations: tuple[tuple[float, int], ...] = ()   # (time, recommendation)
    events: tuple[tuple[float, int], ...] = ()            # (time, change in replicas)


@dataclass(frozen=True, slots=True)
class HpaDecision:
    desired: int
    recommendation: int          # after the tolerance, before stabilisation and policies
    stabilised: int              # after stabilisation, before the rate policies
    state: HpaState = field(repr=False)


def _raw_recommendation(metric: float, current: int, rules: HpaRules) -> int:
    if current > 0:
        ratio = metric / (rules.target * current)
        if abs(ratio - 1.0) <= rules.tolerance:
            return current
    return max(0, math.ceil(metric / rules.target - 1e-9))


def hpa_step(state: HpaState, now: float, metric: float, current: int,
             rules: HpaRules = HpaRules()) -> HpaDecision:
    """One HPA sync at ``now``: the replica count to set, given the metric and the current
    replica count (what the Deployment has, ready or not)."""
    if not math.isfinite(metric) or metric < 0:
        # HPA skips a sync whose metric is missing or invalid: keep what there is.
        return HpaDecision(current, current, current, state)
    rec = _raw_recommendation(metric, current, rules)
    horizon = max(rules.up_window_s, rules.down_window_s)
    recs = (*((t, r) for t, r in state.recommendations if now - t < horizon), (now, rec))
    up = min(r for t, r in recs if now - t <= rules.up_window_s)
    down = max(r for t, r in recs if now - t <= rules.down_window_s)
    stabilised = current
    if up > current:
        stabilised = up
    elif down < current:
        stabilised = down
    desired = stabilised
    events = tuple((t, d) for t, d in state.events
                   if now - t < max(rules.up_period_s, rules.down_period_s))
    if desired > current:
        added = sum(d for t, d in events if d > 0 and now - t < rules.up_period_s)
        start = current - added
        limit = max(math.ceil(start * (1 + rules.up_percent / 100)), start + rules.up_pods)
        desired = min(desired, limit)
    elif desired < current:
        removed = -sum(d for t, d in events if d < 0 and now - t < rules.down_period_s)
        start = current + removed
        limit = int(start * (1 - rules.down_percent / 100))
        desired = max(desired, limit)
    desired = min(max(desired, rules.min_replicas), rules.max_replicas)
    if desired != current:
        events = (*events, (now, desired - current))
    return HpaDecision(desired, rec, stabilised,
                       replace(state, recommendations=recs, events=events))


if __name__ == "__main__":
    import sys

    from loadtest.closedloop import main
    sys.exit(main())
