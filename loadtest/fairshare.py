"""Fair share benchmark: a light and a heavy tenant of equal weight on one saturated worker,
FIFO and fair queuing measured side by side in one run.

    python -m loadtest.fairshare [--duration 8] [--base-ms 2] [--per-item-ms 1]
                                 [--heavy-batch 32] [--light-share 0.2] [--overload 1.5]
                                 [--weights-scenario] [--overhead | --only-overhead]

The worker is the simulator (``python -m gateway sim --workers 1 --slots 1``): one
execution at a time, (base + per item × batch) ms each, so one heavy execution (batch 32) and
the fleet's capacity (1 GPU-second per second) are known exactly. Two gateways in front of
it, the README's minimal config (``listen`` + ``workers``) plus two tenants; one of them adds
``admission.queue.order: fifo``, the other runs the default (fair). The gateway learns 2 slots
for the worker (one executing, one waiting in the worker: ``fleet._derive_slots``), so the rest
of the backlog waits in the gateway's queue, where the order applies.

Phases, each gateway in turn (never both at once):

1. **capacity** — heavy requests alone, closed loop (8 callers): heavy requests per second
   the path sustains; × one heavy execution = the GPU-seconds per second it keeps busy (η).
2. **unloaded** — the light tenant alone: batch-1 requests, Poisson arrivals at
   ``--light-share`` of capacity (in GPU-seconds); its unloaded p99.
3. **loaded** — the same light stream plus the heavy tenant's batch-32 requests, Poisson at
   ``--overload − light-share`` of capacity: ``--overload`` (≥ 1.5) in all. Latency is from
   each request's scheduled time (open loop: queueing is not hidden).

Targets (the issue's): light p99 (loaded) ≤ its unloaded p99 + 1.5 × one heavy execution;
heavy throughput ≥ 0.95 × the capacity left (η − light share, in heavy requests per second).

``--weights-scenario`` adds the issue's second case: two tenants both overloading (each at
``--overload`` of capacity, batch ``--heavy-batch``), weights 3 : 1 (named heavy and light
here only for their keys) — GPU-second shares (from the
completed requests) against 75/25, and Jain's index on weight-normalised GPU-seconds, FIFO vs
fair.

``--overhead`` (or ``--only-overhead``): the cost of fair order on the hot path — the
overhead benchmark's gateway with every admission feature on, ``order: fair`` vs ``fifo``,
saturation throughput with wrk against nginx in interleaved rounds (issue target: fair ≥ 0.9
× fifo).

The client, gateways and simulator share the machine's cores: compare rows of one run.
Prints a table and writes ``results/fairshare.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gateway.core.fairshare import jain_index
from gateway.core.tensors import InferRequest, Tensor, encode_infer_request
from gateway.fleet.upstream import Pool, PoolLimits
from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port
from loadtest.overhead import gateway_yaml, run_wrk, start_nginx, wait_http

RESULTS = Path("results/fairshare.json")
@dataclass(frozen=True)
class Target:
    """The model the benchmark calls: the simulator's, or real Triton's (pytriton)."""

    name: str
    model: str
    input_name: str
    width: int


SIM = Target("sim", "simple", "INPUT0", 16)
TRITON = Target("triton", "overhead", "INPUT", 4)  # loadtest.batching's solo worker
TARGET = SIM
CAPACITY_CALLERS = 8
DRAIN_TIMEOUT_S = 15.0
KEYS = {"light": "light-key", "heavy": "heavy-key"}
ADMIN_TOKEN = "bench-admin-token"


@dataclass(frozen=True)
class Stream:
    tenant: str
    batch: int
    rate_per_s: float


@dataclass
class Measured:
    """One tenant's requests in one phase."""

    tenant: str
    sent: int = 0
    ok: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    window_ok: int = 0          # completed inside the throughput window
    window_s: float = 0.0

    @property
    def ok_rps(self) -> float:
        return self.window_ok / self.window_s if self.window_s > 0 else 0.0

    def p(self, q: float) -> float | None:
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


@dataclass
class Row:
    gateway: str          # fifo | fair
    phase: str            # capacity | unloaded | loaded | weights
    tenant: str
    offered_rps: float | None
    ok_rps: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    gpu_share: float | None = None  # of the GPU-seconds completed in the phase


