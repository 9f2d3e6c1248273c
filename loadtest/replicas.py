"""Many gateways, one fleet (issue 20): one gateway vs three replicas sharing one Redis vs
``gateway serve --processes 3``, on the same simulated workers, in one run.

    python -m loadtest.replicas [--quick] [--duration 10] [--no-faults] [--output PATH]

Every part is a real process on loopback: the simulator (``python -m gateway sim``: 3 workers,
4 instances × 50 ms each, so 3 × 4 / 0.05 = 240 req/s; the capacity is also measured with a
closed loop straight at the workers), ``redis-server`` on a free port, and the gateways, each
with the README's minimal config (``listen`` + ``workers``) plus ``admission.redis.url`` for
the replicas and ``admission.tenants`` for the fair-share case. Setups, all started at once
and driven one at a time, interleaved row by row:

* ``one`` — one ``gateway serve``.
* ``redis`` — three ``gateway serve`` processes on three ports, one Redis (the client splits
  the load over their ports).
* ``processes`` — one ``gateway serve --processes 3`` (one port; the kernel spreads the
  client's connections over the processes).

The client is an open-loop Poisson generator (asyncio, keep-alive pools as in
``loadtest.fairshare``); latency is from each request's *scheduled* time. Each phase has a
warm-up at the same rate that is not counted. Rows:

a. 50 % of capacity, even split: every request 200? p50/p99; the time each request waited
   inside the workers (the increase of the simulator's Triton counters
   ``nv_inference_queue_duration_us`` over ``nv_inference_request_success``, scraped from
   every worker's ``/metrics`` before and after); each replica's fleet utilisation and
   desired replicas (reactive, predictive) from its ``/status.json`` over the phase's
   second half (for ``--processes``: several fresh connections per sample, grouped by the
   ``cluster.member`` that answered).
b. 125 %: waited inside the workers, admitted p50, share answered 200 / 429 / 503 / 504.
c. 50 %, split 80/10/10 over the Redis replicas: as (a).
d. Fair share: tenants ``a`` (weight 3) and ``b`` (weight 1), ``a`` only through replica 1 and
   ``b`` only through replica 2 (replica 3 idle), each offering 100 % of capacity: ``a``'s
   share of the completed requests (equal-cost requests, so also of the GPU-seconds); target
   75 % ± 5 points. Beside it, one gateway and ``--processes 3`` with both tenants on their
   one port.
   Diagnostic beside it (not a target; ``--no-diagnostics`` skips it): the same replicas
   with ``admission.queue.order: fifo``, which turns off fair order's just-in-time hold.
e. The issue's targets, PASS/FAIL (against one gateway in the same run).

Faults (skipped with ``--no-faults``): SIGKILL one Redis replica mid-load (50 %, its traffic
moved to the others at once) — how long until the survivors' ``cluster.share`` sums to ~1
and whether any request through them failed; then stop ``redis-server`` mid-load and start
it again on the same port — the replicas keep serving (no 5xx), ``cluster.healthy`` goes
false, then true again.

The machine's cores are shared by the client, the gateways and the simulator: figures are
noisy, compare ratios within one run (each row records the 1-minute load average; the JSON
also has per-second timelines and which gateway sources ran: HEAD, a hash of ``gateway/``,
checked again at the end). Prints tables and writes ``results/replicas.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.fleet.upstream import Pool, PoolLimits
from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port, http_get
from loadtest.fairshare import run as run_async
from loadtest.herd import SimProcess
from loadtest.routing import BODY, HEADERS, INFER_PATH, pct, probe_capacity

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "replicas.json"

WORKERS = 3
INSTANCES = 4
SERVICE_MS = 50.0
NOMINAL_CAPACITY = WORKERS * INSTANCES * 1000.0 / SERVICE_MS   # 240 req/s
REPLICAS = 3
MAX_OUTSTANDING = 3000
ANSWER_TIMEOUT_S = 30.0
STATUS_TIMEOUT_S = 2.0
TENANTS = {"a": ("key-a", 3.0), "b": ("key-b", 1.0)}
SHARE_TARGET, SHARE_TOLERANCE = 0.75, 0.05
RECOVERED_SHARE_SUM = 0.98
ERROR_BODIES = 3
TIMELINE_BIN_S = 1.0


# ------------------------------------------------------------------------ processes

class RedisProc:
    """``redis-server`` on 127.0.0.1, no persistence; :meth:`restart` reuses its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _spawn(self) -> bool:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._pong():
                return True
            time.sleep(0.02)
        procs.stop(self.proc, 5)
        self.proc = None
        return False

    def start(self) -> RedisProc:
        for _ in range(3):   # the free port may be taken before redis binds it
            self.port = free_port()
            if self._spawn():
                return self
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        procs.stop(proc, 5)

    def restart(self) -> None:
        if not self._spawn():
            raise RuntimeError(f"redis-server did not start again on port {self.port}")


