"""Thundering herd: N requests released at once at a small simulated fleet behind the gateway.

    python -m loadtest.herd [--requests 5000] [--connections 1000] [--quick]
    python -m loadtest.herd --minimal [--processes 3]

Every part is a real process on loopback: the simulator (``python -m gateway sim``, 4 workers,
20 ms per request, room for 64 at once — the gateway's 4 slots per worker are the limit that
counts, and the simulator records the most it ever had in progress), the gateway
(``python -m gateway serve``), a readiness prober (its own process, one keep-alive
connection, ``GET /v2/health/ready`` every 10 ms) and this client (raw asyncio HTTP/1.1).

"At once": the client first opens ``--connections`` TCP connections to the gateway (in
batches, so the accept backlog never overflows), then releases every request in the same
event-loop tick; with fewer connections than requests each connection sends its share
back to back (HTTP/1.1 keep-alive, one request at a time). No client retries: the point is
the first answer each request gets.

Scenarios, side by side in one run:

* ``admission`` — the gateway's admission control with small limits: a global token bucket
  (1,000/s, burst 500), 4 slots per worker, a bounded priority queue (``max_length`` 200,
  ``max_wait_s`` 1.5) and a 2 s deadline (``X-Request-Timeout-Ms``). Twice: over
  ``--connections`` connections (default 1,000: five requests back to back on each — the
  test suite's herd) and over one connection per request (5,000 truly simultaneous).
* ``no limits`` — the same fleet with no rate limit and a queue big enough for the whole herd
  (the deadline stays): what the fleet sees without the bucket and the bounded queue.

``--minimal`` runs the README's minimal configuration instead (``workers`` and nothing
else: slots, models and limits are learned): three simulated workers of 4 instances × 50 ms,
3,000 requests at once (one connection each) with a 1 s deadline, then calm traffic; beside
it, the same client against nginx answering at once — the client's own floor. Written to
``results/herd-minimal.json``.

For each it prints and writes to ``results/herd.json``: answers by status, how many
rejections carried ``Retry-After``, admitted (200) latency p50/p99 as the client saw it, the
most inference requests any simulated worker had in progress at once against the gateway's
slot limit, the readiness probe's slowest answer during the storm and the gateway's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "herd.json"

SLOTS_PER_WORKER = 4
WORKERS = 4
SERVICE_MS = 20.0
DEADLINE_MS = 2000
INFER_PATH = "/v2/models/simple/infer"
INFER_BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                     "data": [1.0] * 16}]}).encode()
CONNECT_BATCH = 500
ANSWER_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------- the simulator

class SimProcess:
    """``python -m gateway sim`` on free ports, with a control port (``with_control``, for
    :meth:`control` and :meth:`stats`); stopped on exit."""

    def __init__(self, workers: int = WORKERS, *, slots: int = 64, base_ms: float = SERVICE_MS,
                 extra: list[str] | None = None, with_control: bool = True) -> None:
        self.args = ["--workers", str(workers), "--base-port", "0", "--slots", str(slots),
                     "--base-ms", str(base_ms), "--per-item-ms", "0", *(extra or [])]
        self.control_port = free_port() if with_control else None
        if self.control_port is not None:
            self.args += ["--control-port", str(self.control_port)]
        self.ports: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> SimProcess:
        return self.spawn().wait_started(timeout_s)

    def spawn(self) -> SimProcess:
        """Start the process without waiting for it to listen (several start side by side;
        :meth:`wait_started` reads their ports later)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sim", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=REPO)
        return self

    def wait_started(self, timeout_s: float = 30.0) -> SimProcess:
        if self.ports:
            return self
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(b"{"):
                self.ports = list(json.loads(line)["ports"])
                return self
        self.stop()
        raise RuntimeError("simulator did not start")

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def control(self, **change: Any) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.control_port}/sim/control",
                                     data=json.dumps(change).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc

    def stats(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control_port}/sim/stats",
                                    timeout=10) as resp:
            workers: list[dict[str, Any]] = json.loads(resp.read())["workers"]
            return workers

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        procs.stop(proc, 10)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gateway_config(sim: SimProcess, *, slots: int = SLOTS_PER_WORKER,
                   admission: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "workers": [{"url": u, "metrics_url": u + "/metrics", "slots": slots}
                    for u in sim.urls],
        "health": {"interval_s": 0.25, "rise": 1, "fall": 2, "timeout_s": 0.5},
        "scrape": {"interval_s": 0.5, "timeout_s": 0.5},
        "admission": admission or {},
        "log_level": "warning",
    }
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------- the client