def infer_body(batch: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    request = InferRequest("", {"binary_data_output": True}, (Tensor.from_numpy(
        TARGET.input_name, np.ones((batch, TARGET.width), dtype=np.float32)),))
    encoded = encode_infer_request(request, binary=True)
    return encoded.body, encoded.headers()


async def open_loop(port: int, streams: list[Stream], duration_s: float,
                    seed: int) -> dict[str, Measured]:
    """Poisson arrivals per stream; latency from each request's scheduled time."""
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=512, read_timeout_s=30.0))
    path = f"/v2/models/{TARGET.model}/infer"
    loop = asyncio.get_running_loop()
    out = {s.tenant: Measured(s.tenant) for s in streams}
    tasks: list[asyncio.Task[None]] = []

    async def one(stream: Stream, body: bytes, headers: list[tuple[bytes, bytes]],
                  scheduled: float) -> None:
        m = out[stream.tenant]
        try:
            resp = await pool.request("POST", path, headers, body)
            await resp.read()
            status = resp.status
        except Exception:
            status = 0
        done = loop.time()
        if status == 200:
            m.ok += 1
            m.latencies.append(done - scheduled)
            if window[0] <= done <= window[1]:
                m.window_ok += 1
        else:
            m.errors[status] = m.errors.get(status, 0) + 1

    async def arrivals(stream: Stream, rng: random.Random, begin: float) -> None:
        body, headers = infer_body(stream.batch)
        headers = [*headers, (b"x-api-key", KEYS.get(stream.tenant, stream.tenant).encode())]
        at = begin
        while True:
            at += rng.expovariate(stream.rate_per_s)
            if at >= begin + duration_s:
                return
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            out[stream.tenant].sent += 1
            tasks.append(asyncio.ensure_future(one(stream, body, headers, at)))

    begin = loop.time() + 0.05
    # throughput: completions after the first second (the backlog has formed) until the
    # last arrival, not the drain after it
    window = (begin + min(1.0, duration_s / 4), begin + duration_s)
    for m in out.values():
        m.window_s = window[1] - window[0]
    await asyncio.gather(*(arrivals(s, random.Random(seed + i), begin)
                           for i, s in enumerate(streams)))
    await asyncio.gather(*tasks)
    await pool.aclose()
    return out


async def closed_loop(port: int, tenant: str, batch: int, callers: int,
                      duration_s: float) -> Measured:
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=callers, read_timeout_s=30.0))
    path = f"/v2/models/{TARGET.model}/infer"
    body, headers = infer_body(batch)
    headers = [*headers, (b"x-api-key", KEYS[tenant].encode())]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5  # warm-up
    stop = start + duration_s
    m = Measured(tenant)

    async def caller() -> None:
        while (now := loop.time()) < stop:
            try:
                resp = await pool.request("POST", path, headers, body)
                await resp.read()
                ok = resp.status == 200
            except Exception:
                ok = False
            if now >= start:
                m.sent += 1
                if ok:
                    m.ok += 1
                    m.window_ok += 1
                    m.latencies.append(loop.time() - now)
                else:
                    m.errors[0] = m.errors.get(0, 0) + 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    await pool.aclose()
    m.window_s = duration_s
    return m


def run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@contextmanager
def sim_worker(args: argparse.Namespace, lifetime_s: float) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "sim", "--workers", "1", "--base-port", str(port),
         "--slots", "1", "--base-ms", str(args.base_ms), "--per-item-ms",
         str(args.per_item_ms), "--duration-s", str(lifetime_s)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/v2/health/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(proc, 10)


