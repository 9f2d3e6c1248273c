"""``gateway plan``: how many GPUs, at what cost, from a peak rate or a load-test result.

    gateway plan --peak-rps 10000 --instance-rps 5 --overhead 0.2 --redundancy 0 \\
                 --gpu-hour-cost 2 [--json] [--plot plan.png]

The per-GPU rate comes from ``--instance-rps`` or from a load test with ``--p99-budget-ms``:

* ``--from-locust FILE`` (repeatable): Locust's ``*_stats_history.csv`` — one point per
  user-count plateau: throughput from the request-count delta over the plateau, p99 from
  the plateau's last row (Locust writes *cumulative* percentiles there unless run with
  ``--csv-full-history``, so the p99 of later plateaus is understated; a warning says so) —
  or ``*_stats.csv``: its ``Aggregated`` row is one point.
* ``--from-bench FILE``: JSON ``{"points": [{"throughput_rps": …, "p99_ms": …}, …]}`` in the
  order load was applied; any JSON holding such a list (keys ``throughput_rps``/``rps``/
  ``req_per_s`` and ``p99_ms``/``p99_s``) is accepted, e.g. the overhead benchmark's.

The knee (:func:`gateway.core.capacity.find_knee`) is the per-GPU rate. ``--trace FILE`` (CSV
``t_s,rps`` or JSON ``{"t_s": […], "rps": […]}``) gives the peak when ``--peak-rps`` is absent
and adds forecast-vs-capacity to ``--plot``. Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from gateway.core.capacity import (
    HOURS_PER_MONTH,
    CapacityPlan,
    Knee,
    LoadPoint,
    PlanInputs,
    SensitivityRow,
    find_knee,
    make_plan,
    sensitivity,
)


class PlanError(Exception):
    """Bad input: printed as ``gateway plan: error: …`` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise PlanError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gateway plan", description="Capacity plan: GPUs and cost for a peak "
                "load, from a per-GPU rate or a load test's knee.")
    p.add_argument("--peak-rps", type=float, help="peak requests per second to serve")
    p.add_argument("--instance-rps", type=float, help="requests/s one GPU sustains within "
                   "the latency budget")
    p.add_argument("--from-locust", action="append", default=[], metavar="CSV",
                   help="Locust *_stats_history.csv or *_stats.csv (repeatable)")
    p.add_argument("--from-bench", metavar="JSON", help='benchmark JSON {"points": '
                   '[{"throughput_rps": …, "p99_ms": …}]}')
    p.add_argument("--p99-budget-ms", type=float, help="latency budget for the knee")
    p.add_argument("--overhead", type=float, default=0.0, help="system overhead fraction "
                   "(0.2 = 20%%; default 0)")
    p.add_argument("--redundancy", type=int, default=0, help="N+k spare GPUs (default 0)")
    p.add_argument("--headroom", type=float, default=None, metavar="TARGET",
                   help="target utilisation in (0, 1], e.g. 0.7 leaves 30%% headroom "
                   "(default off)")
    p.add_argument("--gpu-hour-cost", type=float, default=0.0, help="$ per GPU-hour "
                   "(default 0: costs shown as 0)")
    p.add_argument("--trace", metavar="FILE", help="arrival-rate trace (CSV t_s,rps or JSON)")
    p.add_argument("--lead-time-s", type=float, default=120.0, help="forecast lead for the "
                   "trace plot (default 120)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG: latency vs throughput "
                   "with knee and budget; forecast vs capacity with --trace")
    return p


# --- reading load-test results --------------------------------------------------------------


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise PlanError(f"{where}: expected a finite number, got {text!r}")
    return value


