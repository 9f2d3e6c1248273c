"""``gateway demo`` and ``gateway loadtest``: the whole system on one machine, then a plan.

    gateway demo [--workers 3] [--duration 45] [--users 60] [--port 8000] [--out results/demo]
    gateway loadtest [--shape step|spike|diurnal] [--duration 60] [--users N] [--workers 2]
                     [--out results/loadtest]

Both start the embedded cluster (:class:`gateway.tools.local.TritonFleet`: real Triton servers with
different service times), the gateway in front of it — in this process, on its own event
loop in a thread, so no gateway process can outlive the command — and a bounded headless
Locust run (``loadtest/locustfile.py``, :class:`TritonUser`) against the gateway. Locust
writes its CSV, HTML and JSON reports under ``--out``.

``demo`` shows a live view while the spike runs — one frame a second, redrawn in place on a
terminal, one line a second otherwise (a pipe, ``TERM=dumb``): per-worker load, memory and
breaker, admitted and shed, RPS, p99 (from the gateway's latency histogram over the last few
seconds), desired replicas — and ends with the capacity plan computed from the run
(:mod:`gateway.plan`). ``loadtest`` prints a one-line summary and the ``gateway plan``
command for its results.

The demo configuration is made to show admission control on a small machine: slots learned
from the workers' model configs (one instance each: one request executing, one waiting), a
short queue, per-tenant token buckets on the tenants the Locust profile sends, and
a global rate limit — so the spike is partly shed (429/503) instead of queueing forever.

Ctrl-C (or SIGTERM) at any point stops Locust, the gateway and the Triton servers, and the
command exits 130 leaving no process behind; a second Ctrl-C during clean-up is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.core.config import GatewayConfig, parse_config
from gateway.tools import procs
from gateway.tools.demo_view import (
    FETCH_TIMEOUT_S,
    Frame,
    LiveView,
    StatusReader,
    render_line,
    status_counts,
)
from gateway.tools.local import FleetError, TritonFleet

DEMO_SERVICE_TIMES_MS = (2.0, 5.0, 10.0)
DEMO_QUEUE_LENGTH = 16
DEFAULT_GLOBAL_RATE_PER_S = 400.0
DEFAULT_P99_BUDGET_MS = 200.0
SAMPLE_PEAK_RPS = 2000.0  # the production peak the sample plan is sized for
SAMPLE_GPU_HOUR_COST = 2.50
SAMPLE_OVERHEAD = 0.2
SAMPLE_REDUNDANCY = 1
VIEW_INTERVAL_S = 1.0
DEFAULT_DEMO_PORT = 8000
GATEWAY_START_TIMEOUT_S = 30.0
GATEWAY_READY_TIMEOUT_S = 30.0
GATEWAY_STOP_TIMEOUT_S = 10.0
LOCUST_GRACE_S = 30.0
EXIT_INTERRUPTED = 130

# Keys of loadtest/profile.yaml's tenants: the demo's limits apply to the traffic Locust sends.
DEMO_TENANTS: dict[str, dict[str, Any]] = {
    "acme": {"keys": ["acme-demo-key"], "priority": "critical"},
    "globex": {"keys": ["globex-demo-key"], "priority": "standard",
               "rate_limit": {"rate_per_s": 60.0, "burst": 20.0}},
    "batch-jobs": {"keys": ["batch-demo-key"], "priority": "sheddable",
                   "rate_limit": {"rate_per_s": 15.0, "burst": 5.0}},
}

log = logging.getLogger("gateway.tools.demo")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything, exit 130."""


# ------------------------------------------------------------------ configuration


def demo_config_data(fleet: TritonFleet, port: int, *,
                     global_rate_per_s: float | None = DEFAULT_GLOBAL_RATE_PER_S,
                     slots: int | None = None) -> dict[str, Any]:
    """Gateway config for the demo fleet: slots learned from the workers (or ``slots`` per
    worker), a short queue, tenant and global limits (``global_rate_per_s=None``: no rate
    limits at all, for capacity sweeps)."""
    data = fleet.gateway_config_dict(port)
    if slots is not None:
        for worker in data["workers"]:
            worker["slots"] = slots
    data.update({
        "health": {"interval_s": 0.5, "rise": 1, "fall": 2},
        "scrape": {"interval_s": 1.0, "stale_after_s": 3.0},
        "upstream": {"drain_timeout_s": 2.0},
        "admission": {"queue": {"max_length": DEMO_QUEUE_LENGTH, "max_wait_s": 0.5}},
        # Short history and lead time so the predictive signal moves within a minute.
        "capacity": {"target_utilisation": 0.7, "redundancy": 0, "lead_time_s": 15.0,
                     "history_step_s": 1.0},
        "log_level": "warning",
    })
    if global_rate_per_s is not None:
        data["admission"]["tenants"] = DEMO_TENANTS
        data["admission"]["global_limit"] = {"rate_per_s": global_rate_per_s,
                                             "burst": global_rate_per_s / 4}
    return data