def start_gateway(stack: ExitStack, worker: dict[str, str], order: str, workdir: Path,
                  weights: dict[str, float] | None = None) -> GatewayProcess:
    """The README's minimal config plus tenants (and, for the FIFO baseline, the order).
    ``worker``: its url (and metrics_url where Triton's metrics are not on port 8002)."""
    tenants: dict[str, Any] = {}
    for name, key in KEYS.items():
        tenants[name] = {"keys": [key]}
        if weights and name in weights:
            tenants[name]["weight"] = weights[name]
    admission: dict[str, Any] = {"tenants": tenants}
    if order != "fair":
        admission["queue"] = {"order": order}
    cfg: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": 0},
                           "workers": [worker], "admission": admission,
                           # /status.json names the tenants to the admin only
                           "admin": {"token": ADMIN_TOKEN}}
    workdir.mkdir(parents=True, exist_ok=True)
    gw = GatewayProcess(cfg, workdir)
    stack.callback(gw.stop)
    gw.start()
    gw.wait_workers_ready(1)
    # One request first: a model PyTriton binds is missing from Triton's repository index,
    # so the gateway learns it (and then its config, hence the slots) from traffic.
    body, headers = infer_body(1)
    warm = urllib.request.Request(f"{gw.url}/v2/models/{TARGET.model}/infer", body,
                                  {k.decode(): v.decode() for k, v in headers}, method="POST")
    with urllib.request.urlopen(warm, timeout=10) as resp:
        resp.read()
    gw.wait_for(lambda: gw.worker_status(next(iter(_worker_ids(gw))))["slots"] == 2,
                timeout_s=30.0, what="slots learned from the model config")
    return gw


def _worker_ids(gw: GatewayProcess) -> list[str]:
    return [w["id"] for w in gw.status()["workers"]]


def fair_share_status(gw: GatewayProcess) -> dict[str, Any]:
    request = urllib.request.Request(f"{gw.url}/status.json",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read()).get("fair_share", {})
    return doc


def drained(gw: GatewayProcess) -> None:
    gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] == 0
                and all(w["in_flight"] == 0 for w in gw.status()["workers"]),
                timeout_s=DRAIN_TIMEOUT_S, what="queue drained")


def sim_compute_per_exec_ms(worker_url: str) -> dict[str, float]:
    """(cumulative compute µs, executions) of the simulator, for checking the cost model."""
    with urllib.request.urlopen(f"{worker_url}/v2/models/{TARGET.model}/stats",
                                timeout=5) as resp:
        stats = json.loads(resp.read())["model_stats"][0]
    return {"compute_ns": float(stats["inference_stats"]["compute_infer"]["ns"]),
            "executions": float(stats["execution_count"])}


def row_of(gateway: str, phase: str, m: Measured, duration_s: float,
           offered: float | None, share: float | None = None) -> Row:
    return Row(gateway, phase, m.tenant, offered, m.ok_rps, sum(m.errors.values()),
               m.p(0.5), m.p(0.99), share)


HEADER = (f"{'gateway':<8}{'phase':<10}{'tenant':<8}{'offered/s':>10}{'ok/s':>9}{'errors':>8}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'GPU share':>10}")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_row(r: Row) -> None:
    print(f"{r.gateway:<8}{r.phase:<10}{r.tenant:<8}{_fmt(r.offered_rps, '.1f'):>10}"
          f"{r.ok_rps:>9.1f}{r.errors:>8}{_fmt(r.p50_ms, '.1f'):>9}{_fmt(r.p99_ms, '.1f'):>9}"
          f"{_fmt(r.gpu_share, '.3f'):>10}", flush=True)


def gpu_shares(ms: dict[str, Measured], exec_s: dict[str, float]) -> dict[str, float]:
    used = {t: m.window_ok * exec_s[t] for t, m in ms.items()}
    total = sum(used.values())
    return {t: (u / total if total > 0 else 0.0) for t, u in used.items()}


