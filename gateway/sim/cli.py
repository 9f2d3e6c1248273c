"""``gateway sim``: the Triton simulator on the command line.

``python -m gateway sim --workers N --base-port P`` serves N simulated workers on ports
P … P+N-1 (``--base-port 0``: free ports); it prints one line for people, then
``{"ports": [...]}`` for programs, and runs until SIGINT/SIGTERM or ``--duration-s``.
What each port serves and how to steer it at run time: :mod:`gateway.sim.server`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from typing import cast

from gateway.sim.core import (
    GIB,
    MIB,
    SERVICE_DISTS,
    Faults,
    ModelOp,
    SimModel,
    TensorSpec,
    WorkerSpec,
)
from gateway.sim.server import SimFleet, new_loop


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parse_model(text: str) -> SimModel:
    """``NAME[:DATATYPE[:DIMS[:OP[:MAX_BATCH]]]]``, DIMS like ``16`` or ``3x224x224``."""
    parts = text.split(":")
    name = parts[0]
    datatype = parts[1].upper() if len(parts) > 1 and parts[1] else "FP32"
    dims = tuple(int(d) for d in parts[2].split("x")) if len(parts) > 2 and parts[2] else (16,)
    op = parts[3] if len(parts) > 3 and parts[3] else ("double" if datatype != "BYTES"
                                                     else "identity")
    if op not in ("double", "identity"):
        raise argparse.ArgumentTypeError(f"model op must be double or identity, not {op!r}")
    max_batch = int(parts[4]) if len(parts) > 4 and parts[4] else 64
    return SimModel(name=name, inputs=(TensorSpec("INPUT0", datatype, dims),),
                    outputs=(TensorSpec("OUTPUT0", datatype, dims),), op=cast(ModelOp, op),
                    max_batch_size=max_batch)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway sim",
        description="Triton simulator: many simulated KServe v2 workers in one process.",
        epilog="Comma-separated lists are cycled over the workers (e.g. --speeds 1,2: "
               "workers 0,2,4… at speed 1, 1,3,5… at speed 2). Metrics are served at "
               "GET /metrics on each worker's own port; control with POST /sim/control.")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--base-port", type=int, default=8000, help="0: free ports")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--control-port", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", default="4", help="concurrent executions per worker (list)")
    p.add_argument("--speeds", default="1", help="speed factors (list)")
    p.add_argument("--memory-gib", default="16", help="GPU memory total, GiB (list)")
    p.add_argument("--base-used-gib", default="2", help="GPU memory always used, GiB (list)")
    p.add_argument("--memory-per-item-mib", type=float, default=16.0)
    p.add_argument("--base-ms", type=float, default=2.0)
    p.add_argument("--per-item-ms", type=float, default=0.05)
    p.add_argument("--service-dist", choices=SERVICE_DISTS, default="fixed",
                   help="fixed: every execution takes base + per-item × batch; exponential: "
                   "drawn per execution with that mean (seeded by --seed)")
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--cpu-only", action="store_true", help="no GPU: no nv_gpu_* series")
    p.add_argument("--model", action="append", type=_parse_model, default=None,
                   metavar="NAME[:DTYPE[:DIMS[:OP[:MAX_BATCH]]]]",
                   help="model to serve (repeatable); default simple:FP32:16:double:64")
    p.add_argument("--stateful", action="append", default=[], metavar="NAME",
                   help="a model whose config has sequence_batching (repeatable)")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--added-latency-ms", type=float, default=0.0)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--not-ready", action="store_true")
    p.add_argument("--metrics-fault", choices=("ok", "error", "hang"), default="ok")
    p.add_argument("--faulty", default=None, metavar="I,J,…",
                   help="indexes of the workers the fault options apply to (default: all)")
    p.add_argument("--duration-s", type=float, default=None, help="exit after this long")
    return p


def specs_from_args(args: argparse.Namespace) -> list[WorkerSpec]:
    slots, speeds = _floats(args.slots), _floats(args.speeds)
    memory, base_used = _floats(args.memory_gib), _floats(args.base_used_gib)
    faults = Faults(error_rate=args.error_rate, added_latency_ms=args.added_latency_ms,
                    hang=args.hang, ready=not args.not_ready, metrics=args.metrics_fault)
    models = tuple(args.model) if args.model else (SimModel(),)
    models = tuple(dataclasses.replace(m, sequence_batching=m.name in args.stateful)
                   for m in models)
    faulty = (set(range(args.workers)) if args.faulty is None
              else {int(i) for i in args.faulty.split(",") if i.strip()})
    return [WorkerSpec(
        slots=int(slots[i % len(slots)]), speed_factor=speeds[i % len(speeds)],
        base_ms=args.base_ms, per_item_ms=args.per_item_ms, has_gpu=not args.cpu_only,
        memory_total_bytes=int(memory[i % len(memory)] * GIB),
        memory_base_used_bytes=int(base_used[i % len(base_used)] * GIB),
        memory_per_item_bytes=int(args.memory_per_item_mib * MIB), max_queue=args.max_queue,
        models=models, faults=faults if i in faulty else Faults(),
        service_dist=args.service_dist)
        for i in range(args.workers)]


async def _serve(args: argparse.Namespace) -> None:
    fleet = SimFleet(specs_from_args(args), host=args.host, base_port=args.base_port,
                     control_port=args.control_port, seed=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await fleet.start()
    ports = fleet.ports
    control = f", control port {fleet.control_port}" if fleet.control_port else ""
    print(f"sim: {len(ports)} workers on {args.host} ports {ports[0]}..{ports[-1]} "
          f"(metrics: GET /metrics on the same port; control: POST /sim/control{control})",
          flush=True)
    print(json.dumps({"ports": ports}), flush=True)
    try:
        if args.duration_s is not None:
            try:
                await asyncio.wait_for(stop.wait(), args.duration_s)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        await fleet.stop()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("gateway sim: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(_serve(args))
    except OSError as exc:
        print(f"gateway sim: {exc}", file=sys.stderr)
        return 1
    return 0