def read_locust_csv(path: Path, warnings: list[str]) -> list[LoadPoint]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise PlanError(f"{path}: no rows")
    header = rows[0].keys()
    if "99%" not in header:
        raise PlanError(f"{path}: not a Locust stats CSV (no '99%' column)")
    if "Timestamp" in header:
        return _locust_history_points(path, rows, warnings)
    if "Request Count" in header:
        agg = [r for r in rows if r.get("Name") == "Aggregated"] or rows[-1:]
        row = agg[0]
        if row["99%"] in ("N/A", ""):
            raise PlanError(f"{path}: Aggregated row has no requests")
        return [LoadPoint(_number(row["Requests/s"], f"{path}: Requests/s"),
                          _number(row["99%"], f"{path}: 99%"))]
    raise PlanError(f"{path}: not a Locust stats CSV (no Timestamp or Request Count column)")


def _locust_history_points(path: Path, rows: list[dict[str, str]],
                           warnings: list[str]) -> list[LoadPoint]:
    full_history = any(r.get("Name") not in ("Aggregated", None) for r in rows)
    if not full_history:
        warnings.append(f"{path}: Locust wrote cumulative percentiles (no --csv-full-history); "
                        "p99 of later load steps is understated")
    agg = [r for r in rows if r.get("Name") == "Aggregated" and r["99%"] not in ("N/A", "")]
    plateaus: list[list[dict[str, str]]] = []
    for row in agg:
        if plateaus and plateaus[-1][0]["User Count"] == row["User Count"]:
            plateaus[-1].append(row)
        else:
            plateaus.append([row])
    points: list[LoadPoint] = []
    for plateau in plateaus:
        if len(plateau) < 2:
            continue  # a ramp row, not a plateau
        first, last = plateau[0], plateau[-1]
        span_s = _number(last["Timestamp"], f"{path}: Timestamp") - _number(
            first["Timestamp"], f"{path}: Timestamp")
        done = _number(last["Total Request Count"], f"{path}: Total Request Count") - _number(
            first["Total Request Count"], f"{path}: Total Request Count")
        if span_s > 0 and done >= 0:
            rps = done / span_s
        else:
            rps = statistics.fmean(_number(r["Requests/s"], f"{path}: Requests/s")
                                   for r in plateau)
        tail = plateau[len(plateau) // 2:]
        p99 = (statistics.median(_number(r["99%"], f"{path}: 99%") for r in tail)
               if full_history else _number(last["99%"], f"{path}: 99%"))
        points.append(LoadPoint(rps, p99))
    if not points:
        raise PlanError(f"{path}: no load plateau (two or more rows at one user count) found")
    return points


_RPS_KEYS = ("throughput_rps", "rps", "req_per_s", "requests_per_s")
_P99_KEYS_MS = ("p99_ms",)
_P99_KEYS_S = ("p99_s",)


def _as_point(item: object) -> LoadPoint | None:
    if not isinstance(item, dict):
        return None
    rps = next((item[k] for k in _RPS_KEYS if isinstance(item.get(k), int | float)), None)
    p99: float | None = next((float(item[k]) for k in _P99_KEYS_MS
                              if isinstance(item.get(k), int | float)), None)
    if p99 is None:
        p99 = next((float(item[k]) * 1000.0 for k in _P99_KEYS_S
                    if isinstance(item.get(k), int | float)), None)
    if rps is None or p99 is None:
        return None
    return LoadPoint(float(rps), p99)


def _find_points(data: object) -> list[LoadPoint] | None:
    if isinstance(data, list):
        points = [_as_point(x) for x in data]
        if points and all(p is not None for p in points):
            return [p for p in points if p is not None]
        children: list[object] = list(data)
    elif isinstance(data, dict):
        if isinstance(data.get("points"), list):
            found = _find_points(data["points"])
            if found:
                return found
        children = list(data.values())
    else:
        return None
    for child in children:
        found = _find_points(child)
        if found:
            return found
    return None


def read_bench_json(path: Path) -> list[LoadPoint]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno}") from None
    points = _find_points(data)
    if not points:
        raise PlanError(f'{path}: no list of {{"throughput_rps": …, "p99_ms": …}} points found')
    return points