def light_heavy(args: argparse.Namespace, gws: dict[str, GatewayProcess],
                rows: list[Row]) -> dict[str, Any]:
    heavy_exec_s = (args.base_ms + args.per_item_ms * args.heavy_batch) / 1000.0
    light_exec_s = (args.base_ms + args.per_item_ms) / 1000.0
    if args.target == "triton":
        # PyTriton's Python model costs milliseconds around every execution, as much as a
        # batch-1 sleep: the light tenant's share of the worker goes by what one light
        # execution really takes, measured at saturation (light alone, closed loop).
        cap = run(closed_loop(next(iter(gws.values())).port, "light", 1, CAPACITY_CALLERS,
                              args.duration / 2))
        light_exec_s = max(light_exec_s, 1.0 / cap.ok_rps if cap.ok_rps else 0.0)
        print(f"light execution at saturation: {light_exec_s * 1000:.1f} ms", flush=True)
    light = Stream("light", 1, args.light_share / light_exec_s)
    heavy = Stream("heavy", args.heavy_batch,
                   (args.overload - args.light_share) / heavy_exec_s)
    exec_s = {"light": light_exec_s, "heavy": heavy_exec_s}
    out: dict[str, Any] = {"heavy_exec_ms": heavy_exec_s * 1000,
                           "light_exec_ms": light_exec_s * 1000,
                           "light_rate_per_s": light.rate_per_s,
                           "heavy_rate_per_s": heavy.rate_per_s}
    d = args.duration
    for name, gw in gws.items():
        cap = run(closed_loop(gw.port, "heavy", args.heavy_batch, CAPACITY_CALLERS, d))
        rows.append(row_of(name, "capacity", cap, d, None))
        print_row(rows[-1])
        drained(gw)
        unloaded = run(open_loop(gw.port, [light], d, seed=1))["light"]
        rows.append(row_of(name, "unloaded", unloaded, d, light.rate_per_s))
        print_row(rows[-1])
        drained(gw)
        loaded = run(open_loop(gw.port, [light, heavy], d, seed=2))
        shares = gpu_shares(loaded, exec_s)
        for t, s in (("light", light), ("heavy", heavy)):
            rows.append(row_of(name, "loaded", loaded[t], d, s.rate_per_s, shares[t]))
            print_row(rows[-1])
        status = fair_share_status(gw)
        drained(gw)
        eta = cap.ok_rps * heavy_exec_s
        left_rps = max(0.0, eta - args.light_share) / heavy_exec_s
        unloaded_p99 = unloaded.p(0.99) or 0.0
        light_p99 = loaded["light"].p(0.99)
        # one heavy execution as the worker delivers them at saturation (the nominal sleep
        # plus whatever each execution costs around it: pytriton's Python model, the sim)
        exec_ms = max(heavy_exec_s, 1.0 / cap.ok_rps if cap.ok_rps else 0.0) * 1000
        bound = unloaded_p99 + 1.5 * exec_ms
        heavy_rps = loaded["heavy"].ok_rps
        out[name] = {
            "capacity_heavy_rps": cap.ok_rps, "eta_gpu_s_per_s": eta,
            "light_unloaded_p99_ms": unloaded_p99, "light_loaded_p99_ms": light_p99,
            "heavy_exec_measured_ms": exec_ms,
            "light_p99_in_heavy_executions": ((light_p99 - unloaded_p99) / exec_ms
                                              if light_p99 is not None else None),
            "light_p99_bound_ms": bound,
            "light_p99_ok": light_p99 is not None and light_p99 <= bound,
            "light_errors": sum(loaded["light"].errors.values()),
            "light_p99_over_unloaded": (light_p99 / unloaded_p99
                                        if light_p99 is not None and unloaded_p99 else None),
            "heavy_rps": heavy_rps, "heavy_left_rps": left_rps,
            "heavy_vs_left": heavy_rps / left_rps if left_rps > 0 else None,
            "heavy_ok": left_rps > 0 and heavy_rps >= 0.95 * left_rps,
            "gateway_meter": status,
        }
    return out


def weights_scenario(args: argparse.Namespace, gws: dict[str, GatewayProcess],
                     rows: list[Row]) -> dict[str, Any]:
    batch = args.heavy_batch
    exec_s = (args.base_ms + args.per_item_ms * batch) / 1000.0
    # each overloads the worker on its own, so both stay backlogged
    streams = [Stream("heavy", batch, args.overload / exec_s),   # weight 3
               Stream("light", batch, args.overload / exec_s)]   # weight 1
    weights = {"heavy": 3.0, "light": 1.0}
    out: dict[str, Any] = {"weights": weights}
    for name, gw in gws.items():
        ms = run(open_loop(gw.port, streams, args.duration, seed=3))
        shares = gpu_shares(ms, {"heavy": exec_s, "light": exec_s})
        for s in streams:
            rows.append(row_of(name, "weights", ms[s.tenant], args.duration, s.rate_per_s,
                               shares[s.tenant]))
            print_row(rows[-1])
        drained(gw)
        jain = jain_index([shares[t] / weights[t] for t in weights])
        out[name] = {"shares": shares, "jain_weighted": jain,
                     "share_error": abs(shares["heavy"] - 0.75),
                     "gateway_meter": fair_share_status(gw)}
    return out


