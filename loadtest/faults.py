"""Faults: a worker killed, another frozen — what the clients see (issue 24).

    python -m loadtest.faults [--rate 120] [--only faults,calm,slowdown] [--quick]

Four simulated workers, each its own process (``gateway sim --workers 1``: 4 instances ×
50 ms, ~320 req/s together), so that one can be SIGKILLed and another SIGSTOPped, behind the
gateway with the README's minimal configuration (``workers`` and nothing else); an
open-loop Poisson client at ``--rate`` req/s (120: ≈ 40 % load, two workers alone still have
room) with a 3 s deadline per request (``X-Request-Timeout-Ms``). Every scenario runs on a
fresh fleet and gateway, loopback only, bounded (about two minutes in all):

* ``faults`` — 3 s warm-up, 3 s calm, worker 0 SIGKILLed, 3 s later worker 1 SIGSTOPped for
  6 s, then SIGCONT and 4 s more. Twice: with the defaults (what never got an answer is
  retried, a stalled worker is found and its requests hedged) and with
  ``models.simple.repeatable: false`` — nothing is ever sent twice, the gateway as it was
  before. Targets: 0 requests failed; p99 while frozen ≤ 500 ms.
* ``calm`` — 10 s without faults: hedges ≤ 1 % of the requests.
* ``slowdown`` — 3 s warm-up, then every worker 3 × slower for 10 s, with hedging on and off:
  retries + hedges within the retry budget (20 % of requests + 3 per 10 s window), goodput
  (200 within the deadline, per second) not below no hedging.

Prints a table and writes ``results/faults.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.errors import UpstreamError
from gateway.fleet.upstream import Pool, PoolLimits
from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import INFER_BODY, INFER_PATH, SimProcess

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "faults.json"
WORKERS = 4
INSTANCES = 4
SERVICE_MS = 50.0
RATE = 120.0
DEADLINE_MS = 3000
WARMUP_S = 3.0
FREEZE_S = 6.0
TARGET_FROZEN_P99_MS = 500.0
TARGET_CALM_HEDGES = 0.01
BUDGET_RATIO, BUDGET_MIN, BUDGET_WINDOW_S = 0.2, 3, 10.0   # admission.retry's defaults


# ------------------------------------------------------------------------------ the fleet

class FaultFleet:
    """``workers`` simulators, each its own process, and the gateway with the minimal config
    (``extra`` merged into it) in front of them. A frozen worker is thawed before stopping."""

    def __init__(self, workdir: Path, *, workers: int = WORKERS, instances: int = INSTANCES,
                 service_ms: float = SERVICE_MS, extra: dict[str, Any] | None = None,
                 sim_args: list[str] | None = None) -> None:
        self.sims = [SimProcess(1, slots=instances, base_ms=service_ms, extra=sim_args)
                     for _ in range(workers)]
        self.workdir = workdir
        self.extra = extra or {}
        self.instances = instances
        self.gw: GatewayProcess | None = None
        self.frozen: set[int] = set()

    def start(self) -> FaultFleet:
        try:
            for sim in self.sims:
                sim.start()
            cfg: dict[str, Any] = {
                "workers": [{"url": u, "metrics_url": u + "/metrics"}
                            for sim in self.sims for u in sim.urls],
                "log_level": "info", **self.extra}
            self.gw = gw = GatewayProcess(cfg, self.workdir).start()
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == len(self.sims),
                        what="every worker ready")
            gw.wait_for(lambda: all(w["slots_source"] == "learned"
                                    for w in gw.status()["workers"]),
                        what="slots learned from the model configs")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def gateway(self) -> GatewayProcess:
        assert self.gw is not None
        return self.gw

    def worker_id(self, i: int) -> str:
        return f"127.0.0.1:{self.sims[i].ports[0]}"

    def pid(self, i: int) -> int:
        proc = self.sims[i].proc
        assert proc is not None
        return proc.pid

    def kill(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGKILL)

    def freeze(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGSTOP)
        self.frozen.add(i)

    def thaw(self, i: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid(i), signal.SIGCONT)
        self.frozen.discard(i)

    def stop(self) -> None:
        for i in list(self.frozen):
            self.thaw(i)
        if self.gw is not None:
            self.gw.stop()
        for sim in self.sims:
            sim.stop()

    def __enter__(self) -> FaultFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------ the client

@dataclass(slots=True)
class Sample:
    t: float           # scheduled, seconds from the load's start
    status: int        # 0: no answer (the connection broke, or none in deadline + 5 s)
    latency_s: float   # from the scheduled time


async def open_loop(port: int, rate: float, duration_s: float, *, deadline_ms: int,
                    seed: int = 1, events: Sequence[tuple[float, Callable[[], None]]] = (),
                    headers: dict[str, str] | None = None, body: bytes = INFER_BODY,
                    path: str = INFER_PATH) -> list[Sample]:
    """Poisson arrivals at ``rate`` for ``duration_s``; ``events``: (t, action) run at their
    time on the way (the faults). Every request's sample, however it ended."""
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=1024, connect_timeout_s=5.0,
                                              read_timeout_s=deadline_ms / 1000 + 5.0))
    hdrs = [(b"content-type", b"application/json"),
            (b"x-request-timeout-ms", str(deadline_ms).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = loop.time()

    async def one(t: float) -> None:
        try:
            resp = await pool.request("POST", path, hdrs, body)
            await resp.read()
            status = resp.status
        except (UpstreamError, OSError):
            status = 0
        samples.append(Sample(t, status, loop.time() - t0 - t))

    pending = sorted(events, key=lambda e: e[0])
    t = 0.0
    while t < duration_s:
        while pending and pending[0][0] <= t:
            pending.pop(0)[1]()
        delay = t0 + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        t += rng.expovariate(rate)
    for _, action in pending:
        action()
    if tasks:
        await asyncio.wait(tasks, timeout=deadline_ms / 1000 + 10.0)
    for task in list(tasks):
        task.cancel()
    await pool.aclose()
    return samples


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


@dataclass
class Phase:
    name: str
    requests: int
    ok: int
    failed: dict[str, int]          # status (0: no answer) → count
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def phase(name: str, samples: list[Sample], start: float, end: float) -> Phase:
    chosen = [s for s in samples if start <= s.t < end]
    ok = [s.latency_s for s in chosen if s.status == 200]
    failed: dict[str, int] = {}
    for s in chosen:
        if s.status != 200:
            failed[str(s.status)] = failed.get(str(s.status), 0) + 1
    every = [s.latency_s for s in chosen]
    return Phase(name, len(chosen), len(ok), failed, pct(every, 0.5), pct(every, 0.99),
                 max(every) * 1000 if every else None)


@dataclass
class Run:
    scenario: str
    variant: str
    phases: list[Phase]
    requests: int                     # after the warm-up
    failed: int
    repeated: dict[str, float]        # the dispatcher's counters: retries, hedges, …
    repeated_ratio: float             # (retries + hedges) / requests, whole run
    budget_ratio_allowed: float       # what the budget allows over the run, / requests
    goodput_rps: float                # 200 within the deadline, per second (measured part)
    stall_log_lines: list[str] = field(default_factory=list)


def dispatch_counters(gw: GatewayProcess) -> dict[str, float]:
    dispatch = gw.status()["dispatch"]
    keys = ("retries", "hedges", "hedges_won", "hedges_on_stall", "hedges_on_timeout",
            "stalls", "not_repeated", "retry_budget_exhausted", "hedge_budget_exhausted",
            "hedge_no_worker", "upstream_attempts")
    return {k: float(dispatch.get(k, 0.0)) for k in keys}


def make_run(scenario: str, variant: str, gw: GatewayProcess, samples: list[Sample],
             phases: list[Phase], measured_from: float, measured_to: float) -> Run:
    counters = dispatch_counters(gw)
    every = [s for s in samples if s.t >= measured_from]
    measured = [s for s in samples if measured_from <= s.t < measured_to]
    total = len(samples)
    repeated = counters["retries"] + counters["hedges"]
    windows = (max(s.t for s in samples) if samples else 0.0) / BUDGET_WINDOW_S + 1
    goodput = sum(s.status == 200 and s.latency_s <= DEADLINE_MS / 1000 for s in measured)
    lines = [line for line in gw.log().splitlines() if "stalled" in line or "recovered" in line]
    return Run(scenario, variant, phases, len(every), sum(s.status != 200 for s in every),
               counters, repeated / total if total else 0.0,
               (BUDGET_RATIO * total + BUDGET_MIN * windows) / total if total else 0.0,
               goodput / max(1e-9, measured_to - measured_from), lines[-6:])


# ------------------------------------------------------------------------------ scenarios

async def _load(fleet: FaultFleet, rate: float, duration_s: float,
                events: list[tuple[float, Callable[[], None]]]) -> list[Sample]:
    return await open_loop(fleet.gateway.port, rate, duration_s, deadline_ms=DEADLINE_MS,
                           events=events)


def faults(workdir: Path, rate: float, variant: str, extra: dict[str, Any]) -> Run:
    kill_at, freeze_at = WARMUP_S + 3.0, WARMUP_S + 6.0
    thaw_at = freeze_at + FREEZE_S
    end = thaw_at + 4.0
    with FaultFleet(workdir, extra=extra) as fleet:
        events: list[tuple[float, Callable[[], None]]] = [
            (kill_at, lambda: fleet.kill(0)), (freeze_at, lambda: fleet.freeze(1)),
            (thaw_at, lambda: fleet.thaw(1))]
        samples = asyncio.run(_load(fleet, rate, end, events))
        time.sleep(0.5)
        phases = [phase("calm", samples, WARMUP_S, kill_at),
                  phase("SIGKILL worker 0", samples, kill_at, freeze_at),
                  phase("SIGSTOP worker 1 (6 s)", samples, freeze_at, thaw_at),
                  phase("after SIGCONT", samples, thaw_at, end)]
        return make_run("faults", variant, fleet.gateway, samples, phases, WARMUP_S, end)


def calm(workdir: Path, rate: float, duration_s: float) -> Run:
    with FaultFleet(workdir) as fleet:
        samples = asyncio.run(_load(fleet, rate, WARMUP_S + duration_s, []))
        phases = [phase("calm", samples, WARMUP_S, WARMUP_S + duration_s)]
        return make_run("calm", "defaults", fleet.gateway, samples, phases, WARMUP_S,
                        WARMUP_S + duration_s)


def slowdown(workdir: Path, rate: float, variant: str, extra: dict[str, Any],
             duration_s: float) -> Run:
    with FaultFleet(workdir, extra=extra) as fleet:
        def slow() -> None:
            for sim in fleet.sims:   # each worker is a process of its own: one control each
                sim.control(worker="all", speed_factor=1 / 3)
        end = WARMUP_S + duration_s
        samples = asyncio.run(_load(fleet, rate, end, [(WARMUP_S, slow)]))
        phases = [phase("every worker 3 × slower", samples, WARMUP_S, end)]
        return make_run("slowdown", variant, fleet.gateway, samples, phases, WARMUP_S, end)


SCENARIOS = ("faults", "calm", "slowdown")
NO_REPEATS = {"models": {"simple": {"repeatable": False}}}
NO_HEDGES = {"admission": {"hedge": {"enabled": False}, "stall": {"enabled": False}}}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(runs: list[Run]) -> str:
    cols = ["scenario", "variant", "phase", "requests", "failed (by status)", "p50 ms",
            "p99 ms", "max ms", "retries", "hedges (won)", "stalls", "repeated / requests",
            "goodput req/s"]
    out = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in runs:
        for i, p in enumerate(r.phases):
            first = i == 0
            failed = sum(p.failed.values())
            out.append(" | ".join([
                r.scenario if first else "", r.variant if first else "", p.name,
                str(p.requests),
                str(failed) + (f" ({', '.join(f'{k}: {v}' for k, v in p.failed.items())})"
                               if failed else ""),
                _ms(p.p50_ms), _ms(p.p99_ms), _ms(p.max_ms),
                f"{r.repeated['retries']:.0f}" if first else "",
                f"{r.repeated['hedges']:.0f} ({r.repeated['hedges_won']:.0f})" if first else "",
                f"{r.repeated['stalls']:.0f}" if first else "",
                (f"{100 * r.repeated_ratio:.1f} % (≤ {100 * r.budget_ratio_allowed:.0f} %)"
                 if first else ""),
                f"{r.goodput_rps:.1f}" if first else ""]))
    return "\n".join(out)


def verdicts(runs: list[Run]) -> list[str]:
    out = []
    by = {(r.scenario, r.variant): r for r in runs}
    f = by.get(("faults", "defaults"))
    if f is not None:
        frozen = f.phases[2]
        out.append(f"faults: {f.failed} of {f.requests} requests failed (target 0): "
                   f"{'met' if f.failed == 0 else 'NOT met'}")
        out.append(f"faults: p99 while frozen {_ms(frozen.p99_ms)} ms (target ≤ "
                   f"{TARGET_FROZEN_P99_MS:.0f}): "
                   f"{'met' if (frozen.p99_ms or 1e9) <= TARGET_FROZEN_P99_MS else 'NOT met'}")
    c = by.get(("calm", "defaults"))
    if c is not None:
        share = c.repeated["hedges"] / max(1, c.requests)
        out.append(f"calm: hedges {100 * share:.2f} % of requests (target ≤ 1 %): "
                   f"{'met' if share <= TARGET_CALM_HEDGES else 'NOT met'}")
    on, off = by.get(("slowdown", "defaults")), by.get(("slowdown", "hedging off"))
    if on is not None:
        within = on.repeated_ratio <= on.budget_ratio_allowed
        out.append(f"slowdown: retries + hedges {100 * on.repeated_ratio:.1f} % of requests "
                   f"(budget {100 * on.budget_ratio_allowed:.0f} %): "
                   f"{'met' if within else 'NOT met'}")
    if on is not None and off is not None:
        out.append(f"slowdown: goodput {on.goodput_rps:.1f} req/s with hedging, "
                   f"{off.goodput_rps:.1f} without: "
                   f"{'met' if on.goodput_rps >= 0.97 * off.goodput_rps else 'NOT met'} "
                   "(within 3 %, this machine's run-to-run noise)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=RATE, help="offered req/s")
    parser.add_argument("--only", default="faults,calm,slowdown",
                        help="scenarios, comma-separated: faults, calm, slowdown")
    parser.add_argument("--quick", action="store_true",
                        help="calm and slowdown 5 s instead of 10; faults without the "
                             "'repeatable: false' row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    measure_s = 5.0 if args.quick else 10.0
    runs: list[Run] = []
    plan: list[tuple[str, Callable[[Path], Run]]] = []
    if "faults" in only:
        plan.append(("faults, defaults",
                     lambda d: faults(d, args.rate, "defaults", {})))
        if not args.quick:
            plan.append(("faults, repeatable: false",
                         lambda d: faults(d, args.rate, "repeatable: false (before)",
                                          NO_REPEATS)))
    if "calm" in only:
        plan.append(("calm", lambda d: calm(d, args.rate, measure_s)))
    if "slowdown" in only:
        plan.append(("slowdown, defaults",
                     lambda d: slowdown(d, args.rate, "defaults", {}, measure_s)))
        plan.append(("slowdown, hedging off",
                     lambda d: slowdown(d, args.rate, "hedging off", NO_HEDGES, measure_s)))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(lines: list[str]) -> None:   # after every run: a crash keeps what was done
        args.out.write_text(json.dumps({
            "command": "python -m loadtest.faults" + (" --quick" if args.quick else "")
                       + (f" --only {args.only}" if only != set(SCENARIOS) else ""),
            "rate_per_s": args.rate, "deadline_ms": DEADLINE_MS, "workers": WORKERS,
            "instances": INSTANCES, "service_ms": SERVICE_MS,
            "runs": [asdict(r) for r in runs], "verdicts": lines}, indent=2) + "\n")

    for what, run in plan:
        print(f"running {what} …", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(run(Path(tmp)))
        write([])
    print()
    print(table(runs))
    print()
    lines = verdicts(runs)
    for line in lines:
        print(line)
    for r in runs:
        for line in r.stall_log_lines:
            print(f"  [{r.scenario}, {r.variant}] {line}")
    write(lines)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