# ------------------------------------------------------------------ the gateway, in a thread


class GatewayThread:
    """:func:`gateway.server.serve` on its own event loop in a daemon thread.

    It lives and dies with this process: nothing to orphan. :meth:`stop` sets the server's
    stop event from outside the loop and waits for the drain (bounded).
    """

    def __init__(self, cfg: GatewayConfig) -> None:
        self._cfg = cfg
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._url: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the gateway has not started")
        return self._url

    def start(self, timeout_s: float = GATEWAY_START_TIMEOUT_S) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"the gateway did not start within {timeout_s:.0f} s")
        if self._error is not None or self._url is None:
            raise RuntimeError(f"the gateway failed to start: {self._error!r}")
        return self._url

    def _on_ready(self, url: str) -> None:
        self._url = url
        self._ready.set()

    def _run(self) -> None:
        from gateway.server import serve

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._stop = asyncio.Event()
            loop.run_until_complete(serve(self._cfg, on_ready=self._on_ready, stop=self._stop))
        except BaseException as exc:  # reported by start(); the thread must not die noisily
            self._error = exc
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout_s: float = GATEWAY_STOP_TIMEOUT_S) -> None:
        if self._thread.is_alive():
            self._ready.wait(timeout_s)  # stopped while starting: let it get its loop first
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed in between
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def _wait_gateway_ready(url: str, timeout_s: float) -> None:
    """Until the gateway has probed a worker ready (its /v2/health/ready answers 200)."""
    procs.wait_until(lambda: procs.is_http_ok(url + "/v2/health/ready", FETCH_TIMEOUT_S),
                     timeout_s, what=f"ready worker seen by the gateway at {url}")


# ------------------------------------------------------------------ Locust


class LocustRun:
    """One bounded headless Locust process in its own session (killed with its group)."""

    def __init__(self, host: str, *, shape: str, duration_s: float, users: int,
                 out_prefix: Path, log_path: Path) -> None:
        # The loadtest package ships beside gateway (pyproject); imported here because the
        # demo's other commands need neither it nor Locust.
        from loadtest.run import locust_command, outputs_for

        self.outputs = outputs_for(out_prefix)
        self.duration_s = duration_s
        self._command: list[str] = locust_command(
            host, shape=shape, duration_s=duration_s, users=users,
            spawn_rate=float(max(1, users)), out=out_prefix, user_classes=("TritonUser",),
            extra=("--csv-full-history",))
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_path.write_bytes(b"")
        self.process = procs.start(self._command, log_path=self._log_path, new_session=True)
        self.started_at = time.monotonic()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def overdue(self) -> bool:
        return time.monotonic() - self.started_at > self.duration_s + LOCUST_GRACE_S

    def kill(self) -> None:
        procs.stop(self.process, signum=signal.SIGKILL, group=True)

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()


# ------------------------------------------------------------------ the plan


