"""gRPC benchmark: ``tritonclient.grpc`` through the gateway vs straight to a worker, with the
gateway's HTTP throughput in the same run.

    python -m loadtest.grpc [--duration 5] [--concurrency 16] [--out results/grpc.json]

Three equal real Triton workers (PyTriton, CPU, ``add_sub`` with no added service time)
and one gateway subprocess with its gRPC listener on. Side by side, closed loop,
``--concurrency`` requests in flight from **one** client (one gRPC channel, one HTTP
connection pool), each phase ``--duration`` seconds:

* gRPC direct to worker 0, and through the gateway: req/s, p50, p99, the p99 the gateway
  adds;
* per-worker share of the gateway's gRPC requests (from each worker's own statistics): one
  channel, balanced per request — a connection-level balancer would give one worker 100 %;
* HTTP through the gateway and direct, for the gRPC/HTTP throughput ratio.

Prints a table and writes JSON. The client runs in this process (Python), so absolute rates
are bounded by it too; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import yaml

from gateway.tools.gatewayproc import GatewayProcess, free_port
from gateway.tools.local import TritonFleet

MODEL = "add_sub"
WIDTH = 16
WORKERS = 3


@dataclass
class Row:
    name: str
    requests: int
    errors: int
    rate_per_s: float
    p50_ms: float
    p99_ms: float


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
        for _ in range(20):  # warm-up: connection, routing table
            await client.infer(MODEL, inputs)
        return await closed_loop(name, lambda: client.infer(MODEL, inputs), concurrency,
                                 duration_s)


async def http_phase(name: str, target: str, concurrency: int, duration_s: float) -> Row:
    inputs = http_inputs()
    async with httpaio.InferenceServerClient(target, conn_limit=concurrency) as client:
        for _ in range(20):
            await client.infer(MODEL, inputs)
        return await closed_loop(name, lambda: client.infer(MODEL, inputs), concurrency,
                                 duration_s)


def run(duration_s: float, concurrency: int) -> dict[str, Any]:
    with TritonFleet(WORKERS, service_times_ms=[0.0] * WORKERS, per_item_ms=0.0) as fleet, \
            tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        config = {
            "workers": [{"url": w.http_url, "metrics_url": w.metrics_url,
                         "grpc_url": f"127.0.0.1:{w.ports.grpc}"} for w in fleet.workers],
            "models": {MODEL: {}},
            "health": {"interval_s": 0.5, "rise": 1, "fall": 2},
            "log_level": "warning",
        }
        gw = _GrpcGateway(config, Path(tmp))
        gw.start()
        try:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == WORKERS,
                        what="workers ready")
            w0 = fleet.workers[0]
            rows = [asyncio.run(grpc_phase("grpc direct (1 worker)",
                                           f"127.0.0.1:{w0.ports.grpc}", concurrency,
                                           duration_s))]
            before = worker_counts(fleet)
            rows.append(asyncio.run(grpc_phase("grpc gateway (3 workers, 1 channel)",
                                               f"127.0.0.1:{gw.grpc_port}", concurrency,
                                               duration_s)))
            after = worker_counts(fleet)
            rows.append(asyncio.run(http_phase("http direct (1 worker)", w0.client_url,
                                               concurrency, duration_s)))
            rows.append(asyncio.run(http_phase("http gateway (3 workers)", gw.hostport,
                                               concurrency, duration_s)))
        finally:
            gw.stop()
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta) or 1
    shares = [d / total for d in delta]
    grpc_gw, grpc_direct = rows[1], rows[0]
    http_gw = rows[3]
    return {
        "rows": [asdict(r) for r in rows],
        "worker_shares": shares,
        "max_share_deviation": max(abs(s - 1 / WORKERS) * WORKERS for s in shares),
        "grpc_added_p99_ms": grpc_gw.p99_ms - grpc_direct.p99_ms,
        "grpc_over_http_gateway_throughput": grpc_gw.rate_per_s / max(http_gw.rate_per_s, 1e-9),
        "duration_s": duration_s,
        "concurrency": concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="results/grpc.json")
    args = ap.parse_args(argv)
    result = run(args.duration, args.concurrency)
    print(f"{'path':38} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in result["rows"]:
        print(f"{r['name']:38} {r['rate_per_s']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['errors']:7d}")
    shares = ", ".join(f"{s:.1%}" for s in result["worker_shares"])
    print(f"per-worker share of gateway gRPC requests: {shares} "
          f"(max deviation from equal {result['max_share_deviation']:.1%})")
    print(f"gRPC p99 added by the gateway: {result['grpc_added_p99_ms']:.2f} ms; gateway "
          f"gRPC/HTTP throughput: {result['grpc_over_http_gateway_throughput']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