@dataclass(slots=True)
class Answer:
    status: int              # 0: no answer (connection broke or timed out)
    retry_after: bool
    latency_s: float
    json_error: bool         # body is {"error": "..."} (checked for non-200)


def request_bytes(host: str, headers: dict[str, str] | None = None,
                  body: bytes = INFER_BODY, path: str = INFER_PATH) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def _is_json_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), str)


async def herd(port: int, requests: int, connections: int, *,
               headers: dict[str, str] | None = None) -> tuple[list[Answer], float]:
    """Open ``connections`` connections, then release ``requests`` requests at once.
    Returns every answer and the storm's duration (release → last answer)."""
    connections = min(connections, requests)
    payload = request_bytes(f"127.0.0.1:{port}", headers)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for start in range(0, connections, CONNECT_BATCH):
        n = min(CONNECT_BATCH, connections - start)
        opened += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                         for _ in range(n)))
    release = asyncio.Event()
    answers: list[Answer] = []
    share = [requests // connections + (1 if i < requests % connections else 0)
             for i in range(connections)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await release.wait()
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                writer.write(payload)
                status, hdrs, body = await asyncio.wait_for(_read_answer(reader),
                                                            ANSWER_TIMEOUT_S)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                answers.append(Answer(0, False, time.perf_counter() - t0, False))
                return
            answers.append(Answer(status, "retry-after" in hdrs, time.perf_counter() - t0,
                                  status == 200 or _is_json_error(body)))

    tasks = [asyncio.ensure_future(one(r, w, n)) for (r, w), n in zip(opened, share,
                                                                       strict=True)]
    await asyncio.sleep(0.2)          # every task is parked on the event
    t0 = time.perf_counter()
    release.set()
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    for _, writer in opened:
        writer.close()
    for _, writer in opened:
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    lost = requests - len(answers)
    answers += [Answer(0, False, 0.0, False)] * lost
    return answers, duration


# ---------------------------------------------------------------------------- the prober

def probe_loop(url: str, stop_file: str, interval_s: float = 0.01) -> dict[str, float]:
    """GET /v2/health/ready over one keep-alive connection until ``stop_file`` exists."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    req = f"GET /v2/health/ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    worst = 0.0
    n = failures = 0
    total = 0.0
    buf = b""
    while not os.path.exists(stop_file):
        t0 = time.perf_counter()
        sock.sendall(req)
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("gateway closed the probe connection")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(buf) < length:
            buf += sock.recv(4096)
        buf = buf[length:]
        dt = time.perf_counter() - t0
        n += 1
        total += dt
        worst = max(worst, dt)
        if not head.startswith(b"HTTP/1.1 200"):
            failures += 1
        time.sleep(interval_s)
    sock.close()
    return {"probes": n, "max_ms": worst * 1000, "mean_ms": total / max(n, 1) * 1000,
            "not_ready": failures}


class Prober:
    """The readiness prober in its own process (no GIL shared with the herd client)."""

    def __init__(self, url: str) -> None:
        self.url = url
        fd, self.stop_file = tempfile.mkstemp(prefix="herd-probe-")
        os.close(fd)
        os.unlink(self.stop_file)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.herd", "--probe", url, self.stop_file],
            stdout=subprocess.PIPE, cwd=REPO)

    def finish(self, timeout_s: float = 10.0) -> dict[str, float]:
        Path(self.stop_file).touch()
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            with contextlib.suppress(OSError):
                os.unlink(self.stop_file)
        result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
        return result


# ---------------------------------------------------------------------------- the scenario

@dataclass
class HerdFigures:
    scenario: str
    requests: int
    connections: int
    duration_s: float
    by_status: dict[str, int]
    rejections: int
    rejections_with_retry_after: int
    non_200_json_errors: int
    admitted_p50_ms: float | None
    admitted_p99_ms: float | None
    admitted_max_ms: float | None
    deadline_ms: int
    slot_limit: int
    max_in_flight_per_worker: list[int]
    sim_infer_requests: int
    ready_probe_max_ms: float
    ready_probe_mean_ms: float
    ready_probes: int
    ready_probe_not_ready: int
    gateway_peak_rss_mb: float
    gateway_rss_after_mb: float
    rejections_by_reason: dict[str, float] = field(default_factory=dict)
    rejected_p50_ms: float | None = None
    rejected_p99_ms: float | None = None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(peak, current) resident set size of a process, MiB."""
    peak = cur = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
        elif line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
    return peak, cur


def rejections_by_reason(gateway_url: str) -> dict[str, float]:
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_rejections_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(value)
    return out


def storm(gw: GatewayProcess, requests: int, connections: int, deadline_ms: int
          ) -> tuple[list[Answer], float, dict[str, float], tuple[float, float],
                     dict[str, float]]:
    """One herd at a running gateway with the readiness prober running: the answers, the
    storm's duration, the probe's figures, the gateway's (peak, current) RSS and its
    rejections by reason."""
    assert gw.proc is not None
    prober = Prober(gw.url)
    time.sleep(0.3)
    answers, duration = asyncio.run(herd(gw.port, requests, connections,
                                         headers={"X-Request-Timeout-Ms": str(deadline_ms)}))
    probe = prober.finish()
    return answers, duration, probe, _rss_mb(gw.proc.pid), rejections_by_reason(gw.url)


def admission_config(*, rate_per_s: float = 1000.0, burst: float = 500.0,
                     queue_max: int = 200) -> dict[str, Any]:
    return {"global_limit": {"rate_per_s": rate_per_s, "burst": burst},
            "queue": {"max_length": queue_max, "max_wait_s": 1.5,
                      "default_deadline_s": DEADLINE_MS / 1000}}


def run_herd(scenario: str, admission: dict[str, Any], *, requests: int, connections: int,
             workdir: Path) -> HerdFigures:
    with SimProcess() as sim:
        gw = GatewayProcess(gateway_config(sim, admission=admission), workdir)
        gw.start()
        try:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == WORKERS,
                        what="every worker ready")
            answers, duration, probe, (peak, cur), reasons = storm(gw, requests, connections,
                                                                   DEADLINE_MS)
        finally:
            gw.stop()
        stats = sim.stats()
    return _figures(scenario, answers, duration, requests=requests, connections=connections,
                    deadline_ms=DEADLINE_MS, slot_limit=SLOTS_PER_WORKER, stats=stats,
                    probe=probe, rss=(peak, cur), reasons=reasons)


