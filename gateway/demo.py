"""``gateway demo`` and ``gateway loadtest``: the whole system on one machine, then a plan.

    gateway demo [--workers 3] [--duration 45] [--users 60] [--port 8000] [--out results/demo]
    gateway loadtest [--shape step|spike|diurnal] [--duration 60] [--users N] [--workers 2]
                     [--out results/loadtest]

Both start the embedded cluster (:class:`gateway.local.TritonFleet`: real Triton servers with
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

The demo configuration is made to show admission control on a small machine: few slots per
worker, a short queue, per-tenant token buckets on the tenants the Locust profile sends, and
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
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

from gateway.config import GatewayConfig, parse_config
from gateway.local import FleetError, TritonFleet

DEMO_SERVICE_TIMES_MS = (2.0, 5.0, 10.0)
DEMO_SLOTS_PER_WORKER = 2
DEFAULT_GLOBAL_RATE_PER_S = 400.0
DEFAULT_P99_BUDGET_MS = 200.0
SAMPLE_PEAK_RPS = 2000.0  # the production peak the sample plan is sized for
SAMPLE_GPU_HOUR_COST = 2.50
SAMPLE_OVERHEAD = 0.2
SAMPLE_REDUNDANCY = 1
VIEW_INTERVAL_S = 1.0
P99_WINDOW_S = 5.0
FETCH_TIMEOUT_S = 1.0
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

log = logging.getLogger("gateway.demo")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop everything, exit 130."""


# ------------------------------------------------------------------ configuration


def demo_config_data(fleet: TritonFleet, port: int, *,
                     global_rate_per_s: float | None = DEFAULT_GLOBAL_RATE_PER_S,
                     slots: int = DEMO_SLOTS_PER_WORKER) -> dict[str, Any]:
    """Gateway config for the demo fleet: small slots and queue, tenant and global limits
    (``global_rate_per_s=None``: no rate limits at all, for capacity sweeps)."""
    data = fleet.gateway_config_dict(port)
    for worker in data["workers"]:
        worker["slots"] = slots
    data.update({
        "health": {"interval_s": 0.5, "rise": 1, "fall": 2},
        "scrape": {"interval_s": 1.0, "stale_after_s": 3.0},
        "upstream": {"default_slots": slots, "drain_timeout_s": 2.0},
        "admission": {"queue": {"max_length": 8 * slots, "max_wait_s": 0.5}},
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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=FETCH_TIMEOUT_S) as r:
                if int(r.status) == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway at {url} saw no ready worker within {timeout_s:.0f} s")


# ------------------------------------------------------------------ reading the gateway

_BUCKET_LINE = re.compile(
    r'^gateway_request_duration_seconds_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LE = re.compile(r'le="(?P<le>[^"]+)"')


def parse_latency_buckets(exposition: str) -> dict[float, float]:
    """Cumulative bucket counts of ``gateway_request_duration_seconds``, summed over models."""
    buckets: dict[float, float] = {}
    for line in exposition.splitlines():
        match = _BUCKET_LINE.match(line)
        if not match:
            continue
        le = _LE.search(match["labels"])
        if le is None:
            continue
        bound = math.inf if le["le"] == "+Inf" else float(le["le"])
        buckets[bound] = buckets.get(bound, 0.0) + float(match["value"])
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``{upper bound: count}``."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


@dataclass(frozen=True, slots=True)
class Frame:
    """What one refresh of the live view shows."""

    elapsed_s: float
    status: dict[str, Any] | None
    rps: float | None
    p99_ms: float | None
    error: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # worker id → display name


