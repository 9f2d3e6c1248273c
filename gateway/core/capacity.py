"""Capacity math: how many GPUs a load needs, what they cost, and how many replicas to ask for.

Pure functions over numbers; no I/O, no clock. The shell (metrics exporter, ``gateway plan``,
the replay benchmark) gathers the inputs and calls these.

Definitions used throughout (one place, so dashboards, rules and code agree):

* **instance rate** ``instance_rps``: requests per second one GPU (one replica) sustains while
  its p99 stays within the latency budget — the *knee* of its load test (:func:`find_knee`).
* **overhead**: extra work per request not in the benchmark (pre/post-processing, network,
  the gateway itself), as a fraction: demand in instance units is
  ``peak_rps / instance_rps × (1 + overhead)``.
* **target utilisation** (headroom target, optional): the fraction of that inflated capacity
  we are willing to use at peak, leaving ``1 − target`` for spikes. It divides the demand:
  ``peak / instance × (1 + overhead) / target``. Overhead and target multiply; with
  overhead 0.2 and target 0.8 a GPU is planned at 1 / (1.2 / 0.8) ≈ 67 % of its benchmark rate.
* **redundancy** N+k: ``k`` whole spare GPUs added *after* rounding up.

So ``required = ceil(peak / instance × (1 + overhead) / target) + k`` (target = 1 when not
given), the article's formula plus the optional target; 10,000 RPS at 5 RPS/GPU with 20 %
overhead is 2,400 GPUs, $4,800/hour at $2/GPU-hour, and 4 RPS/GPU costs $1,200/hour more.

Live signals (exported by the gateway, read by Prometheus rules and autoscalers):

* **fleet utilisation** = busy slots / slots over ready workers (0..1);
* **headroom** = 1 − utilisation / target: 1 when idle, 0 at the target, negative above it;
* **saturation**: :func:`fleet_saturation` is the instantaneous (in-flight + queued) / slots,
  demand over capacity, which may exceed 1; the exported ``gateway_fleet_saturation`` is its
  time view, the share of the last minute during which requests queued for a slot (0..1);
* **reactive desired replicas**: the Kubernetes HPA rule ``ceil(current × utilisation /
  target)``, unchanged within ±10 % (HPA's tolerance), plus ``k`` spares, clamped;
* **predictive desired replicas**: ``ceil(forecast_rps / (per_replica_rps × target)) + k``,
  clamped, where the forecast is taken ``lead_time_s`` ahead (the replicas' start-up time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

HOURS_PER_MONTH = 730.0  # 365 × 24 / 12, the cloud providers' billing month
DEFAULT_HPA_TOLERANCE = 0.1
_ABS_EPS = 1e-9   # a billionth of a GPU is float noise, not demand
_REL_EPS = 1e-12


def ceil_tolerant(value: float) -> int:
    """``ceil`` that forgives float noise: 10000 / 5 × 1.2 = 2400.0000000000005 → 2400."""
    return math.ceil(value - max(_ABS_EPS, _REL_EPS * abs(value)))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def required_gpus(
    peak_rps: float,
    instance_rps: float,
    overhead: float = 0.0,
    redundancy: int = 0,
    target_utilisation: float | None = None,
) -> int:
    """GPUs needed: ``ceil(peak / instance × (1 + overhead) / target) + redundancy``."""
    _require(peak_rps >= 0 and math.isfinite(peak_rps), "peak_rps must be a number >= 0")
    _require(instance_rps > 0 and math.isfinite(instance_rps), "instance_rps must be > 0")
    _require(overhead >= 0 and math.isfinite(overhead), "overhead must be >= 0")
    _require(redundancy >= 0, "redundancy must be >= 0")
    target = 1.0 if target_utilisation is None else target_utilisation
    _require(0 < target <= 1, "target utilisation (headroom) must be in (0, 1]")
    return ceil_tolerant(peak_rps / instance_rps * (1.0 + overhead) / target) + redundancy


@dataclass(frozen=True, slots=True)
class PlanInputs:
    peak_rps: float
    instance_rps: float
    overhead: float = 0.0
    redundancy: int = 0
    target_utilisation: float | None = None
    gpu_hour_cost: float = 0.0


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The answer for one set of inputs.

    ``utilisation_at_peak`` is peak RPS over the provisioned GPUs' benchmarked rate
    (``peak / (gpus × instance_rps)``), spares included: the fraction of measured capacity
    that peak traffic uses. The worked example runs at 1 / 1.2 ≈ 0.833.
    """

    gpus: int
    cost_per_hour: float
    cost_per_month: float
    utilisation_at_peak: float
    inputs: PlanInputs