MINIMAL_WORKERS = 3
MINIMAL_INSTANCES = 4
MINIMAL_SERVICE_MS = 50.0
MINIMAL_DEADLINE_MS = 1000
MINIMAL_RESULTS = REPO / "results" / "herd-minimal.json"


def _figures(scenario: str, answers: list[Answer], duration: float, *, requests: int,
             connections: int, deadline_ms: int, slot_limit: int,
             stats: list[dict[str, Any]], probe: dict[str, float], rss: tuple[float, float],
             reasons: dict[str, float]) -> HerdFigures:
    by_status: dict[str, int] = {}
    for a in answers:
        by_status[str(a.status)] = by_status.get(str(a.status), 0) + 1
    rejected = [a for a in answers if a.status not in (0, 200)]
    ok = [a.latency_s * 1000 for a in answers if a.status == 200]
    return HerdFigures(
        scenario=scenario, requests=requests, connections=min(connections, requests),
        duration_s=duration, by_status=dict(sorted(by_status.items())),
        rejections=len(rejected),
        rejections_with_retry_after=sum(a.retry_after for a in rejected),
        non_200_json_errors=sum(a.json_error for a in rejected),
        admitted_p50_ms=_percentile(ok, 0.5), admitted_p99_ms=_percentile(ok, 0.99),
        admitted_max_ms=max(ok) if ok else None, deadline_ms=deadline_ms,
        slot_limit=slot_limit,
        max_in_flight_per_worker=[int(w["max_in_flight"]) for w in stats] or [0],
        sim_infer_requests=sum(int(w["infer_requests"]) for w in stats),
        ready_probe_max_ms=probe.get("max_ms", 0.0),
        ready_probe_mean_ms=probe.get("mean_ms", 0.0),
        ready_probes=int(probe.get("probes", 0)),
        ready_probe_not_ready=int(probe.get("not_ready", 0)),
        gateway_peak_rss_mb=rss[0], gateway_rss_after_mb=rss[1], rejections_by_reason=reasons,
        rejected_p50_ms=_percentile([a.latency_s * 1000 for a in rejected], 0.5),
        rejected_p99_ms=_percentile([a.latency_s * 1000 for a in rejected], 0.99))