def read_trace(path: Path) -> tuple[list[float], list[float]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror}") from None
    times: list[float] = []
    rates: list[float] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            times = [float(x) for x in data["t_s"]]
            rates = [float(x) for x in data["rps"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PlanError(f'{path}: expected JSON {{"t_s": [...], "rps": [...]}}') from None
    else:
        for i, row in enumerate(csv.reader(text.splitlines())):
            if not row or (i == 0 and not row[0].strip().lstrip("-").replace(".", "").isdigit()):
                continue
            if len(row) < 2:
                raise PlanError(f"{path}: line {i + 1}: expected t_s,rps")
            times.append(_number(row[0], f"{path}: line {i + 1}"))
            rates.append(_number(row[1], f"{path}: line {i + 1}"))
    if len(times) != len(rates) or len(times) < 2:
        raise PlanError(f"{path}: a trace needs two or more (t_s, rps) pairs")
    return times, rates


# --- the plan -------------------------------------------------------------------------------


@dataclass(slots=True)
class PlanResult:
    plan: CapacityPlan
    rows: tuple[SensitivityRow, ...]
    knee: Knee | None = None
    points: list[LoadPoint] = field(default_factory=list)
    source: str = "--instance-rps"
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "gpus": plan.gpus,
            "cost_per_hour": plan.cost_per_hour,
            "cost_per_month": plan.cost_per_month,
            "hours_per_month": HOURS_PER_MONTH,
            "utilisation_at_peak": plan.utilisation_at_peak,
            "inputs": asdict(plan.inputs),
            "instance_rps_source": self.source,
            "knee": asdict(self.knee) if self.knee else None,
            "points": [asdict(p) for p in self.points],
            "sensitivity": [asdict(r) for r in self.rows],
            "warnings": self.warnings,
        }


def compute(args: argparse.Namespace) -> tuple[PlanResult, tuple[list[float], list[float]] | None]:
    warnings: list[str] = []
    trace = read_trace(Path(args.trace)) if args.trace else None
    peak = args.peak_rps
    if peak is None:
        if trace is None:
            raise PlanError("--peak-rps is required (or --trace to take the peak from)")
        peak = max(trace[1])
    sources = bool(args.from_locust) + bool(args.from_bench) + (args.instance_rps is not None)
    if sources != 1:
        raise PlanError("give exactly one of --instance-rps, --from-locust, --from-bench")
    knee: Knee | None = None
    points: list[LoadPoint] = []
    if args.instance_rps is not None:
        instance_rps = args.instance_rps
        source = "--instance-rps"
    else:
        if args.p99_budget_ms is None:
            raise PlanError("--p99-budget-ms is required with --from-locust/--from-bench")
        if args.from_bench:
            points = read_bench_json(Path(args.from_bench))
            source = args.from_bench
        else:
            for name in args.from_locust:
                points += read_locust_csv(Path(name), warnings)
            source = ", ".join(args.from_locust)
        try:
            knee = find_knee(points, args.p99_budget_ms)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        if knee is None:
            raise PlanError(f"no load-test point meets p99 <= {args.p99_budget_ms:g} ms")
        if not knee.budget_reached:
            warnings.append("no point exceeded the budget: the load test stopped short, the "
                            "per-GPU rate is a lower bound")
        instance_rps = knee.throughput_rps
    inputs = PlanInputs(peak_rps=peak, instance_rps=instance_rps, overhead=args.overhead,
                        redundancy=args.redundancy, target_utilisation=args.headroom,
                        gpu_hour_cost=args.gpu_hour_cost)
    try:
        plan = make_plan(inputs)
        rows = sensitivity(inputs)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return PlanResult(plan, rows, knee, points, source, warnings), trace


def render_table(result: PlanResult) -> str:
    plan, i = result.plan, result.plan.inputs
    target = "off" if i.target_utilisation is None else f"{i.target_utilisation:.0%}"
    knee = ""
    if result.knee:
        knee = (f"  (knee at p99 {result.knee.p99_ms:g} ms"
                f"{', interpolated' if result.knee.interpolated else ''}; {result.source})")
    lines = [
        "Capacity plan",
        f"  peak load             {i.peak_rps:,.6g} RPS",
        f"  per-GPU rate          {i.instance_rps:,.6g} RPS{knee}",
        f"  overhead              {i.overhead:.0%}",
        f"  target utilisation    {target}",
        f"  redundancy            N+{i.redundancy}",
        f"  GPUs required         {plan.gpus:,}",
        f"  utilisation at peak   {plan.utilisation_at_peak:.1%} of the benchmarked rate",
        f"  cost                  ${plan.cost_per_hour:,.2f}/hour   "
        f"${plan.cost_per_month:,.0f}/month ({HOURS_PER_MONTH:g} h)",
        "",
        "Sensitivity (one change at a time)",
        f"  {'change':<32}{'GPUs':>9}{'Δ GPUs':>9}{'$/hour':>14}{'Δ $/hour':>14}",
    ]
    for r in result.rows:
        lines.append(f"  {r.label:<32}{r.gpus:>9,}{r.delta_gpus:>+9,}"
                     f"{r.cost_per_hour:>14,.2f}{r.delta_cost_per_hour:>+14,.2f}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def write_plot(path: Path, result: PlanResult, budget_ms: float | None,
               trace: tuple[list[float], list[float]] | None, lead_time_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (1 if result.points else 0) + (1 if trace else 0)
    if panels == 0:
        raise PlanError("--plot needs load-test points (--from-locust/--from-bench) or --trace")
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.2 * panels), squeeze=False)
    ax_iter = iter(axes[:, 0])
    if result.points:
        ax = next(ax_iter)
        ax.plot([p.throughput_rps for p in result.points], [p.p99_ms for p in result.points],
                "o-", label="p99 (load test)")
        if budget_ms is not None:
            ax.axhline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:g} ms")
        if result.knee:
            ax.axvline(result.knee.throughput_rps, color="green", linestyle=":",
                       label=f"knee {result.knee.throughput_rps:.3g} RPS")
        ax.set_xlabel("throughput (RPS)")
        ax.set_ylabel("p99 latency (ms, log)")
        ax.set_yscale("log")
        ax.set_title("Latency vs throughput per GPU")
        ax.legend()
    if trace:
        _plot_trace(next(ax_iter), result, trace, lead_time_s)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise PlanError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)


