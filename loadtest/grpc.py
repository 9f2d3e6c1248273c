"""gRPC benchmark: ``tritonclient.grpc`` through the gateway, through HAProxy in HTTP/2 mode
and straight to a worker, with the gateway's HTTP throughput, all in one run.

    python -m loadtest.grpc [--duration 4] [--concurrency 16] [--out results/grpc.json]

Three equal real Triton workers (PyTriton, CPU, ``add_sub`` with no added service time).
Side by side, closed loop, ``--concurrency`` requests in flight from **one** client (one gRPC
channel, one HTTP connection pool), each phase ``--duration`` seconds:

* gRPC direct to worker 0 — the baseline of "added p99";
* gRPC through the gateway (default config: load-aware routing), through HAProxy (h2c on
  both sides, ``balance leastconn`` — HAProxy's per-request counterpart of the gateway's
  least-loaded choice) and through a second gateway with ``routing.policy: round_robin``:
  req/s, p50, p99, the p99 each adds, and the per-worker share of the phase's requests
  (from each worker's own statistics): one channel, balanced per request — a
  connection-level balancer would give one worker 100 %;
* HTTP through the gateway and direct, for the gateway's gRPC/HTTP throughput ratio.

Prints a table and writes JSON. The client runs in this process (Python), so absolute rates
are bounded by it too; compare the rows of one run. Load-aware routing sends each worker what
it completes (a closed loop keeps about the same number in flight on each): on a box where
the workers share the CPU with the client and the proxies, "equal" workers are not equally
fast from second to second and load-aware shares follow that; round robin shows what the
channel itself does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import yaml

from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess, free_port
from gateway.tools.local import TritonFleet
from loadtest.haproxy import find_haproxy, haproxy_config

MODEL = "add_sub"
WIDTH = 16
WORKERS = 3
WARMUP_REQUESTS = 20
# HAProxy lives in /usr/sbin, which a non-root PATH often lacks


@dataclass
class Row:
    name: str
    requests: int
    errors: int
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    added_p99_ms: float | None = None
    worker_shares: list[float] = field(default_factory=list)


class _GrpcGateway(GatewayProcess):
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        super().__init__(config, workdir)
        self.grpc_port = free_port()

    def write_config(self, config: dict[str, Any] | None = None, raw: str | None = None) -> None:
        if config is not None:
            self.config = dict(config)
        self.config["listen"] = {"host": "127.0.0.1", "port": self.port,
                                 "grpc_port": self.grpc_port}
        self.config_path.write_text(raw if raw is not None else yaml.safe_dump(self.config))


@contextlib.contextmanager
def haproxy_h2(tmp: Path, upstreams: list[int]) -> Iterator[int | None]:
    """Run HAProxy (h2c) in front of ``upstreams``; yields its port, or None when HAProxy is
    not installed."""
    binary = find_haproxy()
    if binary is None:
        yield None
        return
    port = free_port()
    conf = tmp / "haproxy-h2.cfg"
    conf.write_text(haproxy_config(port, upstreams, h2=True))
    proc = procs.start([binary, "-f", str(conf)], log_path=tmp / "haproxy.log")
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
                    if c.is_server_ready():
                        break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("HAProxy (h2) did not start: "
                                       + (tmp / "haproxy.log").read_text()[-2000:]) from None
            time.sleep(0.2)
        yield port
    finally:
        procs.stop(proc)


async def closed_loop(name: str, send: Callable[[], Awaitable[object]], concurrency: int,
                      duration_s: float) -> Row:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration_s

    async def loop() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                await send()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    ms = np.array(latencies or [0.0]) * 1000
    return Row(name, len(latencies), errors, len(latencies) / elapsed,
               float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def grpc_inputs() -> list[grpcclient.InferInput]:
    data = np.ones((1, WIDTH), dtype=np.float32)
    out = []
    for name in ("INPUT0", "INPUT1"):
        i = grpcclient.InferInput(name, [1, WIDTH], "FP32")
        i.set_data_from_numpy(data)
        out.append(i)
    return out


def http_inputs() -> list[httpclient.InferInput]:
    data = np.ones((1, WIDTH), dtype=np.float32)
    out = []
    for name in ("INPUT0", "INPUT1"):
        i = httpclient.InferInput(name, [1, WIDTH], "FP32")
        i.set_data_from_numpy(data)
        out.append(i)
    return out


def worker_counts(fleet: TritonFleet) -> list[int]:
    counts = []
    for w in fleet.workers:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{w.ports.grpc}") as c:
            counts.append(sum(int(s.inference_count)
                              for s in c.get_inference_statistics(MODEL).model_stats))
    return counts


async def grpc_phase(name: str, target: str, concurrency: int, duration_s: float) -> Row:
    inputs = grpc_inputs()
    async with grpcaio.InferenceServerClient(target) as client:
        for _ in range(WARMUP_REQUESTS):  # connection, routing table
            await client.infer(MODEL, inputs)
        return await closed_loop(name, lambda: client.infer(MODEL, inputs), concurrency,
                                 duration_s)


async def http_phase(name: str, target: str, concurrency: int, duration_s: float) -> Row:
    inputs = http_inputs()
    async with httpaio.InferenceServerClient(target, conn_limit=concurrency) as client:
        for _ in range(WARMUP_REQUESTS):
            await client.infer(MODEL, inputs)
        return await closed_loop(name, lambda: client.infer(MODEL, inputs), concurrency,
                                 duration_s)


def warm_up(fleet: TritonFleet) -> None:
    """A few requests straight to every worker: a worker's first answers (its model's first
    run) are slow, and a proxy that learns service times would hold that against it."""
    for w in fleet.workers:
        with grpcclient.InferenceServerClient(f"127.0.0.1:{w.ports.grpc}") as c:
            for _ in range(WARMUP_REQUESTS):
                c.infer(MODEL, grpc_inputs())


def measured(fleet: TritonFleet, phase: Callable[[], Coroutine[Any, Any, Row]]) -> Row:
    """Run ``phase`` and fill in each worker's share of the requests it made."""
    before = worker_counts(fleet)
    row = asyncio.run(phase())
    delta = [a - b for a, b in zip(worker_counts(fleet), before, strict=True)]
    total = sum(delta) or 1
    row.worker_shares = [d / total for d in delta]
    return row