def run_floor(requests: int, workdir: Path) -> HerdFigures:
    """The same herd against nginx answering at once: what the client itself costs."""
    from loadtest.overhead import start_nginx
    port = free_port()
    nginx_dir = workdir / "nginx"
    nginx_dir.mkdir(exist_ok=True)
    proc = start_nginx(nginx_dir, port)
    try:
        # The prober too: its slowest answer from a server that answers at once is the
        # floor of the gateway's readiness figure on this machine.
        prober = Prober(f"http://127.0.0.1:{port}")
        time.sleep(0.3)
        answers, duration = asyncio.run(herd(port, requests, requests))
        probe = prober.finish()
    finally:
        procs.stop(proc, 10)
    return _figures("client floor (nginx)", answers, duration, requests=requests,
                    connections=requests, deadline_ms=0, slot_limit=0, stats=[], probe=probe,
                    rss=(0.0, 0.0), reasons={})


def run_minimal(requests: int, workdir: Path, processes: int = 1
                ) -> tuple[HerdFigures, dict[str, Any]]:
    """The README's minimal config in front of 3 workers × 4 instances × 50 ms; with
    ``processes`` > 1, ``gateway serve --processes N`` (replicas sharing the fleet)."""
    with SimProcess(MINIMAL_WORKERS, slots=MINIMAL_INSTANCES,
                    base_ms=MINIMAL_SERVICE_MS) as sim:
        cfg = {"workers": [{"url": u, "metrics_url": u + "/metrics"} for u in sim.urls],
               "log_level": "warning"}
        args = ["--processes", str(processes)] if processes > 1 else []
        gw = GatewayProcess(cfg, workdir, args=args)
        gw.start()
        try:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == MINIMAL_WORKERS,
                        what="every worker ready")
            gw.wait_for(lambda: all(w["slots"] == 2 * MINIMAL_INSTANCES
                                    for w in gw.status()["workers"]),
                        what="slots learned from the model config")
            if processes > 1:
                gw.wait_for(lambda: (gw.status()["cluster"] or {}).get("members") == processes,
                            what="every process in the membership")
            answers, duration, probe, rss, reasons = storm(gw, requests, requests,
                                                           MINIMAL_DEADLINE_MS)
            time.sleep(1.0)
            calm, _ = asyncio.run(herd(gw.port, 60, 4))   # then calm traffic
            status = gw.status()
            learned = {w["id"]: w["slots"] for w in status["workers"]}
            dispatch = status["dispatch"]
            dispatch["event_loop_worst_lag_s"] = status["gateway"]["event_loop_worst_lag_s"]
        finally:
            gw.stop()
        stats = sim.stats()
    scenario = "minimal config" + (f", --processes {processes}" if processes > 1 else "")
    fig = _figures(scenario, answers, duration, requests=requests,
                   connections=requests, deadline_ms=MINIMAL_DEADLINE_MS,
                   slot_limit=2 * MINIMAL_INSTANCES, stats=stats, probe=probe, rss=rss,
                   reasons=reasons)
    calm_ok = sum(a.status == 200 for a in calm)
    return fig, {"calm_requests": len(calm), "calm_200": calm_ok, "learned_slots": learned,
                 "dispatch": dispatch}


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[HerdFigures]) -> str:
    cols = ["scenario", "requests", "connections", "answers by status", "rej. w/ Retry-After",
            "200 p50 ms", "200 p99 ms", "max in-flight/worker (limit)", "ready max ms",
            "RSS peak MB", "storm s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        pct = 100.0 * r.rejections_with_retry_after / r.rejections if r.rejections else 100.0
        lines.append(" | ".join([
            r.scenario, str(r.requests), str(r.connections),
            " ".join(f"{k}:{v}" for k, v in r.by_status.items()),
            f"{r.rejections_with_retry_after}/{r.rejections} ({pct:.0f} %)",
            _fmt(r.admitted_p50_ms), _fmt(r.admitted_p99_ms),
            f"{max(r.max_in_flight_per_worker)} ({r.slot_limit})",
            _fmt(r.ready_probe_max_ms, 1), _fmt(r.gateway_peak_rss_mb), _fmt(r.duration_s, 2)]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.herd", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=1000,
                        help="connections of the main rows (a third row always uses one "
                             "connection per request)")
    parser.add_argument("--quick", action="store_true", help="1,000 requests")
    parser.add_argument("--minimal", action="store_true",
                        help="the README's minimal config: 3 workers × 4 instances × 50 ms, "
                             "3,000 requests at once with a 1 s deadline, and the client's "
                             "floor against nginx")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="with --minimal: also through `gateway serve --processes N` "
                             "(replicas sharing the fleet), beside one process")
    parser.add_argument("--probe", nargs=2, metavar=("URL", "STOP_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_loop(*args.probe)), flush=True)
        return 0
    if args.minimal:
        return main_minimal(3000 if args.requests == 5000 else args.requests,
                            args.processes)
    requests = 1000 if args.quick else args.requests
    rows = []
    no_limits = {"queue": {"max_length": requests + 1, "max_wait_s": 60.0,
                           "default_deadline_s": DEADLINE_MS / 1000}}
    with tempfile.TemporaryDirectory(prefix="herd-") as tmp:
        for scenario, admission, connections in (
                ("admission", admission_config(), args.connections),
                ("admission", admission_config(), requests),
                ("no limits", no_limits, args.connections)):
            rows.append(run_herd(scenario, admission, requests=requests,
                                 connections=connections, workdir=Path(tmp)))
    print(table(rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python -m loadtest.herd" + (" --quick" if args.quick else ""),
        "fleet": {"workers": WORKERS, "slots_per_worker": SLOTS_PER_WORKER,
                  "service_ms": SERVICE_MS},
        "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


def main_minimal(requests: int, processes: int = 1) -> int:
    with tempfile.TemporaryDirectory(prefix="herd-") as tmp:
        floor = run_floor(requests, Path(tmp))
        fig, calm = run_minimal(requests, Path(tmp))
        shared: list[HerdFigures] = []
        if processes > 1:
            shared_fig, shared_calm = run_minimal(requests, Path(tmp), processes)
            shared.append(shared_fig)
    print(table([floor, fig, *shared]))
    for row in shared:
        print(f"{row.scenario}: answered 200 {row.by_status.get('200', 0)} vs "
              f"{fig.by_status.get('200', 0)} through one; rejections p99 "
              f"{_fmt(row.rejected_p99_ms)} ms vs {_fmt(fig.rejected_p99_ms)} ms; max in flight "
              f"per worker {row.max_in_flight_per_worker} (limit {row.slot_limit}); calm "
              f"{shared_calm['calm_200']}/{shared_calm['calm_requests']}")
    statuses = set(fig.by_status)
    print(f"rejections: p50 {_fmt(fig.rejected_p50_ms)} ms, p99 {_fmt(fig.rejected_p99_ms)} ms; "
          f"by reason {fig.rejections_by_reason}")
    print(f"statuses {sorted(statuses)} (allowed 200/429/503/504); "
          f"admitted p99 {_fmt(fig.admitted_p99_ms)} ms (target <= 1200); "
          f"ready max {_fmt(fig.ready_probe_max_ms, 1)} ms (target <= 100); "
          f"calm traffic {calm['calm_200']}/{calm['calm_requests']} answered 200; "
          f"learned slots {calm['learned_slots']}")
    print(f"dispatch counters {calm['dispatch']}")
    MINIMAL_RESULTS.parent.mkdir(exist_ok=True)
    MINIMAL_RESULTS.write_text(json.dumps({
        "command": "python -m loadtest.herd --minimal",
        "fleet": {"workers": MINIMAL_WORKERS, "instances_per_worker": MINIMAL_INSTANCES,
                  "service_ms": MINIMAL_SERVICE_MS, "deadline_ms": MINIMAL_DEADLINE_MS},
        "rows": [asdict(floor), asdict(fig), *(asdict(r) for r in shared)],
        "after": calm}, indent=2) + "\n")
    print(f"wrote {MINIMAL_RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