class StatusReader:
    """Polls ``/status.json`` and ``/metrics``; RPS from counter deltas, p99 over a window."""

    def __init__(self, url: str, window_s: float = P99_WINDOW_S,
                 names: dict[str, str] | None = None) -> None:
        self._url = url
        self._names = dict(names or {})
        self._window_s = window_s
        self._histograms: deque[tuple[float, dict[float, float]]] = deque()
        self._last_count: tuple[float, int] | None = None
        self.last_status: dict[str, Any] | None = None

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self._url + path, timeout=FETCH_TIMEOUT_S) as response:
            body: bytes = response.read()
            return body

    def read(self, elapsed_s: float) -> Frame:
        now = time.monotonic()
        try:
            status = json.loads(self._get("/status.json"))
            buckets = parse_latency_buckets(self._get("/metrics").decode())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Frame(elapsed_s, self.last_status, None, None, error=str(exc),
                         names=self._names)
        self.last_status = status
        requests = int(status.get("counters", {}).get("requests", 0))
        rps = None
        if self._last_count is not None and now > self._last_count[0]:
            rps = (requests - self._last_count[1]) / (now - self._last_count[0])
        self._last_count = (now, requests)
        self._histograms.append((now, buckets))
        while len(self._histograms) > 1 and now - self._histograms[1][0] >= self._window_s:
            self._histograms.popleft()
        oldest = self._histograms[0][1]
        window = {b: c - oldest.get(b, 0.0) for b, c in buckets.items()}
        p99_s = histogram_quantile(0.99, window)
        return Frame(elapsed_s, status, rps, p99_s * 1000.0 if p99_s is not None else None,
                     names=self._names)


# ------------------------------------------------------------------ the live view

_BAR_WIDTH = 10


def _bar(used: float, total: float) -> str:
    filled = 0 if total <= 0 else min(_BAR_WIDTH, round(_BAR_WIDTH * used / total))
    return "#" * filled + "." * (_BAR_WIDTH - filled)


def _memory(worker: dict[str, Any]) -> str:
    free, total = worker.get("gpu_free_bytes"), worker.get("gpu_total_bytes")
    if free is None or not total:
        return "cpu"
    gib = 1024**3
    return f"{free / gib:.1f}/{total / gib:.0f} GiB free"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _counts(status: dict[str, Any]) -> tuple[int, int, int]:
    c = status.get("counters", {})
    rejected, errors = int(c.get("rejected", 0)), int(c.get("errors", 0))
    return int(c.get("requests", 0)) - rejected - errors, rejected, errors


def _rejection_reasons(status: dict[str, Any]) -> str:
    reasons: dict[str, int] = {}
    for r in status.get("rejections", []):
        key = f"{r.get('status')} {r.get('reason')}"
        reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def _name(worker: dict[str, Any], names: dict[str, str]) -> str:
    wid = str(worker.get("id"))
    return names.get(wid, wid)


def render_frame(frame: Frame, *, title: str) -> list[str]:
    """The full-screen view: a header, one row per worker, the fleet's totals."""
    names = frame.names
    lines = [f"{title}   t = {frame.elapsed_s:4.0f} s"]
    status = frame.status
    if status is None:
        return [*lines, f"  waiting for the gateway … {frame.error or ''}"]
    fleet = status.get("fleet", {})
    lines.append(f"  {'worker':<16} {'state':<9} {'breaker':<10} {'in flight / slots':<24} "
                 f"{'pending':>7}  {'memory':<16} {'latency':>9}")
    for w in status.get("workers", []):
        slots = int(w.get("slots") or 0)
        in_flight = int(w.get("in_flight") or 0)
        lines.append(
            f"  {_name(w, names)[:16]:<16} {str(w.get('state'))[:9]:<9} "
            f"{w.get('breaker')!s:<10} {_bar(in_flight, slots)} {in_flight:>3} / {slots:<5}   "
            f"{_num(w.get('pending')):>7}  {_memory(w):<16} {_ms(w.get('latency_ms')):>9}")
    admitted, shed, errors = _counts(status)
    total = admitted + shed + errors
    shed_pct = f" ({100.0 * shed / total:.1f} %)" if total else ""
    desired = fleet.get("desired_replicas", {})
    lines += [
        f"  admitted {admitted:<8} shed {shed}{shed_pct:<10} errors {errors:<6} "
        f"queue {fleet.get('queue_length', 0)}",
        f"  RPS {_num(frame.rps):<7} p99 {_ms(frame.p99_ms):<9} "
        f"utilisation {100.0 * float(fleet.get('utilisation') or 0.0):.0f} %   "
        f"desired replicas: reactive {desired.get('reactive', '-')}, "
        f"predictive {desired.get('predictive', '-')}   "
        f"(ready {fleet.get('workers_ready', '-')}/{fleet.get('workers_total', '-')})",
        f"  recent rejections: {_rejection_reasons(status) or 'none'}",
    ]
    return lines