def max_share_deviation(shares: list[float]) -> float:
    """The largest deviation of a worker's share from an equal share, relative to it
    (0.10 = every worker within ±10 % of 1/N)."""
    return max(abs(s * len(shares) - 1.0) for s in shares) if shares else 0.0


def gateway_config(fleet: TritonFleet, **extra: Any) -> dict[str, Any]:
    return {
        "workers": [{"url": w.http_url, "metrics_url": w.metrics_url,
                     "grpc_url": f"127.0.0.1:{w.ports.grpc}"} for w in fleet.workers],
        "models": {MODEL: {}},
        "health": {"interval_s": 0.5, "rise": 1, "fall": 2},
        "log_level": "warning",
        **extra,
    }


@contextlib.contextmanager
def gateway(config: dict[str, Any], tmp: Path) -> Iterator[_GrpcGateway]:
    workdir = Path(tempfile.mkdtemp(dir=tmp))
    gw = _GrpcGateway(config, workdir)
    gw.start()
    try:
        gw.wait_workers_ready(WORKERS)
        # A worker that became ready late at start-up is in slow start: measure the
        # routing, not the ramp.
        gw.wait_for(lambda: all(w["traffic_share"] == 1.0 for w in gw.status()["workers"]),
                    timeout_s=30, what="every worker at its full traffic share")
        yield gw
    finally:
        gw.stop()