class ProcessesGateway:
    """``gateway serve --processes N`` with a YAML written from ``config``."""

    def __init__(self, config: dict[str, Any], workdir: Path, processes: int) -> None:
        self.port = free_port()
        self.config = {**config, "listen": {"host": "127.0.0.1", "port": self.port}}
        self.processes = processes
        self.config_path = workdir / f"processes-{self.port}.yaml"
        self.log_path = workdir / f"processes-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ProcessesGateway:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc = procs.start(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
             "--processes", str(self.processes)], log_path=self.log_path)
        try:
            procs.wait_http_ready(self.url + "/v2/health/ready", timeout_s, proc=self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"--processes gateway not ready: {exc}\n{self.log()}") from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        procs.stop(self.proc, 20)


def minimal_config(worker_urls: Sequence[str], *, redis_url: str | None = None,
                   tenants: bool = False) -> dict[str, Any]:
    """The README's minimal config: ``workers`` (url + the simulator's metrics_url), plus
    ``admission.redis.url`` and/or ``admission.tenants`` where the case needs them."""
    cfg: dict[str, Any] = {"workers": [{"url": u, "metrics_url": u + "/metrics"}
                                       for u in worker_urls]}
    admission: dict[str, Any] = {}
    if redis_url is not None:
        admission["redis"] = {"url": redis_url}
    if tenants:
        admission["tenants"] = {name: {"keys": [key], "weight": weight}
                                for name, (key, weight) in TENANTS.items()}
    if admission:
        cfg["admission"] = admission
    return cfg


@dataclass
class Setup:
    """One way of running the gateway: its entry ports, and how its status is read."""

    key: str                  # one | redis | processes
    label: str
    ports: list[int]
    status_polls: int = 1     # fresh connections per status sample and port
    stop: Callable[[], Any] = field(default=lambda: None, repr=False)
    kill: list[Callable[[], Any]] = field(default_factory=list, repr=False)


def wait_members(setup: Setup, members: int, timeout_s: float = 30.0) -> None:
    """Until every entry port reports ``members`` cluster members (and, for one port shared
    by processes, that many distinct members answered)."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        docs = [poll_status(p) for p in setup.ports for _ in range(setup.status_polls * 3)]
        seen |= {str(d["member"]) for d in docs if d and d.get("member")}
        if docs and all(d is not None and d.get("members") == members for d in docs) and (
                setup.status_polls == 1 or len(seen) >= members):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{setup.label}: {members} members not seen within {timeout_s:g} s "
                       f"(seen {sorted(seen)})")


def start_gateway(stack: ExitStack, cfg: dict[str, Any], workdir: Path) -> GatewayProcess:
    gw = GatewayProcess(cfg, workdir)
    stack.callback(gw.stop)
    gw.start()
    gw.wait_workers_ready(WORKERS, timeout_s=30.0)
    return gw


def start_setups(stack: ExitStack, urls: Sequence[str], redis: RedisProc, workdir: Path,
                 *, tenants: bool = False) -> dict[str, Setup]:
    one = start_gateway(stack, minimal_config(urls, tenants=tenants), workdir)
    reps = [start_gateway(stack, minimal_config(urls, redis_url=redis.url, tenants=tenants),
                          workdir) for _ in range(REPLICAS)]
    multi = ProcessesGateway(minimal_config(urls, tenants=tenants), workdir, REPLICAS)
    stack.callback(multi.stop)
    multi.start()
    setups = {
        "one": Setup("one", "one gateway", [one.port], stop=one.stop),
        "redis": Setup("redis", f"{REPLICAS} replicas + Redis", [g.port for g in reps],
                       stop=lambda: [g.stop() for g in reps],
                       kill=[functools.partial(g.signal, signal.SIGKILL) for g in reps]),
        "processes": Setup("processes", f"--processes {REPLICAS}", [multi.port],
                           status_polls=4, stop=multi.stop),
    }
    wait_members(setups["redis"], REPLICAS)
    wait_members(setups["processes"], REPLICAS)
    return setups


# ------------------------------------------------------------------------ observation

def poll_status(port: int) -> dict[str, Any] | None:
    """The figures this benchmark reads from ``/status.json`` (a fresh connection each
    time: urllib sends ``Connection: close``), or None when nothing answered."""
    try:
        code, body = http_get(f"http://127.0.0.1:{port}/status.json", STATUS_TIMEOUT_S)
        doc = json.loads(body) if code == 200 else None
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    cluster = doc.get("cluster") or {}
    fleet = doc.get("fleet") or {}
    desired = fleet.get("desired_replicas") or {}
    return {"member": cluster.get("member"), "members": cluster.get("members"),
            "share": cluster.get("share"), "healthy": cluster.get("healthy"),
            "utilisation": fleet.get("utilisation"), "saturation": fleet.get("saturation"),
            "arrival_rate_per_s": fleet.get("arrival_rate_per_s"),
            "reactive": desired.get("reactive"), "predictive": desired.get("predictive")}


def scrape_workers(urls: Sequence[str]) -> dict[str, float]:
    """Sum over the workers of Triton's queue-time and success counters."""
    out = {"queue_us": 0.0, "success": 0.0, "exec": 0.0}
    names = {"nv_inference_queue_duration_us": "queue_us",
             "nv_inference_request_success": "success", "nv_inference_exec_count": "exec"}
    for url in urls:
        _, body = http_get(url + "/metrics", 5.0)
        for line in body.decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def waited_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    n = after["success"] - before["success"]
    return (after["queue_us"] - before["queue_us"]) / n / 1000.0 if n > 0 else None