def make_plan(inputs: PlanInputs) -> CapacityPlan:
    _require(inputs.gpu_hour_cost >= 0 and math.isfinite(inputs.gpu_hour_cost),
             "gpu_hour_cost must be >= 0")
    gpus = required_gpus(inputs.peak_rps, inputs.instance_rps, inputs.overhead,
                         inputs.redundancy, inputs.target_utilisation)
    cost = float(gpus) * inputs.gpu_hour_cost
    utilisation = inputs.peak_rps / (gpus * inputs.instance_rps) if gpus else 0.0
    return CapacityPlan(gpus=gpus, cost_per_hour=cost, cost_per_month=cost * HOURS_PER_MONTH,
                        utilisation_at_peak=utilisation, inputs=inputs)


@dataclass(frozen=True, slots=True)
class SensitivityRow:
    label: str
    gpus: int
    cost_per_hour: float
    delta_gpus: int
    delta_cost_per_hour: float


def _variant(inputs: PlanInputs, **changes: float | int | None) -> PlanInputs:
    values = {
        "peak_rps": inputs.peak_rps, "instance_rps": inputs.instance_rps,
        "overhead": inputs.overhead, "redundancy": inputs.redundancy,
        "target_utilisation": inputs.target_utilisation, "gpu_hour_cost": inputs.gpu_hour_cost,
    }
    values.update(changes)
    return PlanInputs(**values)  # type: ignore[arg-type]


def sensitivity(inputs: PlanInputs) -> tuple[SensitivityRow, ...]:
    """What each lever is worth: one RPS per instance less/more, ±10 % peak, ±10 points of
    overhead, one spare more. Rows whose variant is invalid (e.g. instance rate ≤ 0) are
    left out."""
    base = make_plan(inputs)
    candidates: list[tuple[str, PlanInputs]] = [
        (f"instance {inputs.instance_rps - 1:g} RPS (-1)",
         _variant(inputs, instance_rps=inputs.instance_rps - 1)),
        (f"instance {inputs.instance_rps + 1:g} RPS (+1)",
         _variant(inputs, instance_rps=inputs.instance_rps + 1)),
        (f"instance {inputs.instance_rps * 0.9:g} RPS (-10%)",
         _variant(inputs, instance_rps=inputs.instance_rps * 0.9)),
        (f"peak {inputs.peak_rps * 1.1:g} RPS (+10%)",
         _variant(inputs, peak_rps=inputs.peak_rps * 1.1)),
        (f"peak {inputs.peak_rps * 0.9:g} RPS (-10%)",
         _variant(inputs, peak_rps=inputs.peak_rps * 0.9)),
        (f"overhead {inputs.overhead + 0.1:.0%} (+10 pts)",
         _variant(inputs, overhead=inputs.overhead + 0.1)),
        (f"redundancy N+{inputs.redundancy + 1} (+1)",
         _variant(inputs, redundancy=inputs.redundancy + 1)),
    ]
    if inputs.overhead >= 0.1 - 1e-12:
        candidates.insert(6, (f"overhead {inputs.overhead - 0.1:.0%} (-10 pts)",
                              _variant(inputs, overhead=max(0.0, inputs.overhead - 0.1))))
    rows: list[SensitivityRow] = []
    for label, variant in candidates:
        if variant.instance_rps <= 0:
            continue
        plan = make_plan(variant)
        rows.append(SensitivityRow(label, plan.gpus, plan.cost_per_hour, plan.gpus - base.gpus,
                                   plan.cost_per_hour - base.cost_per_hour))
    return tuple(rows)


# --- the knee of a load test ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPoint:
    throughput_rps: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Knee:
    """Highest throughput whose p99 meets the budget.

    ``interpolated``: between ``points[index]`` (within) and ``points[index + 1]`` (beyond).
    ``budget_reached`` is False when no point exceeded the budget: the load test stopped
    short, and the real knee is at least ``throughput_rps``.
    """

    throughput_rps: float
    p99_ms: float
    index: int
    interpolated: bool
    budget_reached: bool


def find_knee(points: Sequence[LoadPoint], p99_budget_ms: float) -> Knee | None:
    """The knee of a load test, conservatively.

    Points are taken in the order the load was applied (rising offered load). The walk stops
    at the first point over budget; points after it are ignored even if they dip back under
    (a later lucky sample is not capacity). Between the last point within budget and the
    first beyond, throughput is interpolated linearly where the p99 chord crosses the budget.
    Latency rises convexly with load, so the true curve lies under the chord and the true
    p99 at the interpolated throughput is at or under the budget: the estimate errs low.

    Returns None when even the first point is over budget (no capacity at this budget).
    """
    _require(p99_budget_ms > 0, "p99 budget must be > 0")
    best: Knee | None = None
    for i, point in enumerate(points):
        if point.p99_ms <= p99_budget_ms:
            if best is None or point.throughput_rps >= best.throughput_rps:
                best = Knee(point.throughput_rps, point.p99_ms, i, False, False)
            continue
        if best is None:
            return None
        last = points[best.index]
        if point.throughput_rps <= last.throughput_rps or point.p99_ms <= last.p99_ms:
            return Knee(best.throughput_rps, best.p99_ms, best.index, False, True)
        fraction = (p99_budget_ms - last.p99_ms) / (point.p99_ms - last.p99_ms)
        rps = last.throughput_rps + fraction * (point.throughput_rps - last.throughput_rps)
        return Knee(rps, p99_budget_ms, best.index, fraction > 0, True)
    return best