def served_points(history_csv: Path, workers: int) -> list[dict[str, float]]:
    """One load point per user-count plateau of the run, per worker.

    Like ``gateway plan --from-locust`` (plateaus of Locust's ``*_stats_history.csv``), but
    the throughput counts only requests that succeeded — the demo's limits answer part of the
    spike with fast 429/503s, which are not capacity — and is divided by the fleet's size,
    so one Triton worker stands for one GPU in the plan.
    """
    import csv

    from gateway.plan import PlanError

    try:
        with history_csv.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh)
                    if r.get("Name") == "Aggregated" and r.get("99%") not in (None, "", "N/A")]
    except OSError as exc:
        raise PlanError(f"cannot read {history_csv}: {exc.strerror}") from None
    plateaus: list[list[dict[str, str]]] = []
    for row in rows:
        if plateaus and plateaus[-1][0]["User Count"] == row["User Count"]:
            plateaus[-1].append(row)
        else:
            plateaus.append([row])
    points = []
    for plateau in plateaus:
        first, last = plateau[0], plateau[-1]
        span_s = float(last["Timestamp"]) - float(first["Timestamp"])
        if len(plateau) < 3 or span_s <= 0:
            continue  # a ramp, not a plateau

        def served(row: dict[str, str]) -> float:
            return float(row["Total Request Count"]) - float(row["Total Failure Count"])

        tail = sorted(float(r["99%"]) for r in plateau[len(plateau) // 2:])
        points.append({"throughput_rps": (served(last) - served(first)) / span_s / workers,
                       "p99_ms": tail[len(tail) // 2]})
    if not points:
        raise PlanError(f"{history_csv}: no load plateau (three or more rows at one user "
                        "count) found")
    return points


def plan_arguments(source: Path, *, bench: bool, budget_ms: float) -> list[str]:
    return [("--from-bench" if bench else "--from-locust"), str(source),
            "--p99-budget-ms", f"{budget_ms:g}", "--peak-rps", f"{SAMPLE_PEAK_RPS:g}",
            "--overhead", f"{SAMPLE_OVERHEAD:g}", "--redundancy", str(SAMPLE_REDUNDANCY),
            "--gpu-hour-cost", f"{SAMPLE_GPU_HOUR_COST:g}"]


def print_plan(history_csv: Path, out_dir: Path, workers: int, budget_ms: float) -> bool:
    """The capacity plan from this run, one Triton worker standing for one GPU."""
    from gateway.plan import PlanError
    from gateway.plan import main as plan_main

    try:
        points = served_points(history_csv, workers)
    except PlanError as exc:
        print(f"no capacity plan: {exc}")
        return False
    bench = out_dir / "per_worker_points.json"
    bench.write_text(json.dumps({"workers": workers, "source": str(history_csv),
                                 "points": points}, indent=2) + "\n")
    print(f"load points per worker (requests served / {workers} workers), "
          f"from {history_csv}:")
    for p in points:
        print(f"  {p['throughput_rps']:8.1f} RPS   p99 {p['p99_ms']:7.1f} ms")
    print(f"\n$ gateway plan {' '.join(plan_arguments(bench, bench=True, budget_ms=budget_ms))}")
    return plan_main(plan_arguments(bench, bench=True, budget_ms=budget_ms)) == 0


def locust_summary(outputs: Any) -> str:
    try:
        entries = json.loads(Path(outputs.json).read_text())
    except (OSError, ValueError):
        return "Locust wrote no JSON report"
    requests = sum(int(e.get("num_requests", 0)) for e in entries)
    failures = sum(int(e.get("num_failures", 0)) for e in entries)
    return (f"Locust: {requests} requests, {requests - failures} ok, {failures} failed "
            f"(shed or errors)")


# ------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True)
class RunOptions:
    workers: int
    service_times_ms: tuple[float, ...]
    duration_s: float
    users: int
    shape: str
    port: int
    out_dir: Path
    live: bool
    global_rate_per_s: float | None  # None: no rate limits
    slots: int | None                # None: learned from the workers' model configs


@dataclass(slots=True)
class RunResult:
    outputs: Any
    locust_returncode: int | None
    final_status: dict[str, Any] | None
    timings_s: dict[str, float]


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _interruptible() -> Any:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the run lasts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ignore_signals() -> None:
    """During clean-up a second Ctrl-C must not cut it short (and orphan the workers)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


def _say(text: str) -> None:
    print(text, flush=True)


def run_cluster(opts: RunOptions, *, on_frame: Callable[[Frame], None] | None) -> RunResult:
    """Fleet → gateway → Locust; calls ``on_frame`` every second while Locust runs."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = opts.out_dir / "gateway.log"
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    fleet = TritonFleet(opts.workers, service_times_ms=opts.service_times_ms,
                        log_dir=opts.out_dir / "logs")
    gateway: GatewayThread | None = None
    locust: LocustRun | None = None
    final_status: dict[str, Any] | None = None
    try:
        _say(f"starting {opts.workers} Triton servers (service times "
             f"{', '.join(f'{w.service_time_ms:g}' for w in fleet.workers)} ms) …")
        fleet.start()
        timings["fleet_start_s"] = time.monotonic() - t0
        for w, ready_s in zip(fleet.workers, fleet.startup_times_s(), strict=True):
            _say(f"  {w.name:<9} {w.http_url}  service {w.service_time_ms:g} ms  "
                 f"ready in {ready_s or 0.0:.1f} s")
        cfg = parse_config(demo_config_data(fleet, opts.port, slots=opts.slots,
                                            global_rate_per_s=opts.global_rate_per_s))
        gateway = GatewayThread(cfg)
        url = gateway.start()
        _wait_gateway_ready(url, GATEWAY_READY_TIMEOUT_S)
        timings["gateway_ready_s"] = time.monotonic() - t0
        _say(f"gateway   {url}   status page {url}/status   (log {log_path})")
        _say(f"Locust    {opts.users} users, shape {opts.shape}, {opts.duration_s:g} s "
             f"→ {opts.out_dir}/")
        locust = LocustRun(url, shape=opts.shape, duration_s=opts.duration_s, users=opts.users,
                           out_prefix=opts.out_dir / "locust",
                           log_path=opts.out_dir / "locust.log")
        locust.start()
        names = {w.client_url: f"{w.name} {w.service_time_ms:g}ms" for w in fleet.workers}
        reader = StatusReader(url, names=names)
        next_tick = time.monotonic()
        while locust.is_running():
            if locust.overdue():
                raise TimeoutError(f"Locust ran past {opts.duration_s + LOCUST_GRACE_S:.0f} s")
            if on_frame is not None:
                on_frame(reader.read(time.monotonic() - locust.started_at))
            next_tick += VIEW_INTERVAL_S
            time.sleep(max(0.0, next_tick - time.monotonic()))
        timings["locust_s"] = time.monotonic() - locust.started_at
        reader.read(time.monotonic() - locust.started_at)
        final_status = reader.last_status
        if final_status is not None:
            (opts.out_dir / "status.json").write_text(json.dumps(final_status, indent=2) + "\n")
        return RunResult(locust.outputs, locust.returncode(), final_status, timings)
    finally:
        _ignore_signals()
        t_stop = time.monotonic()
        if locust is not None:
            locust.kill()
        if gateway is not None:
            gateway.stop()
        fleet.stop()
        timings["stop_s"] = time.monotonic() - t_stop
        root.removeHandler(handler)
        handler.close()


def _add_common(p: argparse.ArgumentParser, *, workers: int, duration_s: float, users: int,
                out: str) -> None:
    p.add_argument("--workers", type=int, default=workers, help="Triton servers to start")
    p.add_argument("--duration", type=float, default=duration_s, help="seconds of load")
    p.add_argument("--users", type=int, default=users, help="peak simulated Locust users")
    p.add_argument("--port", type=int, default=None,
                   help=f"gateway port (default {DEFAULT_DEMO_PORT}, or a free one if taken)")
    p.add_argument("--out", default=out, help="results folder")
    p.add_argument("--service-times", default=",".join(f"{t:g}" for t in
                                                         DEMO_SERVICE_TIMES_MS),
                   help="add_sub ms per execution, per worker, cycled")
    p.add_argument("--global-rate", type=float, default=DEFAULT_GLOBAL_RATE_PER_S,
                   help="gateway-wide rate limit, requests/s "
                   f"(default {DEFAULT_GLOBAL_RATE_PER_S:g})")
    p.add_argument("--slots", type=int, default=None,
                   help="in-flight requests per worker (default: learned from the workers' "
                        "model configs)")
    p.add_argument("--p99-budget-ms", type=float, default=DEFAULT_P99_BUDGET_MS,
                   help="latency budget of the capacity plan")


def _default_port() -> int:
    """8000 when it is free, else 0 (the gateway picks one and the URL is printed)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_DEMO_PORT))
        except OSError:
            return 0
    return DEFAULT_DEMO_PORT


def _options(p: argparse.ArgumentParser, args: argparse.Namespace, shape: str,
             live: bool, *, limits: bool = True) -> RunOptions:
    if args.workers < 1 or (args.slots is not None and args.slots < 1):
        p.error("--workers and --slots must be at least 1")
    if args.users < 1 or args.duration <= 0:
        p.error("--users and --duration must be positive")
    try:
        times = tuple(float(t) for t in str(args.service_times).split(",") if t.strip())
    except ValueError:
        p.error(f"--service-times: expected comma-separated numbers, got {args.service_times!r}")
    if not times or any(t < 0 for t in times):
        p.error("--service-times: expected non-negative numbers")
    port = args.port if args.port is not None else _default_port()
    return RunOptions(workers=args.workers, service_times_ms=times, duration_s=args.duration,
                      users=args.users, shape=shape, port=port, out_dir=Path(args.out),
                      live=live, global_rate_per_s=args.global_rate if limits else None,
                      slots=args.slots)


def _run_and_report(opts: RunOptions, on_frame: Callable[[Frame], None] | None,
                    ) -> tuple[int, RunResult | None]:
    t0 = time.monotonic()
    try:
        with _interruptible():
            result = run_cluster(opts, on_frame=on_frame)
    except (Interrupted, KeyboardInterrupt):
        print(f"\ninterrupted; everything stopped after {time.monotonic() - t0:.0f} s",
              flush=True)
        return EXIT_INTERRUPTED, None
    except (FleetError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return 1, None
    result.timings_s["total_s"] = time.monotonic() - t0
    return 0, result


def main_demo(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gateway demo", description="The whole system: real "
                                "Triton servers, the gateway, a Locust spike with a live "
                                "view, then the capacity plan from that run.")
    _add_common(p, workers=3, duration_s=45.0, users=60, out="results/demo")
    args = p.parse_args(list(argv))
    opts = _options(p, args, "spike", live=True)
    view = LiveView(sys.stdout, title=f"gateway demo · {opts.workers} Triton workers · "
                    f"spike to {opts.users} users")
    code, result = _run_and_report(opts, view.show)
    if result is None:
        return code
    print()
    if result.locust_returncode != 0:
        print(f"Locust exited {result.locust_returncode}; see {opts.out_dir / 'locust.log'}")
        return 1
    print(locust_summary(result.outputs))
    if result.final_status is not None:
        admitted, shed, errors = status_counts(result.final_status)
        print(f"gateway: admitted {admitted}, shed {shed}, errors {errors}")
    print()
    planned = print_plan(result.outputs.history_csv, opts.out_dir, opts.workers,
                         args.p99_budget_ms)
    print()
    print(f"results in {opts.out_dir}/: locust.html (report), locust_stats*.csv, "
          f"locust.json, status.json, per_worker_points.json, gateway.log, logs/")
    t = result.timings_s
    print(f"timings: fleet {t.get('fleet_start_s', 0):.1f} s, gateway ready "
          f"{t.get('gateway_ready_s', 0):.1f} s, load {t.get('locust_s', 0):.1f} s, "
          f"stop {t.get('stop_s', 0):.1f} s, total {t.get('total_s', 0):.1f} s")
    return 0 if planned else 1


def main_loadtest(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="gateway loadtest", description="Local cluster + gateway "
                                "+ a bounded headless Locust run (CSV, HTML, JSON).")
    p.add_argument("--shape", default="step", choices=("step", "spike", "diurnal", "constant"),
                   help="load shape (default step: a capacity sweep)")
    _add_common(p, workers=2, duration_s=60.0, users=40, out="results/loadtest")
    p.add_argument("--limits", action="store_true", help="apply the demo's tenant and global "
                   "rate limits (default off: a capacity sweep measures the fleet)")
    args = p.parse_args(list(argv))
    opts = _options(p, args, args.shape, live=False, limits=args.limits)
    last: list[float] = [0.0]

    def every_ten_s(frame: Frame) -> None:
        if frame.elapsed_s - last[0] >= 10.0:
            last[0] = frame.elapsed_s
            print(render_line(frame), flush=True)

    code, result = _run_and_report(opts, every_ten_s)
    if result is None:
        return code
    if result.locust_returncode != 0:
        print(f"Locust exited {result.locust_returncode}; see {opts.out_dir / 'locust.log'}")
        return 1
    print(locust_summary(result.outputs))
    for path in result.outputs.paths():
        print(f"  {path}")
    args_ = plan_arguments(result.outputs.history_csv, bench=False,
                           budget_ms=args.p99_budget_ms)
    print("\ncapacity plan from this run (the whole fleet's rate counts as one unit):")
    print(f"$ python -m gateway plan {' '.join(args_)}", flush=True)
    from gateway.plan import main as plan_main

    if plan_main(args_) != 0:
        print("(no plan from this run: see the message above; a longer --duration or more "
              "--users gives the step shape plateaus to measure)")
    print(f"timings: total {result.timings_s.get('total_s', 0):.1f} s")
    return 0


def main(argv: Sequence[str]) -> int:
    return main_demo(argv)


if __name__ == "__main__":
    sys.exit(main_demo(sys.argv[1:]))