# ------------------------------------------------------------------------ the client

@dataclass
class Split:
    """Which entry port each request of a stream goes to (weights; changeable mid-run)."""

    weights: list[float]

    def pick(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.weights)), self.weights)[0]


@dataclass
class Stream:
    name: str
    rate_per_s: float
    split: Split
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    stream: str
    target: int
    scheduled: float      # s from the measured start (negative: warm-up)
    done: float
    status: int


@dataclass
class Action:
    at_s: float           # from the measured start
    name: str
    fn: Callable[[], Any]


@dataclass
class Load:
    outcomes: list[Outcome]
    samples: list[tuple[float, int, dict[str, Any]]]   # (s from start, port index, figures)
    actions: dict[str, tuple[float, Any]]
    dropped: int
    error_bodies: dict[int, list[str]]                  # a few per status, for the report


async def drive(ports: Sequence[int], streams: Sequence[Stream], *, warmup_s: float,
                duration_s: float, seed: int, status_ports: Sequence[tuple[int, int]] = (),
                sample_from_s: float = 0.0, sample_every_s: float = 1.0,
                actions: Sequence[Action] = ()) -> Load:
    """Poisson arrivals per stream for ``warmup_s`` + ``duration_s``; ``status_ports``
    ((port, fresh connections per sample)) sampled from ``sample_from_s`` on; ``actions``
    run (in a thread) at their times."""
    loop = asyncio.get_running_loop()
    pools = [Pool("127.0.0.1", p, PoolLimits(max_connections=MAX_OUTSTANDING,
                                              read_timeout_s=ANSWER_TIMEOUT_S)) for p in ports]
    t0 = loop.time() + 0.05 + warmup_s
    end = t0 + duration_s
    outcomes: list[Outcome] = []
    samples: list[tuple[float, int, dict[str, Any]]] = []
    done_actions: dict[str, tuple[float, Any]] = {}
    tasks: set[asyncio.Task[None]] = set()
    error_bodies: dict[int, list[str]] = collections.defaultdict(list)
    outstanding = dropped = 0

    async def one(stream: Stream, target: int, at: float) -> None:
        nonlocal outstanding
        try:
            resp = await pools[target].request("POST", INFER_PATH, [*HEADERS, *stream.headers],
                                               BODY)
            body = await resp.read()
            status = resp.status
        except Exception as exc:
            status, body = 0, repr(exc).encode()
        finally:
            outstanding -= 1
        outcomes.append(Outcome(stream.name, target, at - t0, loop.time() - t0, status))
        if status != 200 and len(error_bodies[status]) < ERROR_BODIES:
            error_bodies[status].append(body[:200].decode(errors="replace"))

    async def arrivals(stream: Stream, rng: random.Random) -> None:
        nonlocal outstanding, dropped
        at = t0 - warmup_s
        while True:
            at += rng.expovariate(stream.rate_per_s)
            if at >= end:
                return
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            target = stream.split.pick(rng)
            if outstanding >= MAX_OUTSTANDING:
                dropped += at >= t0
                continue
            outstanding += 1
            task = loop.create_task(one(stream, target, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def sampler() -> None:
        at = t0 + sample_from_s
        while at < end:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time() - t0
            polls = [(i, asyncio.to_thread(poll_status, port))
                     for i, (port, n) in enumerate(status_ports) for _ in range(n)]
            docs = await asyncio.gather(*(p for _, p in polls))
            samples.extend((now, i, d) for (i, _), d in zip(polls, docs, strict=True)
                           if d is not None)
            at += sample_every_s

    async def act(action: Action) -> None:
        delay = t0 + action.at_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time() - t0
        done_actions[action.name] = (now, await asyncio.to_thread(action.fn))

    side = [loop.create_task(act(a)) for a in actions]
    if status_ports:
        side.append(loop.create_task(sampler()))
    await asyncio.gather(*(arrivals(s, random.Random(seed + i)) for i, s in enumerate(streams)))
    if tasks:
        await asyncio.wait(set(tasks), timeout=ANSWER_TIMEOUT_S + 5)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*side)
    for pool in pools:
        await pool.aclose()
    return Load(outcomes, samples, done_actions, dropped, dict(error_bodies))


# ------------------------------------------------------------------------ figures

def _mode(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0] if values else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _short(member: str | None) -> str:
    """``host:pid:rand`` → ``pid``."""
    if not member:
        return "-"
    parts = member.split(":")
    return parts[1] if len(parts) >= 3 else member


def replica_signals(setup: Setup, load: Load) -> list[dict[str, Any]]:
    """Per replica (per entry port; for one port shared by processes, per member that
    answered): mean utilisation, modal desired replicas, mean share."""
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for _, i, doc in load.samples:
        key = (f"r{i + 1}" if setup.status_polls == 1
               else f"pid {_short(doc.get('member'))}")
        groups[key].append(doc)
    out = []
    for key in sorted(groups):
        docs = groups[key]
        out.append({
            "replica": key,
            "member": docs[-1].get("member"),
            "samples": len(docs),
            "utilisation": _mean([float(d["utilisation"]) for d in docs
                                  if d.get("utilisation") is not None]),
            "reactive": _mode([d.get("reactive") for d in docs]),
            "predictive": _mode([d.get("predictive") for d in docs]),
            "reactive_seen": sorted({d.get("reactive") for d in docs}, key=str),
            "predictive_seen": sorted({d.get("predictive") for d in docs}, key=str),
            "share": _mean([float(d["share"]) for d in docs if d.get("share") is not None]),
            "members": _mode([d.get("members") for d in docs]),
        })
    return out


def figures(row: str, setup: Setup, split: str, load_share: float, rate: float, load: Load,
            before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    measured = [o for o in load.outcomes if o.scheduled >= 0]
    statuses = collections.Counter(o.status for o in measured)
    sent = len(measured) + load.dropped
    ok_lat = sorted(o.done - o.scheduled for o in measured if o.status == 200)
    share = {str(k): (statuses.get(k, 0) / sent if sent else 0.0) for k in (200, 429, 503, 504)}
    share["other"] = 1.0 - sum(share.values()) if sent else 0.0
    return {
        "row": row, "setup": setup.key, "label": setup.label, "split": split,
        "load": load_share, "offered_per_s": rate, "sent": sent, "dropped": load.dropped,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "all_200": sent > 0 and statuses.get(200, 0) == sent,
        "share": share,
        "p10_ms": pct(ok_lat, 0.1) if ok_lat else None,
        "p50_ms": pct(ok_lat, 0.5) if ok_lat else None,
        "p99_ms": pct(ok_lat, 0.99) if ok_lat else None,
        "waited_in_workers_ms": waited_ms(before, after),
        "worker_executions": after["exec"] - before["exec"],
        "replicas": replica_signals(setup, load),
        "error_bodies": {str(k): v for k, v in load.error_bodies.items()},
        "timeline": timeline(load.outcomes),
    }


def timeline(outcomes: list[Outcome]) -> dict[str, Any]:
    """Per second (by completion time, from the measured start): answers 200 and not, and
    the longest wait (scheduled → done) of a 200 completed in that second."""
    bins: dict[int, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0])
    for o in outcomes:
        b = bins[math.floor(o.done / TIMELINE_BIN_S)]
        if o.status == 200:
            b[0] += 1
            b[2] = max(b[2], 1000 * (o.done - o.scheduled))
        else:
            b[1] += 1
    keys = sorted(bins)
    return {"bin_s": TIMELINE_BIN_S, "from_s": [k * TIMELINE_BIN_S for k in keys],
            "ok": [int(bins[k][0]) for k in keys], "not_ok": [int(bins[k][1]) for k in keys],
            "max_latency_ms": [round(bins[k][2], 1) for k in keys]}


# ------------------------------------------------------------------------ phases

@dataclass
class Bench:
    args: argparse.Namespace
    urls: list[str]
    capacity: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    def settle(self) -> None:
        time.sleep(self.args.settle)

    def status_ports(self, setup: Setup) -> list[tuple[int, int]]:
        return [(p, setup.status_polls) for p in setup.ports]

    def warm(self, setup: Setup) -> None:
        """Not measured: a short stream through every entry so models, pools and limits
        are learned."""
        stream = Stream("warm", 0.3 * self.capacity, Split([1.0] * len(setup.ports)))
        run_async(drive(setup.ports, [stream], warmup_s=0.0, duration_s=self.args.warm,
                        seed=99))

    def phase(self, row: str, setup: Setup, load_share: float, weights: list[float],
              split: str, seed: int) -> dict[str, Any]:
        rate = load_share * self.capacity
        stream = Stream("load", rate, Split(weights))
        before: dict[str, float] = {}
        d = self.args.duration
        load = run_async(drive(
            setup.ports, [stream], warmup_s=self.args.warmup, duration_s=d, seed=seed,
            status_ports=self.status_ports(setup), sample_from_s=d / 2,
            sample_every_s=self.args.sample_every,
            actions=[Action(0.0, "before", lambda: before.update(scrape_workers(self.urls)))]))
        after = scrape_workers(self.urls)
        out = figures(row, setup, split, load_share, rate, load, before, after)
        out["loadavg_1m"] = os.getloadavg()[0]   # others' work on the machine, for the noise
        self.rows.append(out)
        print_row(out)
        self.settle()
        return out

    def fair(self, setup: Setup, ports: tuple[int, int], seed: int) -> dict[str, Any]:
        """Tenants a and b, each at 100 % of capacity, a through ``ports[0]`` and b through
        ``ports[1]`` (indexes into the setup's entry ports)."""
        rate = self.args.fair_load * self.capacity
        streams = []
        for name, idx in zip(("a", "b"), ports, strict=True):
            weights = [0.0] * len(setup.ports)
            weights[idx] = 1.0
            streams.append(Stream(name, rate, Split(weights),
                                  [(b"x-api-key", TENANTS[name][0].encode())]))
        d = self.args.duration
        load = run_async(drive(setup.ports, streams, warmup_s=self.args.warmup, duration_s=d,
                               seed=seed, status_ports=self.status_ports(setup),
                               sample_from_s=d / 2, sample_every_s=self.args.sample_every))
        # GPU time as served in the window: completions by completion time (whenever they
        # were sent), from the measured start (the backlog has formed in the warm-up) to
        # the last arrival (not the drain after it)
        window = [o for o in load.outcomes if 0 <= o.done <= d and o.status == 200]
        ok = {t: sum(1 for o in window if o.stream == t) for t in ("a", "b")}
        measured = [o for o in load.outcomes if o.scheduled >= 0]
        statuses = {t: dict(collections.Counter(str(o.status) for o in measured
                                                if o.stream == t)) for t in ("a", "b")}
        total = ok["a"] + ok["b"]
        a_share = ok["a"] / total if total else None
        out = {"row": "d", "setup": setup.key, "label": setup.label,
               "entry": {t: (f"replica {i + 1}" if len(setup.ports) > 1 else "one port")
                         for t, i in zip(("a", "b"), ports, strict=True)},
               "offered_per_s_each": rate, "ok_per_s": {t: ok[t] / d for t in ok},
               "statuses": statuses, "a_share": a_share,
               "error_bodies": {str(k): v for k, v in load.error_bodies.items()},
               "timeline": {t: timeline([o for o in load.outcomes if o.stream == t])
                            for t in ("a", "b")},
               "a_share_gpu_seconds": a_share,   # equal-cost requests (batch 1, 50 ms)
               "pass": a_share is not None and abs(a_share - SHARE_TARGET) <= SHARE_TOLERANCE,
               "loadavg_1m": os.getloadavg()[0],
               "replicas": replica_signals(setup, load)}
        print(f"  d  {setup.label:<20} a {ok['a'] / d:6.1f}/s  b {ok['b'] / d:6.1f}/s  "
              f"a's share {_pct(a_share)}", flush=True)
        self.settle()
        return out


def fair_without_hold(bench: Bench, stack: ExitStack, urls: Sequence[str], redis: RedisProc,
                      workdir: Path) -> dict[str, Any]:
    """Diagnostic, not a target: (d)'s replicas with ``admission.queue.order: fifo``, which
    turns off fair order's just-in-time hold (each replica then fills its units); with one
    tenant per replica the local order does not matter, the shares alone divide the GPUs."""
    cfg = minimal_config(urls, redis_url=redis.url.rsplit("/", 1)[0] + "/1", tenants=True)
    cfg["admission"]["queue"] = {"order": "fifo"}
    reps = [start_gateway(stack, cfg, workdir) for _ in range(REPLICAS)]
    setup = Setup("redis-fifo", "replicas, order fifo (diagnostic)", [g.port for g in reps],
                  stop=lambda: [g.stop() for g in reps])
    wait_members(setup, REPLICAS)
    bench.warm(setup)
    out = bench.fair(setup, (0, 1), seed=51)
    setup.stop()
    return out


def print_row(r: dict[str, Any]) -> None:
    reps = " ".join(f"{x['replica']}:{_num(x['utilisation'], '.2f')}/{x['reactive']}/"
                    f"{x['predictive']}" for x in r["replicas"])
    print(f"  {r['row']}  {r['label']:<20} {r['split']:<9} load avg {r['loadavg_1m']:4.1f}  "
          f"sent {r['sent']:5d}  "
          f"200 {_pct(r['share']['200'])}  p50 {_num(r['p50_ms'], '.1f')}  "
          f"p99 {_num(r['p99_ms'], '.1f')}  waited {_num(r['waited_in_workers_ms'], '.2f')} ms"
          f"  {reps}", flush=True)


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


# ------------------------------------------------------------------------ faults

def first_after(samples: list[tuple[float, int, dict[str, Any]]], after_s: float,
                predicate: Callable[[dict[int, dict[str, Any]]], bool]) -> float | None:
    """The first sample tick after ``after_s`` whose docs (by port index) satisfy
    ``predicate``: seconds from ``after_s``."""
    ticks: dict[float, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for t, i, doc in samples:
        ticks[t][i] = doc
    for t in sorted(ticks):
        if t >= after_s and predicate(ticks[t]):
            return t - after_s
    return None


def fault_kill(bench: Bench, setup: Setup) -> dict[str, Any]:
    """50 % over the three replicas; SIGKILL replica 3 at 30 % of the phase and move its
    traffic to the other two at once."""
    d = max(bench.args.duration, 8.0)
    kill_at = 0.3 * d
    split = Split([1.0, 1.0, 1.0])

    def kill() -> None:
        setup.kill[2]()
        split.weights = [1.0, 1.0, 0.0]

    load = run_async(drive(
        setup.ports, [Stream("load", 0.5 * bench.capacity, split)], warmup_s=bench.args.warmup,
        duration_s=d, seed=31, status_ports=[(p, 1) for p in setup.ports[:2]],
        sample_every_s=0.1, actions=[Action(kill_at, "kill", kill)]))
    killed_at = load.actions["kill"][0]
    survivors = [o for o in load.outcomes if o.target in (0, 1) and o.scheduled >= 0]
    lost = [o for o in load.outcomes if o.target == 2 and o.status != 200]
    recovered = first_after(load.samples, killed_at, lambda docs: len(docs) == 2 and sum(
        float(doc.get("share") or 0.0) for doc in docs.values()) >= RECOVERED_SHARE_SUM)
    members_2 = first_after(load.samples, killed_at, lambda docs: len(docs) == 2 and all(
        doc.get("members") == 2 for doc in docs.values()))
    before_sum = [sum(float(d.get("share") or 0.0) for d in docs.values())
                  for docs in _ticks(load.samples, 0.0, killed_at)]
    failed = sum(1 for o in survivors if o.status != 200)
    ok_lat = sorted(o.done - o.scheduled for o in survivors if o.status == 200)
    after_lat = sorted(o.done - o.scheduled for o in survivors
                       if o.status == 200 and o.scheduled >= killed_at)
    out = {"row": "fault: kill replica", "killed_at_s": killed_at,
           "survivor_share_sum_before": _mean(before_sum),
           "share_sum_recovered_after_s": recovered,
           "members_2_after_s": members_2,
           "survivor_requests": len(survivors), "survivor_failures": failed,
           "survivor_statuses": dict(collections.Counter(str(o.status) for o in survivors)),
           "survivor_p99_ms": pct(ok_lat, 0.99) if ok_lat else None,
           "survivor_p99_after_kill_ms": pct(after_lat, 0.99) if after_lat else None,
           "lost_on_killed_replica": len(lost),
           "timeline": timeline(survivors),
           "pass": (recovered is not None and recovered <= 3.0 and failed == 0)}
    print(f"  fault kill: share sum {_num(out['survivor_share_sum_before'], '.2f')} → ≥"
          f"{RECOVERED_SHARE_SUM} after {_num(recovered, '.2f')} s (members=2 after "
          f"{_num(members_2, '.2f')} s); survivors failed {failed}/{len(survivors)}; "
          f"lost on the killed one {len(lost)}", flush=True)
    bench.settle()
    return out


def _ticks(samples: list[tuple[float, int, dict[str, Any]]], lo: float,
           hi: float) -> Iterator[dict[int, dict[str, Any]]]:
    ticks: dict[float, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for t, i, doc in samples:
        if lo <= t < hi:
            ticks[t][i] = doc
    yield from ticks.values()


def fault_redis(bench: Bench, setup: Setup, redis: RedisProc) -> dict[str, Any]:
    """50 % over the two surviving replicas; stop redis-server at 25 % of the phase, start
    it again (same port) at 60 %."""
    d = max(bench.args.duration * 1.2, 10.0)
    stop_at, start_at = 0.25 * d, 0.6 * d
    ports = setup.ports[:2]
    load = run_async(drive(
        ports, [Stream("load", 0.5 * bench.capacity, Split([1.0, 1.0]))],
        warmup_s=bench.args.warmup, duration_s=d, seed=41,
        status_ports=[(p, 1) for p in ports], sample_every_s=0.1,
        actions=[Action(stop_at, "stop", redis.stop), Action(start_at, "start", redis.restart)]))
    stopped, started = load.actions["stop"][0], load.actions["start"][0]
    measured = [o for o in load.outcomes if o.scheduled >= 0]
    during = [o for o in measured if stopped <= o.scheduled < started]
    unhealthy = first_after(load.samples, stopped, lambda docs: len(docs) == 2 and all(
        doc.get("healthy") is False for doc in docs.values()))
    healthy = first_after(load.samples, started, lambda docs: len(docs) == 2 and all(
        doc.get("healthy") is True for doc in docs.values()))
    served = sum(1 for o in measured if o.status != 0)
    five = sum(1 for o in measured if o.status >= 500)
    ok_during = sorted(o.done - o.scheduled for o in during if o.status == 200)
    ok_all = sorted(o.done - o.scheduled for o in measured if o.status == 200)
    ok_before = sorted(o.done - o.scheduled for o in measured
                       if o.status == 200 and o.scheduled < stopped)
    ok_after = sorted(o.done - o.scheduled for o in measured
                      if o.status == 200 and o.scheduled >= started)
    end_sum = [sum(float(d.get("share") or 0.0) for d in docs.values())
               for docs in _ticks(load.samples, started + (healthy or 0.0) + 0.5, d)]
    out = {"row": "fault: redis stopped", "stopped_at_s": stopped, "started_at_s": started,
           "requests": len(measured), "answered": served,
           "statuses": dict(collections.Counter(str(o.status) for o in measured)),
           "statuses_during_outage": dict(collections.Counter(str(o.status) for o in during)),
           "status_5xx": five, "healthy_false_after_s": unhealthy,
           "healthy_true_after_restart_s": healthy,
           "p99_ms": pct(ok_all, 0.99) if ok_all else None,
           "p99_before_ms": pct(ok_before, 0.99) if ok_before else None,
           "p99_during_outage_ms": pct(ok_during, 0.99) if ok_during else None,
           "p99_after_restart_ms": pct(ok_after, 0.99) if ok_after else None,
           "timeline": timeline(measured),
           "share_sum_after_recovery": _mean(end_sum),
           "pass": five == 0 and served == len(measured) and unhealthy is not None
           and healthy is not None}
    print(f"  fault redis: healthy=false after {_num(unhealthy, '.2f')} s, true "
          f"{_num(healthy, '.2f')} s after restart; 5xx {five}, statuses "
          f"{out['statuses']}", flush=True)
    return out


# ------------------------------------------------------------------------ verdicts

def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each setup against one gateway of the same load."""
    base = {(r["row"], r["setup"]): r for r in rows}
    checks: list[dict[str, Any]] = []

    def add(row: str, setup: str, what: str, measured: Any, bound: Any, ok: bool) -> None:
        checks.append({"row": row, "setup": setup, "check": what, "measured": measured,
                       "bound": bound, "verdict": "PASS" if ok else "FAIL"})

    for r in rows:
        row, setup = r["row"], r["setup"]
        one = base.get(("a" if row == "c" else row, "one"))
        if row in ("a", "c"):
            add(row, setup, "every request 200", f"{r['statuses']}", "all 200", r["all_200"])
            if setup == "one" or one is None:
                continue
            p99, p99_one = r["p99_ms"], one["p99_ms"]
            if p99 is not None and p99_one is not None:
                bound = 1.15 * p99_one + 5
                add(row, setup, "p99 ms", round(p99, 1), round(bound, 1), p99 <= bound)
            w, w_one = r["waited_in_workers_ms"], one["waited_in_workers_ms"]
            if w is not None and w_one is not None:
                add(row, setup, "waited in workers ms", round(w, 2), round(w_one + 2, 2),
                    w <= w_one + 2)
            ref = one["replicas"][0] if one["replicas"] else None
            if ref is None or ref["utilisation"] is None:
                continue
            for rep in r["replicas"]:
                u = rep["utilisation"]
                add(row, setup, f"{rep['replica']} utilisation", _num(u, ".3f"),
                    f"{ref['utilisation']:.3f} ± 0.08",
                    u is not None and abs(u - ref["utilisation"]) <= 0.08)
                add(row, setup, f"{rep['replica']} desired (reactive, predictive)",
                    f"({rep['reactive']}, {rep['predictive']})",
                    f"({ref['reactive']}, {ref['predictive']})",
                    (rep["reactive"], rep["predictive"]) == (ref["reactive"],
                                                             ref["predictive"]))
        elif row == "b" and setup != "one" and one is not None:
            for key, what in (("waited_in_workers_ms", "waited in workers ms"),
                              ("p50_ms", "admitted p50 ms")):
                v, v_one = r[key], one[key]
                if v is not None and v_one is not None:
                    bound = 1.3 * v_one + 5
                    add(row, setup, what, round(v, 2), round(bound, 2), v <= bound)
    return checks


def tables(summary: dict[str, Any]) -> str:
    lines = [f"capacity: {summary['capacity_measured_per_s']:.0f} req/s measured straight at "
             f"the workers (nominal {NOMINAL_CAPACITY:.0f}); rates below are fractions of "
             f"{summary['capacity_per_s']:.0f}", ""]
    cols = ["row", "setup", "load (split)", "sent", "200 / 429 / 503 / 504 / other",
            "p10 ms", "p50 ms", "p99 ms", "waited in workers ms/req",
            "utilisation · desired (reactive/predictive) per replica"]
    lines += [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in summary["rows"]:
        s = r["share"]
        reps = "; ".join(f"{x['replica']} {_num(x['utilisation'], '.2f')} · "
                         f"{x['reactive']}/{x['predictive']}" for x in r["replicas"])
        lines.append(" | ".join([
            r["row"], r["label"], f"{100 * r['load']:.0f} % ({r['split']})", str(r["sent"]),
            " / ".join(f"{100 * s[k]:.1f}" for k in ("200", "429", "503", "504", "other")),
            _num(r["p10_ms"], ".1f"), _num(r["p50_ms"], ".1f"), _num(r["p99_ms"], ".1f"),
            _num(r["waited_in_workers_ms"], ".2f"), reps]))
    lines += ["", "fair share (d): tenant a (weight 3) and b (weight 1), each offering "
              f"{100 * summary['fair_load']:.0f} % of capacity; completions in the window",
              "setup | entry (a, b) | a ok/s | b ok/s | a's share of completed (= GPU-s) | "
              "target 75 ± 5 % | a statuses | b statuses", "--- | --- | --- | --- | --- | --- | "
              "--- | ---"]
    for f in summary["fair"]:
        lines.append(" | ".join([
            f["label"], f"{f['entry']['a']}, {f['entry']['b']}",
            f"{f['ok_per_s']['a']:.1f}", f"{f['ok_per_s']['b']:.1f}",
            _pct(f["a_share"]), "PASS" if f["pass"] else "FAIL",
            json.dumps(f["statuses"]["a"]), json.dumps(f["statuses"]["b"])]))
    lines += ["", "targets (e): against one gateway at the same load, same run",
              "row | setup | check | measured | bound | verdict", "--- | --- | --- | --- | --- "
              "| ---"]
    for c in summary["targets"]:
        lines.append(" | ".join([c["row"], c["setup"], c["check"], str(c["measured"]),
                                 str(c["bound"]), c["verdict"]]))
    for f in summary.get("faults", []):
        lines += ["", f"{f['row']}: " + ", ".join(
            f"{k} {v if not isinstance(v, float) else round(v, 3)}" for k, v in f.items()
            if k not in ("row", "timeline"))]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

def tree_fingerprint() -> dict[str, Any]:
    """Which gateway code ran: HEAD, a hash of the uncommitted changes under gateway/, and
    the newest modification time there (the tree may be edited while benchmarks run)."""
    def git(*args: str) -> bytes:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=20,
                                  check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return b""
    files = sorted((REPO / "gateway").rglob("*.py"))
    newest = max((f.stat().st_mtime for f in files), default=0.0)
    digest = hashlib.sha1()
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return {"head": git("rev-parse", "HEAD").decode().strip(),
            "gateway_sources_sha1": digest.hexdigest(),
            "gateway_dirty": bool(git("status", "--porcelain", "--", "gateway").strip()),
            "gateway_newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--duration", type=float, help="measured seconds per phase "
                        "(default 10; --quick 5)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each phase")
    parser.add_argument("--settle", type=float, help="pause between phases (signals forget)")
    parser.add_argument("--sample-every", type=float, default=0.5,
                        help="status sampling interval in the measured second half, s")
    parser.add_argument("--fair-load", type=float, default=1.0,
                        help="each tenant's offer in (d), fraction of capacity")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--no-diagnostics", action="store_true",
                        help="skip (d)'s diagnostic row (replicas with order: fifo)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    # the utilisation is an EWMA of 1 s samples (0.8 / 0.2): a few seconds to settle
    args.warmup = args.warmup if args.warmup is not None else (2.5 if args.quick else 4.0)
    args.settle = args.settle if args.settle is not None else (2.0 if args.quick else 3.0)
    args.warm = 1.5 if args.quick else 3.0
    started = time.time()
    tree = tree_fingerprint()
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        sim = stack.enter_context(SimProcess(WORKERS, slots=INSTANCES, base_ms=SERVICE_MS))
        measured = run_async(probe_capacity(sim.ports, [INSTANCES] * WORKERS, 3.0))
        capacity = min(measured, NOMINAL_CAPACITY)
        print(f"capacity {measured:.0f} req/s measured (nominal {NOMINAL_CAPACITY:.0f}); "
              f"using {capacity:.0f}", flush=True)
        redis = RedisProc(tmp / "redis")
        stack.callback(redis.stop)
        redis.start()
        setups = start_setups(stack, sim.urls, redis, tmp)
        bench = Bench(args, sim.urls, capacity)
        for setup in setups.values():
            bench.warm(setup)
        bench.settle()
        order = ("one", "redis", "processes")
        print("rows (a) and (c): 50 % of capacity", flush=True)
        for key in order:
            s = setups[key]
            bench.phase("a", s, 0.5, [1.0] * len(s.ports), "even", seed=11)
        bench.phase("c", setups["redis"], 0.5, [0.8, 0.1, 0.1], "80/10/10", seed=11)
        print("row (b): 125 % of capacity", flush=True)
        for key in order:
            s = setups[key]
            bench.phase("b", s, 1.25, [1.0] * len(s.ports), "even", seed=21)
        print("row (d): fair share", flush=True)
        fair: list[dict[str, Any]] = []
        redis2 = RedisProc(tmp / "redis-fair")
        with ExitStack() as inner:
            inner.callback(redis2.stop)
            redis2.start()
            (tmp / "fair").mkdir()
            fsetups = start_setups(inner, sim.urls, redis2, tmp / "fair", tenants=True)
            for key in order:
                bench.warm(fsetups[key])
            bench.settle()
            for key, entry in (("one", (0, 0)), ("redis", (0, 1)), ("processes", (0, 0))):
                fair.append(bench.fair(fsetups[key], entry, seed=51))
            if not args.no_diagnostics:
                for key in order:
                    fsetups[key].stop()
                fair.append(fair_without_hold(bench, inner, sim.urls, redis2, tmp / "fair"))
        summary = {"capacity_measured_per_s": measured, "capacity_per_s": capacity,
                   "fair_load": args.fair_load,
                   "rows": bench.rows, "fair": fair}
        if not args.no_faults:
            print("faults", flush=True)
            kill = fault_kill(bench, setups["redis"])
            summary["faults"] = [kill, fault_redis(bench, setups["redis"], redis)]
    summary["targets"] = targets(summary["rows"])
    text = tables(summary)
    print()
    print(text)
    verdicts = [c["verdict"] for c in summary["targets"]] + [
        "PASS" if f["pass"] else "FAIL" for f in summary["fair"] if f["setup"] == "redis"]
    print(f"\ntargets: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL")
    tree_at_end = tree_fingerprint()
    if tree_at_end["gateway_sources_sha1"] != tree["gateway_sources_sha1"]:
        print("WARNING: gateway/ sources changed during the run; processes started at "
              "different times may have run different code")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python -m loadtest.replicas", *argv]), "started_at": started,
        "elapsed_s": time.time() - started,
        "tree": tree, "tree_at_end": tree_at_end,
        "fleet": {"workers": WORKERS, "instances_per_worker": INSTANCES,
                  "service_ms": SERVICE_MS, "nominal_capacity_per_s": NOMINAL_CAPACITY},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **summary, "table": text}, indent=2, default=str) + "\n")
    with contextlib.suppress(ValueError):
        print(f"wrote {args.output.resolve().relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