# --- live signals ---------------------------------------------------------------------------


def fleet_utilisation(busy_slots: float, total_slots: float) -> float:
    """Busy slots over slots of ready workers, in [0, 1]; a fleet with no slots and work
    waiting is fully used (1.0), an empty idle one is 0.0."""
    if total_slots <= 0:
        return 1.0 if busy_slots > 0 else 0.0
    return min(1.0, max(0.0, busy_slots / total_slots))


def fleet_saturation(in_flight: float, queued: float, total_slots: float) -> float:
    """(in-flight + queued) / slots: demand over capacity, > 1 when work waits.
    With no slots, any demand is reported as infinitely saturated (math.inf)."""
    demand = max(0.0, in_flight) + max(0.0, queued)
    if total_slots <= 0:
        return math.inf if demand > 0 else 0.0
    return demand / total_slots


def headroom(utilisation: float, target_utilisation: float) -> float:
    """1 − utilisation / target: 1 idle, 0 at target, negative above target."""
    _require(0 < target_utilisation <= 1, "target utilisation must be in (0, 1]")
    return 1.0 - utilisation / target_utilisation


def _clamp(value: int, min_replicas: int, max_replicas: int) -> int:
    return max(min_replicas, min(max_replicas, value))


def reactive_desired_replicas(
    current_replicas: int,
    utilisation: float,
    target_utilisation: float,
    redundancy: int = 0,
    min_replicas: int = 0,
    max_replicas: int = 1_000_000,
    tolerance: float = DEFAULT_HPA_TOLERANCE,
) -> int:
    """HPA's rule with N+k: ``ceil(current × utilisation / target) + k``, clamped.

    ``current × utilisation`` is the busy work in replica units, so the fixed point is
    ``ceil(busy / target) + k`` whether or not ``current`` already counts the spares.
    Tolerance as in HPA: when the unrounded proposal is within ±tolerance of ``current``
    nothing changes (with k = 0 this is exactly HPA's ``|utilisation / target − 1| ≤ 0.1``).
    """
    _require(0 < target_utilisation <= 1, "target utilisation must be in (0, 1]")
    _require(current_replicas >= 0 and redundancy >= 0, "replicas must be >= 0")
    busy = max(0.0, current_replicas * utilisation)
    raw = busy / target_utilisation + redundancy
    if current_replicas > 0 and abs(raw / current_replicas - 1.0) <= tolerance:
        return _clamp(current_replicas, min_replicas, max_replicas)
    return _clamp(ceil_tolerant(busy / target_utilisation) + redundancy, min_replicas,
                  max_replicas)


def predictive_desired_replicas(
    forecast_rps: float,
    per_replica_rps: float,
    target_utilisation: float,
    redundancy: int = 0,
    min_replicas: int = 0,
    max_replicas: int = 1_000_000,
) -> int:
    """``ceil(forecast / (per_replica × target)) + k``, clamped. The caller chooses the
    forecast: the rate expected ``lead_time_s`` ahead, usually floored by the rate observed
    now so that a surprise is answered at least as fast as the reactive rule would."""
    _require(per_replica_rps > 0, "per_replica_rps must be > 0")
    _require(0 < target_utilisation <= 1, "target utilisation must be in (0, 1]")
    need = ceil_tolerant(max(0.0, forecast_rps) / (per_replica_rps * target_utilisation))
    return _clamp(need + redundancy, min_replicas, max_replicas)



@dataclass(frozen=True, slots=True)
class CapacityClock:
    """The clock the forecaster runs on: ``(now + offset_s) × time_scale``.

    ``now`` is the shell's clock (monotonic seconds); ``offset_s`` maps it to Unix time (the
    frame of ``capacity.history_file``), taken once by the shell. ``time_scale``
    (``capacity.time_scale``) compresses time for a benchmark: at 300 one real second counts
    as five minutes, so the history step, the lead time and the daily and weekly seasons are
    all in scaled seconds. Rates stay in real requests per second: arrivals counted over a
    scaled interval are multiplied by ``time_scale`` (:meth:`arrivals`)."""

    time_scale: float = 1.0
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        _require(math.isfinite(self.time_scale) and self.time_scale > 0,
                 "time_scale must be a finite number > 0")

    def at(self, now: float) -> float:
        return (now + self.offset_s) * self.time_scale

    def arrivals(self, count: float) -> float:
        """Arrivals counted in real time, as the forecaster must record them so that its
        per-step rates are real requests per second."""
        return count * self.time_scale

    def real_s(self, scaled_s: float) -> float:
        """A span of scaled seconds in real seconds (a half-life, a sampling interval)."""
        return scaled_s / self.time_scale