def run(duration_s: float, concurrency: int) -> dict[str, Any]:
    c, d = concurrency, duration_s
    with TritonFleet(WORKERS, service_times_ms=[0.0] * WORKERS, per_item_ms=0.0) as fleet, \
            tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        w0 = fleet.workers[0]
        warm_up(fleet)
        rows: dict[str, Row] = {}
        with gateway(gateway_config(fleet), tmp) as gw:
            rows["grpc_direct"] = measured(fleet, lambda: grpc_phase(
                "gRPC direct (1 worker)", f"127.0.0.1:{w0.ports.grpc}", c, d))
            rows["grpc_gateway"] = measured(fleet, lambda: grpc_phase(
                "gRPC gateway (load-aware)", f"127.0.0.1:{gw.grpc_port}", c, d))
            with haproxy_h2(tmp, [w.ports.grpc for w in fleet.workers]) as hp:
                if hp is not None:
                    rows["grpc_haproxy"] = measured(fleet, lambda: grpc_phase(
                        "gRPC HAProxy h2 (leastconn)", f"127.0.0.1:{hp}", c, d))
            rows["http_direct"] = measured(fleet, lambda: http_phase(
                "HTTP direct (1 worker)", w0.client_url, c, d))
            rows["http_gateway"] = measured(fleet, lambda: http_phase(
                "HTTP gateway (load-aware)", gw.hostport, c, d))
        rr = gateway_config(fleet, routing={"policy": "round_robin"})
        with gateway(rr, tmp) as gw_rr:
            rows["grpc_gateway_round_robin"] = measured(fleet, lambda: grpc_phase(
                "gRPC gateway (round_robin)", f"127.0.0.1:{gw_rr.grpc_port}", c, d))
    direct = {"grpc": rows["grpc_direct"], "http": rows["http_direct"]}
    for key, row in rows.items():
        if not key.endswith("_direct"):
            row.added_p99_ms = row.p99_ms - direct[key.split("_")[0]].p99_ms
    result: dict[str, Any] = {
        "rows": {k: asdict(r) for k, r in rows.items()},
        "max_share_deviation": {k: max_share_deviation(r.worker_shares)
                                for k, r in rows.items() if not k.endswith("_direct")},
        "grpc_over_http_gateway_throughput":
            rows["grpc_gateway"].rate_per_s / max(rows["http_gateway"].rate_per_s, 1e-9),
        "haproxy": "grpc_haproxy" in rows,
        "duration_s": duration_s,
        "concurrency": concurrency,
    }
    if "grpc_haproxy" in rows:
        result["grpc_gateway_over_haproxy_throughput"] = (
            rows["grpc_gateway"].rate_per_s / max(rows["grpc_haproxy"].rate_per_s, 1e-9))
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"{'path':30} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'+p99 ms':>8} "
             f"{'errors':>6}  per-worker share (max deviation)"]
    for key, r in result["rows"].items():
        added = "" if r["added_p99_ms"] is None else f"{r['added_p99_ms']:8.2f}"
        shares = " / ".join(f"{s:.1%}" for s in r["worker_shares"])
        dev = result["max_share_deviation"].get(key)
        spread = f"{shares} (±{dev:.0%})" if dev is not None else shares
        lines.append(f"{r['name']:30} {r['rate_per_s']:7.0f} {r['p50_ms']:7.2f} "
                     f"{r['p99_ms']:7.2f} {added:>8} {r['errors']:6d}  {spread}")
    lines.append(f"gateway gRPC / gateway HTTP throughput: "
                 f"{result['grpc_over_http_gateway_throughput']:.2f} (target ≥ 0.5)")
    if "grpc_gateway_over_haproxy_throughput" in result:
        lines.append(f"gateway gRPC / HAProxy h2 throughput: "
                     f"{result['grpc_gateway_over_haproxy_throughput']:.2f}")
    else:
        lines.append("HAProxy not installed: its row is missing")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per phase")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="results/grpc.json")
    args = ap.parse_args(argv)
    result = run(args.duration, args.concurrency)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
