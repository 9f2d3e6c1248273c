"""Gateway-side batching benchmark: batch-1 callers, with and without the gateway's batcher.

    python -m loadtest.batching [--duration 10] [--concurrency 64] [--max-delay-ms 2]
                                [--targets triton-solo] [--exec-ms 10] [--direct]

By default the issue's measurement: a real Triton model **without** a dynamic batcher
(``triton-solo``: 10 ms per execution whatever the batch, max_batch_size 64, one instance),
64 closed-loop batch-1 callers, behind three gateways whose YAML names only the worker and a
top-level ``batching`` section (no ``models:``, no slots: the model, its batch limit and its
instances are learned from the worker):

* ``gateway`` — batching off;
* ``gateway+batching`` — ``batching: {enabled: true, max_delay_ms: 2}``, nothing else: a
  batch waits for a free instance, ``max_delay_ms`` bounds the wait only while one is free;
* ``gateway+timer`` — the same plus ``wait_for_instance: false``: every batch closes
  ``max_delay_ms`` after its first member whatever the instances do (the rule before).

Targets (``--targets``, any of):

* ``triton`` — real Triton, model ``overhead`` of :mod:`gateway.tools.triton_worker`, one
  worker from :class:`gateway.tools.local.TritonFleet`. Its config turns on **Triton's own dynamic
  batcher** (500 µs queue delay), so Triton already merges batch-1 requests that queue while
  an execution runs: the ``wk batch`` column (mean requests per execution, from Triton's
  statistics) shows how much. The gateway can only add what Triton does not do already.
  (5 ms + 0.05 ms per item.)
* ``triton-solo`` — a real Triton model **without** a dynamic batcher (a model whose
  config has no ``dynamic_batching``; each request executes alone), ``--exec-ms`` +
  ``--per-item-ms`` × rows per execution: this process re-runs itself as ``solo-worker``,
  i.e. :mod:`gateway.tools.triton_worker` with only that model bound. The gateway is the
  only place where batches can form.
* ``sim`` — the simulator (``python -m gateway sim``, 5 ms + 0.05 ms per item), one worker,
  one execution slot; it also executes every request on its own.

For each target: a closed loop at each ``--concurrency`` (that many callers, each sending
its next request when the last is answered; throughput, p50, p99) through each gateway
(and direct to the worker with ``--direct``); then an **open loop** (fixed arrival
rate, latency from each request's scheduled time, so queueing is not hidden) at
``--open-fraction`` of the no-batching gateway's closed-loop throughput, i.e. below
saturation, in ``--open-rounds`` interleaved rounds per path (neighbours on a shared machine
then hurt every path alike), to check p99(batching) ≤ p99(no batching) + ``max_delay_ms``.
A first row measures the client's own ceiling (the same client against nginx answering a
fixed body).

The client is Python (asyncio, uvloop, the gateway's own httptools pool) on the same two
shared cores as the gateway and the worker: compare rows of one run, not across machines.
Prints a table and writes ``results/batching.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.core.tensors import InferRequest, Tensor, encode_infer_request
from gateway.fleet.upstream import Pool, PoolLimits
from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port, free_ports
from loadtest.overhead import start_nginx, wait_http

RESULTS = Path("results/batching.json")
DEFAULT_CONCURRENCY = (64,)
DEFAULT_DURATION_S = 10.0
DEFAULT_EXEC_MS = 10.0  # triton-solo: one execution, whatever the batch
DEFAULT_PER_ITEM_MS = 0.0
DEFAULT_MAX_DELAY_MS = 2.0
DEFAULT_OPEN_FRACTION = 0.5
DEFAULT_OPEN_ROUNDS = 4
WARMUP_S = 1.0
OPEN_WARMUP_S = 0.3  # per round: the connections are warm already
SIM_BASE_MS = 5.0
SIM_PER_ITEM_MS = 0.05


@dataclass(frozen=True)
class Target:
    name: str
    model: str
    body: bytes
    headers: list[tuple[bytes, bytes]]


def batch1_body(model: str, name: str, width: int) -> Target:
    request = InferRequest("", {"binary_data_output": True}, (Tensor.from_numpy(
        name, np.arange(width, dtype=np.float32)[None, :]),))
    encoded = encode_infer_request(request, binary=True)
    return Target(model, model, encoded.body, encoded.headers())


@dataclass
class Row:
    target: str
    path: str  # client | direct | gateway | gateway+batching
    loop: str  # closed | open
    concurrency: int
    offered_rps: float | None
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    gateway_batch: float | None  # mean members per gateway batch
    worker_batch: float | None  # mean requests per worker execution (Triton's own batcher)


# ---------------------------------------------------------------- the client


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


async def closed_loop(port: int, duration_s: float, *, target: Target,
                      concurrency: int) -> tuple[float, list[float], int]:
    """``concurrency`` callers back to back; (throughput, latencies, errors) after warm-up."""
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=concurrency, read_timeout_s=30.0))
    path = f"/v2/models/{target.model}/infer"
    loop = asyncio.get_running_loop()
    start = loop.time() + WARMUP_S
    stop = start + duration_s
    latencies: list[float] = []
    errors = 0

    async def caller() -> None:
        nonlocal errors
        while (now := loop.time()) < stop:
            try:
                resp = await pool.request("POST", path, target.headers, target.body)
                await resp.read()
                ok = resp.status == 200
            except Exception:
                ok = False
            if now >= start:
                if ok:
                    latencies.append(loop.time() - now)
                else:
                    errors += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await pool.aclose()
    return len(latencies) / duration_s, latencies, errors


async def open_loop(port: int, target: Target, rate: float, duration_s: float,
                    connections: int) -> tuple[float, list[float], int]:
    """Arrivals at ``rate`` per second, evenly spaced; latency from the scheduled time."""
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=connections, read_timeout_s=30.0))
    path = f"/v2/models/{target.model}/infer"
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float, record: bool) -> None:
        nonlocal errors
        try:
            resp = await pool.request("POST", path, target.headers, target.body)
            await resp.read()
            ok = resp.status == 200
        except Exception:
            ok = False
        if record:
            if ok:
                latencies.append(loop.time() - scheduled)
            else:
                errors += 1

    warm = int(rate * OPEN_WARMUP_S)
    n = warm + int(rate * duration_s)
    begin = loop.time() + 0.05
    tasks = []
    for i in range(n):
        at = begin + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at, i >= warm)))
    await asyncio.gather(*tasks)
    await pool.aclose()
    return len(latencies) / duration_s, latencies, errors


def run_async(coro_fn: Callable[[], Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_fn())
    return uvloop.run(coro_fn())


# ---------------------------------------------------------------- counters we read back


def worker_counts(url: str, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model`` from a worker's statistics."""
    with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=5) as resp:
        doc = json.loads(resp.read())
    stats = doc["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def gateway_counts(gw: GatewayProcess, model: str) -> tuple[float, float]:
    """(members, batches) summed from the gateway's ``gateway_batch_size`` histogram."""
    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    members = batches = 0.0
    label = f'model="{model}"'
    for line in text.splitlines():
        if line.startswith("gateway_batch_size_sum") and label in line:
            members = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gateway_batch_size_count") and label in line:
            batches = float(line.rsplit(" ", 1)[1])
    return members, batches


def ratio(after: tuple[float, float], before: tuple[float, float]) -> float | None:
    d_num, d_den = after[0] - before[0], after[1] - before[1]
    return d_num / d_den if d_den > 0 else None


# ---------------------------------------------------------------- the servers


@contextmanager
def triton_worker() -> Iterator[tuple[str, str]]:
    from gateway.tools.local import TritonFleet

    with TritonFleet(1, service_times_ms=[0.0], models=("overhead",)) as fleet:
        yield fleet.worker(0).http_url, fleet.worker(0).metrics_url


def solo_worker_main(argv: list[str]) -> int:
    """Child process: :mod:`gateway.tools.triton_worker` serving one model, ``overhead`` with the
    same shapes but **without** Triton's dynamic batcher (each request executes alone, as a
    model whose config has no ``dynamic_batching`` does); one execution sleeps
    ``--service-time-ms`` + ``--per-item-ms`` × rows."""
    from gateway.tools import triton_worker

    def bind(triton: Any, service_time_ms: float, per_item_ms: float) -> None:
        from pytriton.model_config import ModelConfig
        from pytriton.model_config import Tensor as Spec

        def infer(requests: list[Any]) -> list[dict[str, Any]]:
            items = sum(len(r.data["INPUT"]) for r in requests)
            time.sleep((service_time_ms + per_item_ms * items) / 1000.0)
            return [{"OUTPUT": r.data["INPUT"] * np.float32(2.0)} for r in requests]

        width = (triton_worker.OVERHEAD_WIDTH,)
        triton.bind(model_name="overhead", infer_func=infer,
                    inputs=[Spec(name="INPUT", dtype=np.float32, shape=width)],
                    outputs=[Spec(name="OUTPUT", dtype=np.float32, shape=width)],
                    config=ModelConfig(max_batch_size=triton_worker.OVERHEAD_MAX_BATCH,
                                       batcher=None))  # no dynamic_batching section

    triton_worker.bind_models = bind  # this process serves only the model above
    return triton_worker.main(argv)


@contextmanager
def solo_triton_worker(tmp: Path, exec_ms: float,
                       per_item_ms: float) -> Iterator[tuple[str, str]]:
    from gateway.tools.triton_worker import env_with_libpython_first

    http, grpc, metrics = free_ports(3)
    workdir = tmp / "solo"
    workdir.mkdir(parents=True, exist_ok=True)
    env = env_with_libpython_first(os.environ)
    env["PYTRITON_HOME"] = str(workdir / "home")
    with open(workdir / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.batching", "solo-worker", "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--name", "solo",
             "--workdir", str(workdir / "triton"), "--parent-pid", str(os.getpid()),
             "--service-time-ms", str(exec_ms), "--per-item-ms", str(per_item_ms)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 90.0
        url = f"http://127.0.0.1:{http}"
        while not _answers(url + "/v2/models/overhead/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("solo Triton worker did not start:\n"
                                   + (workdir / "worker.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        procs.stop(proc, 20, group=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


@contextmanager
def sim_worker(lifetime_s: float) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "sim", "--workers", "1", "--base-port", str(port),
         "--slots", "1", "--base-ms", str(SIM_BASE_MS), "--per-item-ms", str(SIM_PER_ITEM_MS),
         "--duration-s", str(lifetime_s)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/v2/health/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(proc, 10)


def gateway_for(stack: ExitStack, worker_url: str, metrics_url: str, model: str,
                batching: dict[str, Any] | None, workdir: Path) -> GatewayProcess:
    # Defaults are the product: the worker and a top-level batching section, nothing else
    # (no models: the model is found and its batch limit learned).
    cfg: dict[str, Any] = {"workers": [{"url": worker_url, "metrics_url": metrics_url}]}
    if batching:
        cfg["batching"] = batching
    workdir.mkdir(parents=True, exist_ok=True)
    gw = GatewayProcess(cfg, workdir)
    stack.callback(gw.stop)
    gw.start()
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 1, what="worker ready")
    return gw


# ---------------------------------------------------------------- one target


@dataclass
class Sample:
    """What one or more runs of one path measured, pooled."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    gateway: tuple[float, float] = (0.0, 0.0)  # (members, batches)
    worker: tuple[float, float] = (0.0, 0.0)  # (inferences, executions)


def measure(target: Target, worker_url: str, gateways: dict[str, GatewayProcess],
            concurrencies: list[int], duration_s: float, open_fraction: float,
            open_rounds: int, rows: list[Row], *, direct: bool = False) -> None:
    ports = {"direct": int(worker_url.rsplit(":", 1)[1]),
             **{path: gw.port for path, gw in gateways.items()}}
    paths = ["direct", *gateways] if direct else list(gateways)

    def run(path: str, sample: Sample, seconds: float,
            client: Callable[[int, float], Any]) -> None:
        gw = gateways.get(path)
        w0 = worker_counts(worker_url, target.model)
        g0 = gateway_counts(gw, target.model) if gw else (0.0, 0.0)
        _, lat, errors = run_async(lambda: client(ports[path], seconds))
        w1 = worker_counts(worker_url, target.model)
        g1 = gateway_counts(gw, target.model) if gw else (0.0, 0.0)
        sample.seconds += seconds
        sample.latencies += lat
        sample.errors += errors
        sample.gateway = (sample.gateway[0] + g1[0] - g0[0], sample.gateway[1] + g1[1] - g0[1])
        sample.worker = (sample.worker[0] + w1[0] - w0[0], sample.worker[1] + w1[1] - w0[1])

    def row(path: str, loop: str, concurrency: int, rate: float | None, s: Sample) -> Row:
        r = Row(target.name, path, loop, concurrency, rate, len(s.latencies) / s.seconds,
                pct(s.latencies, 0.50), pct(s.latencies, 0.99), s.errors,
                ratio(s.gateway, (0.0, 0.0)) if path in gateways else None,
                ratio(s.worker, (0.0, 0.0)))
        print_row(r)
        rows.append(r)
        return r

    closed: dict[tuple[str, int], Row] = {}
    for concurrency in concurrencies:
        for path in paths:
            sample = Sample()
            run(path, sample, duration_s, functools.partial(
                closed_loop, target=target, concurrency=concurrency))
            closed[(path, concurrency)] = row(path, "closed", concurrency, None, sample)
    # Open loop below saturation, in interleaved rounds so that a noisy neighbour on the
    # shared machine hurts every path alike.
    rate = max(10.0, round(closed[("gateway", concurrencies[0])].throughput_rps
                           * open_fraction))
    samples = {path: Sample() for path in paths}
    for round_ in range(open_rounds):
        for path in paths[round_ % len(paths):] + paths[:round_ % len(paths)]:
            run(path, samples[path], duration_s / open_rounds,
                lambda port, secs: open_loop(port, target, rate, secs, concurrencies[0]))
    for path in paths:
        row(path, "open", concurrencies[0], rate, samples[path])


# ---------------------------------------------------------------- output


HEADER = (f"{'target':<11} {'path':<17} {'loop':<6} {'conc':>5} {'offered':>8} {'rps':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'err':>5} {'gw batch':>8} {'wk batch':>8}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_row(r: Row) -> None:
    print(f"{r.target:<11} {r.path:<17} {r.loop:<6} {r.concurrency:>5} "
          f"{_fmt(r.offered_rps, '8.0f'):>8} {r.throughput_rps:8.0f} {r.p50_ms:8.1f} "
          f"{r.p99_ms:8.1f} {r.errors:5d} {_fmt(r.gateway_batch, '8.1f'):>8} "
          f"{_fmt(r.worker_batch, '8.1f'):>8}", flush=True)


def verdicts(rows: list[Row], max_delay_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in sorted({r.target for r in rows}):
        mine = [r for r in rows if r.target == target]
        closed = {(r.path, r.concurrency): r for r in mine if r.loop == "closed"}

        def speedups(path: str, closed: dict[tuple[str, int], Row] = closed
                     ) -> dict[str, float]:
            return {str(c): closed[(path, c)].throughput_rps
                    / max(closed[("gateway", c)].throughput_rps, 1e-9)
                    for (p, c) in closed if p == "gateway" and (path, c) in closed}

        opened = {r.path: r for r in mine if r.loop == "open"}
        if "gateway" not in opened or "gateway+batching" not in opened:
            continue
        on, off = opened["gateway+batching"], opened["gateway"]
        out[target] = {
            "throughput_speedup_by_concurrency": speedups("gateway+batching"),
            "timer_only_speedup_by_concurrency": speedups("gateway+timer"),
            "closed_loop_p99_ms": {f"{p}@{c}": r.p99_ms for (p, c), r in closed.items()},
            "open_loop_p99_ms": {p: r.p99_ms for p, r in opened.items()},
            "p99_within_no_batching_plus_max_delay": on.p99_ms <= off.p99_ms + max_delay_ms,
            "target_3x_met": all(v >= 3.0 for v in speedups("gateway+batching").values()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                   help="seconds per run, after a 1 s warm-up")
    p.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="closed-loop callers (list); the first also bounds open-loop connections")
    p.add_argument("--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_MS)
    p.add_argument("--open-fraction", type=float, default=DEFAULT_OPEN_FRACTION,
                   help="open-loop rate as a fraction of the no-batching gateway's throughput")
    p.add_argument("--open-rounds", type=int, default=DEFAULT_OPEN_ROUNDS,
                   help="open-loop time per path is split into this many interleaved rounds")
    p.add_argument("--targets", default="triton-solo",
                   help="any of triton-solo, triton, sim")
    p.add_argument("--exec-ms", type=float, default=DEFAULT_EXEC_MS,
                   help="triton-solo: milliseconds per execution")
    p.add_argument("--per-item-ms", type=float, default=DEFAULT_PER_ITEM_MS,
                   help="triton-solo: added milliseconds per row of a batch")
    p.add_argument("--direct", action="store_true", help="also measure the worker directly")
    p.add_argument("--no-timer-arm", action="store_true",
                   help="leave out the gateway+timer arm (wait_for_instance: false)")
    p.add_argument("--output", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["solo-worker"]:
        return solo_worker_main(argv[1:])
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    batching = {"enabled": True, "max_delay_ms": args.max_delay_ms}
    lifetime_s = (3 * len(concurrencies) * (args.duration + WARMUP_S + 5)
                  + 3 * (args.duration + args.open_rounds * (OPEN_WARMUP_S + 2)) + 120)
    rows: list[Row] = []
    started = time.time()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        if shutil.which("nginx") and args.direct:
            port = free_port()
            nginx = start_nginx(tmp, port)
            stack.callback(nginx.wait)
            stack.callback(nginx.terminate)
            nginx_target = Target("nginx", "simple", b"{}",
                                  [(b"content-type", b"application/json")])
            rps, lat, errors = run_async(lambda: closed_loop(
                port, min(args.duration, 5.0), target=nginx_target,
                concurrency=concurrencies[0]))
            row = Row("client", "nginx", "closed", concurrencies[0], None, rps,
                      pct(lat, 0.5), pct(lat, 0.99), errors, None, None)
            print_row(row)
            rows.append(row)
        for name in targets:
            with ExitStack() as inner:
                if name == "triton":
                    url, metrics = inner.enter_context(triton_worker())
                    target = batch1_body("overhead", "INPUT", 4)
                elif name == "triton-solo":
                    url, metrics = inner.enter_context(
                        solo_triton_worker(tmp, args.exec_ms, args.per_item_ms))
                    target = batch1_body("overhead", "INPUT", 4)
                else:
                    url = inner.enter_context(sim_worker(lifetime_s))
                    metrics = url + "/metrics"
                    target = batch1_body("simple", "INPUT0", 16)
                target = Target(name, target.model, target.body, target.headers)
                gateways = {
                    "gateway": gateway_for(inner, url, metrics, target.model, None,
                                           tmp / f"{name}-off"),
                    "gateway+batching": gateway_for(inner, url, metrics, target.model,
                                                    batching, tmp / f"{name}-on"),
                }
                if not args.no_timer_arm:
                    gateways["gateway+timer"] = gateway_for(
                        inner, url, metrics, target.model,
                        {**batching, "wait_for_instance": False}, tmp / f"{name}-timer")
                measure(target, url, gateways, concurrencies, args.duration,
                        args.open_fraction, args.open_rounds, rows, direct=args.direct)
    summary = verdicts(rows, args.max_delay_ms)
    print(json.dumps(summary, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python -m loadtest.batching", *argv]),
        "started_at": started, "duration_s": args.duration, "concurrency": concurrencies,
        "max_delay_ms": args.max_delay_ms, "open_fraction": args.open_fraction,
        "exec_ms": args.exec_ms, "per_item_ms": args.per_item_ms,
        "rows": [asdict(r) for r in rows], "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