def overhead(args: argparse.Namespace, tmp: Path, stack: ExitStack) -> dict[str, Any]:
    """``loadtest.overhead``'s gateway with every admission feature on (a tenant key among
    them), fair order vs ``order: fifo``: saturation throughput with wrk against nginx,
    interleaved rounds, the median ratio."""
    upstream = free_port()
    nginx = start_nginx(tmp, upstream)
    stack.callback(nginx.wait)
    stack.callback(nginx.terminate)
    ports: dict[str, int] = {}
    for order in ("fifo", "fair"):
        port = ports[order] = free_port()
        cfg = yaml.safe_load(gateway_yaml(port, upstream, admission=True))
        cfg["admission"]["queue"]["order"] = order
        (tmp / f"overhead-{order}.yaml").write_text(yaml.safe_dump(cfg))
        with open(tmp / f"overhead-{order}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config",
                 str(tmp / f"overhead-{order}.yaml")], stdout=subprocess.DEVNULL, stderr=log)
        stack.callback(procs.stop, proc, 10)
        wait_http(port, "/v2/health/ready")
    rounds: dict[str, list[float]] = {"fifo": [], "fair": []}
    for _ in range(args.overhead_rounds):
        for order, port in ports.items():
            rps, _ = run_wrk(tmp, port, args.overhead_duration, 64, {"X-Api-Key": "bench-key"})
            rounds[order].append(rps)
            print(f"overhead  {order:<5} {rps:9.0f} req/s", flush=True)
    fifo, fair = statistics.median(rounds["fifo"]), statistics.median(rounds["fair"])
    return {"rounds": rounds, "fifo_rps": fifo, "fair_rps": fair,
            "fair_over_fifo": fair / fifo if fifo else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fairshare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    p.add_argument("--base-ms", type=float, default=2.0)
    p.add_argument("--per-item-ms", type=float, default=1.0)
    p.add_argument("--heavy-batch", type=int, default=32)
    p.add_argument("--light-share", type=float, default=0.2,
                   help="light tenant's demand, fraction of capacity (GPU-seconds)")
    p.add_argument("--overload", type=float, default=1.5,
                   help="both tenants' demand together, fraction of capacity")
    p.add_argument("--weights-scenario", action="store_true")
    p.add_argument("--target", choices=("sim", "triton"), default="sim",
                   help="triton: a real Triton (pytriton) model without a dynamic batcher, "
                        "one instance, sleeping base + per item x batch per execution")
    p.add_argument("--overhead", action="store_true",
                   help="also: saturation throughput, fair vs fifo (nginx upstream, wrk)")
    p.add_argument("--overhead-duration", type=float, default=5.0)
    p.add_argument("--overhead-rounds", type=int, default=3)
    p.add_argument("--only-overhead", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    phases = 3 + (1 if args.weights_scenario else 0)
    lifetime_s = 2 * phases * (args.duration + DRAIN_TIMEOUT_S) + 120
    rows: list[Row] = []
    started = time.time()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fairshare-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        summary: dict[str, Any] = {}
        if args.overhead or args.only_overhead:
            with ExitStack() as inner:
                summary["overhead"] = overhead(args, tmp, inner)
        if args.only_overhead:
            print(json.dumps(summary, indent=2))
            return 0
        global TARGET
        if args.target == "triton":
            from loadtest.batching import solo_triton_worker
            TARGET = TRITON
            url, metrics = stack.enter_context(solo_triton_worker(
                tmp, args.base_ms, args.per_item_ms))
            worker = {"url": url, "metrics_url": metrics}
        else:
            url = stack.enter_context(sim_worker(args, lifetime_s))
            worker = {"url": url}
        before = sim_compute_per_exec_ms(url)
        gws = {order: start_gateway(stack, worker, order, tmp / order)
               for order in ("fifo", "fair")}
        summary["light_heavy"] = light_heavy(args, gws, rows)
        if args.weights_scenario:
            with ExitStack() as inner:
                wgws = {order: start_gateway(inner, worker, order, tmp / f"w-{order}",
                                             weights={"heavy": 3.0, "light": 1.0})
                        for order in ("fifo", "fair")}
                summary["weights"] = weights_scenario(args, wgws, rows)
        after = sim_compute_per_exec_ms(url)
        summary["sim_executions"] = after["executions"] - before["executions"]
    print(json.dumps(summary, indent=2, default=str))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python -m loadtest.fairshare", *argv]), "started_at": started,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows], "summary": summary}, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
