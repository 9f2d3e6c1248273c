"""Cost of one routing decision vs fleet size, per policy and picker.

``python -m loadtest.decision_cost [--sizes 10,100,1000,10000] [--budget-s 0.6]``

Each cell times ``Router.decide`` alone (``perf_counter_ns`` around the call) over a
fleet at a steady ~45 % load (one P2C row with 95 % of workers full): live
``InFlightCounters`` start with random counts, and after each decision the oldest request
ends and the new one begins, so the total stays put while counts move. Signals vary per
worker (free memory, pending); a learned memory estimate makes the memory filter run.
Also measured: building the ``RoutingTable`` (the shell does it on membership or
eligibility changes) and one ``update`` (every scrape). Prints a table and writes
``results/decision_cost.json``. Bounded: each cell stops at ``--max-decisions`` or
``--budget-s`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from gateway.core.config import RoutingConfig
from gateway.core.routing import InFlightCounters, Router, RoutingTable
from gateway.core.types import (
    GpuSignal,
    ModelKey,
    ModelSignal,
    Route,
    WorkerSignals,
    WorkerSnapshot,
)

GIB = 2**30
SLOTS = 8
MODEL = ModelKey("resnet50")
# name, config, fraction of workers at their slot limit (the rest: random 0..slots-1)
VARIANTS: tuple[tuple[str, RoutingConfig, float], ...] = (
    ("p2c", RoutingConfig(picker="p2c"), 0.0),
    ("p2c@95%full", RoutingConfig(picker="p2c"), 0.95),
    ("p2c+pack", RoutingConfig(picker="p2c", pack=True), 0.0),
    ("full_scan", RoutingConfig(picker="full_scan"), 0.0),
    ("round_robin", RoutingConfig(policy="round_robin"), 0.0),
    ("random", RoutingConfig(policy="random"), 0.0),
    ("least_inflight", RoutingConfig(policy="least_inflight"), 0.0),
)


def fleet(n: int, rng: random.Random) -> list[WorkerSnapshot]:
    out = []
    for i in range(n):
        free_gib = rng.uniform(2, 70)
        sig = WorkerSignals(
            scraped_at=0.0,
            gpus=(GpuSignal(f"GPU-{i}", 80 * GIB, (80 - free_gib) * GIB, rng.random()),),
            models={MODEL.name: ModelSignal(pending=float(rng.randint(0, 3))),
                    "bert": ModelSignal(pending=float(rng.randint(0, 2)))})
        out.append(WorkerSnapshot(
            id=f"10.0.{i // 250}.{i % 250}:8000", pool_priority=0, ready=True,
            models_ready=frozenset({MODEL.name, f"{MODEL.name}/1", "bert"}), slots=SLOTS,
            in_flight=0, in_flight_model=0, signals=sig, latency_ewma_s=rng.uniform(0.01, 0.03),
            traffic_share=1.0 if rng.random() > 0.01 else 0.5))
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure(table: RoutingTable, snapshots: list[WorkerSnapshot], config: RoutingConfig,
            max_decisions: int, budget_s: float, seed: int,
            full_fraction: float) -> dict[str, float]:
    rng = random.Random(seed)
    load = InFlightCounters()
    in_flight: deque[str] = deque()
    for s in snapshots:   # a steady load (~45 % unless full_fraction), varied per worker
        count = SLOTS if rng.random() < full_fraction else rng.randint(0, SLOTS - 1)
        for _ in range(count):
            load.begin(s.id, MODEL.name)
            in_flight.append(s.id)
    rng.shuffle(in_flight)
    router = Router(config, rng=random.Random(seed))
    timings_ns: list[int] = []
    refused = 0
    deadline = time.perf_counter() + budget_s
    clock = time.perf_counter_ns
    for i in range(max_decisions):
        t0 = clock()
        decision = router.decide(table, MODEL, load, learned_bytes_per_request=1.0 * GIB)
        timings_ns.append(clock() - t0)
        if isinstance(decision, Route):
            load.begin(decision.worker, MODEL.name)
            in_flight.append(decision.worker)
        else:
            refused += 1
        if in_flight:
            load.end(in_flight.popleft(), MODEL.name)
        if i % 64 == 0 and time.perf_counter() > deadline:
            break
    us = sorted(t / 1000 for t in timings_ns)
    return {"decisions": len(us), "p50_us": percentile(us, 0.5), "p99_us": percentile(us, 0.99),
            "mean_us": statistics.fmean(us), "refused": refused}


def table_costs(snapshots: list[WorkerSnapshot]) -> dict[str, float]:
    build_ms = float("inf")
    for _ in range(3):   # best of three: a GC pass of earlier cells' garbage is not ours
        gc.collect()
        t0 = time.perf_counter()
        table = RoutingTable(snapshots)
        build_ms = min(build_ms, (time.perf_counter() - t0) * 1000)
    probe = snapshots[len(snapshots) // 2]
    refreshed = replace(probe, latency_ewma_s=probe.latency_ewma_s * 1.1)
    drained = replace(probe, ready=False)
    t0 = time.perf_counter_ns()
    table.update(refreshed)                      # signals only: O(1)
    update_us = (time.perf_counter_ns() - t0) / 1000
    t0 = time.perf_counter_ns()
    table.update(drained)                        # eligibility: re-indexed
    reindex_us = (time.perf_counter_ns() - t0) / 1000
    return {"build_ms": build_ms, "update_us": update_us, "reindex_us": reindex_us}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.decision_cost",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--max-decisions", type=int, default=20000)
    parser.add_argument("--budget-s", type=float, default=0.6, help="time cap per cell")
    parser.add_argument("--out", default="results/decision_cost.json")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    rows: list[dict[str, object]] = []
    tables: list[dict[str, object]] = []
    print(f"{'workers':>8} {'variant':<15} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9} "
          f"{'decisions':>9}")
    for n in sizes:
        snapshots = fleet(n, random.Random(args.seed))
        tables.append({"workers": n, **table_costs(snapshots)})
        table = RoutingTable(snapshots)
        for name, config, full_fraction in VARIANTS:
            cell = measure(table, snapshots, config, args.max_decisions, args.budget_s,
                           args.seed, full_fraction)
            rows.append({"workers": n, "variant": name, "policy": config.policy,
                         "picker": config.picker, "pack": config.pack,
                         "full_fraction": full_fraction, **cell})
            print(f"{n:>8} {name:<15} {cell['p50_us']:>9.1f} {cell['p99_us']:>9.1f} "
                  f"{cell['mean_us']:>9.1f} {int(cell['decisions']):>9}", flush=True)
    print(f"\n{'workers':>8} {'table build ms':>15} {'update µs':>10} {'re-index µs':>12}")
    for t in tables:
        print(f"{t['workers']:>8} {t['build_ms']:>15.1f} {t['update_us']:>10.1f} "
              f"{t['reindex_us']:>12.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "decision_cost", "python": platform.python_version(),
        "machine": platform.machine(), "slots_per_worker": SLOTS,
        "unix_time": time.time(), "decisions": rows, "table": tables}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