def render_line(frame: Frame) -> str:
    """One line per second, for pipes and dumb terminals."""
    names = frame.names
    head = f"[{frame.elapsed_s:4.0f} s]"
    status = frame.status
    if status is None:
        return f"{head} waiting for the gateway … {frame.error or ''}"
    admitted, shed, errors = _counts(status)
    fleet = status.get("fleet", {})
    desired = fleet.get("desired_replicas", {})
    workers = " | ".join(
        f"{_name(w, names)} {w.get('in_flight', 0)}/{w.get('slots', 0)} "
        f"pend {_num(w.get('pending'))} {_memory(w)} {w.get('breaker')}"
        for w in status.get("workers", []))
    return (f"{head} RPS {_num(frame.rps)} p99 {_ms(frame.p99_ms)} admitted {admitted} "
            f"shed {shed} errors {errors} queue {fleet.get('queue_length', 0)} "
            f"desired {desired.get('reactive', '-')}/{desired.get('predictive', '-')} "
            f"|| {workers}")


class LiveView:
    """Redraws the frame in place on an ANSI terminal; prints one line a second otherwise."""

    def __init__(self, out: TextIO, *, title: str, redraw: bool | None = None) -> None:
        self._out = out
        self._title = title
        if redraw is None:
            term = os.environ.get("TERM", "")
            redraw = out.isatty() and term not in ("", "dumb")
        self._redraw = redraw
        self._drawn = 0

    def show(self, frame: Frame) -> None:
        if not self._redraw:
            print(render_line(frame), file=self._out, flush=True)
            return
        lines = render_frame(frame, title=self._title)
        parts = [f"\x1b[{self._drawn}F"] if self._drawn else []
        parts += [f"\x1b[2K{line}\n" for line in lines]
        if self._drawn > len(lines):  # clear what a longer previous frame left
            parts += ["\x1b[2K\n"] * (self._drawn - len(lines))
            parts.append(f"\x1b[{self._drawn - len(lines)}F")
        self._out.write("".join(parts))
        self._out.flush()
        self._drawn = len(lines)


# ------------------------------------------------------------------ Locust


def _import_loadtest() -> Any:
    """``loadtest.run`` (kept in the repository, beside the ``gateway`` package)."""
    try:
        import loadtest.run as run_module
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "loadtest" / "run.py").exists():
            raise
        sys.path.insert(0, str(root))
        import loadtest.run as run_module
    return run_module


class LocustRun:
    """One bounded headless Locust process in its own session (killed with its group)."""

    def __init__(self, host: str, *, shape: str, duration_s: float, users: int,
                 out_prefix: Path, log_path: Path) -> None:
        run_module = _import_loadtest()
        self.outputs = run_module.outputs_for(out_prefix)
        self.duration_s = duration_s
        self._command: list[str] = run_module.locust_command(
            host, shape=shape, duration_s=duration_s, users=users,
            spawn_rate=float(max(1, users)), out=out_prefix, user_classes=("TritonUser",),
            extra=("--csv-full-history",))
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self._log_path.open("wb")
        self.process = subprocess.Popen(self._command, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.started_at = time.monotonic()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def overdue(self) -> bool:
        return time.monotonic() - self.started_at > self.duration_s + LOCUST_GRACE_S

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

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
    slots: int


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
    p.add_argument("--slots", type=int, default=DEMO_SLOTS_PER_WORKER,
                   help=f"in-flight requests per worker (default {DEMO_SLOTS_PER_WORKER})")
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
    if args.workers < 1 or args.slots < 1:
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
        admitted, shed, errors = _counts(result.final_status)
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