def _plot_trace(ax: Any, result: PlanResult, trace: tuple[list[float], list[float]],
                lead_time_s: float) -> None:
    from gateway.core.forecast import Forecaster

    times, rates = trace
    step_s = max(1.0, (times[-1] - times[0]) / max(1, len(times) - 1))
    forecaster = Forecaster(step_s=step_s, max_points=max(len(times), 1))
    predicted: list[float] = []
    for t, rate in zip(times, rates, strict=True):
        predicted.append(forecaster.forecast(t, lead_time_s))
        forecaster.record_rate(t, rate)
    hours = [(t - times[0]) / 3600.0 for t in times]
    i = result.plan.inputs
    serving = max(0, result.plan.gpus - i.redundancy) * i.instance_rps / (1.0 + i.overhead)
    ax.plot(hours, rates, label="arrival rate (trace)")
    ax.plot([h + lead_time_s / 3600.0 for h in hours], predicted, alpha=0.8,
            label=f"forecast {lead_time_s:g} s ahead")
    ax.axhline(serving, color="red", linestyle="--",
               label="provisioned capacity (benchmarked rate, spares excluded)")
    if i.target_utilisation is not None:
        ax.axhline(serving * i.target_utilisation, color="orange", linestyle=":",
                   label=f"at target utilisation {i.target_utilisation:.0%}")
    ax.set_xlabel("hours")
    ax.set_ylabel("RPS")
    ax.set_title("Forecast vs provisioned capacity")
    ax.legend()


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
        result, trace = compute(args)
        if args.plot:
            write_plot(Path(args.plot), result, args.p99_budget_ms, trace, args.lead_time_s)
    except PlanError as exc:
        print(f"gateway plan: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(render_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
