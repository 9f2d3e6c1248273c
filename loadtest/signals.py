"""Capacity signals against a known load, with the README's minimal config.

    python -m loadtest.signals [--seconds 12]

Three simulated workers of 4 instances × 50 ms (``python -m gateway sim``, its own process)
behind the gateway with nothing in its YAML but ``workers``: the capacity it computes with
comes from what it learned. Three phases, one run:

1. **capacity** — 48 closed-loop clients saturate the fleet: the throughput measured is the
   fleet's capacity (req/s).
2. **50 %** — open-loop Poisson arrivals at half that rate: ``/status`` utilisation, sampled
   every second over the phase's second half, should read 40–60 %.
3. **120 %** — open-loop at 1.2 × capacity: the reactive desired replicas should rise above
   the current count (3).

Prints a table and writes ``results/signals.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import SimProcess, _read_answer, request_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "signals.json"

WORKERS = 3
INSTANCES = 4
SERVICE_MS = 50.0
CLOSED_LOOP_CLIENTS = 48
ANSWER_TIMEOUT_S = 60.0


@dataclass
class Phase:
    phase: str
    offered_rate_per_s: float
    answered: int
    ok: int
    throughput_per_s: float
    utilisation_mean: float | None
    utilisation_samples: list[float]
    desired_reactive_max: int
    current_replicas: int
    headroom_mean: float | None


async def _one(port: int, payload: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        status, _, _ = await asyncio.wait_for(_read_answer(reader), ANSWER_TIMEOUT_S)
        return status
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        return 0
    finally:
        writer.close()


async def closed_loop(port: int, clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` keep-alive connections, one request at a time each."""
    payload = request_bytes(f"127.0.0.1:{port}")
    stop = time.perf_counter() + seconds
    answered = ok = 0

    async def client() -> None:
        nonlocal answered, ok
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                writer.write(payload)
                status, _, _ = await asyncio.wait_for(_read_answer(reader), ANSWER_TIMEOUT_S)
                answered += 1
                ok += status == 200
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return answered, ok, time.perf_counter() - t0


async def open_loop(port: int, rate_per_s: float, seconds: float, sample: Any,
                    rng: random.Random) -> tuple[int, int, float]:
    """Poisson arrivals at ``rate_per_s`` for ``seconds``, one connection per request;
    ``sample()`` is called once a second (in a thread)."""
    payload = request_bytes(f"127.0.0.1:{port}")
    tasks: list[asyncio.Task[int]] = []
    t0 = time.perf_counter()
    next_at = t0
    next_sample = t0 + 1.0
    while True:
        now = time.perf_counter()
        if now >= t0 + seconds:
            break
        if now >= next_sample:
            next_sample += 1.0
            tasks.append(asyncio.ensure_future(asyncio.to_thread(sample, now - t0)))
        if now >= next_at:
            tasks.append(asyncio.ensure_future(_one(port, payload)))
            next_at += rng.expovariate(rate_per_s)
            continue
        await asyncio.sleep(min(next_at, next_sample) - now)
    results = await asyncio.gather(*tasks)
    statuses = [r for r in results if isinstance(r, int)]
    elapsed = time.perf_counter() - t0
    return len(statuses), sum(s == 200 for s in statuses), elapsed


def run(seconds: float, workdir: Path) -> list[Phase]:
    rng = random.Random(7)
    phases: list[Phase] = []
    with SimProcess(WORKERS, slots=INSTANCES, base_ms=SERVICE_MS) as sim:
        cfg = {"workers": [{"url": u, "metrics_url": u + "/metrics"} for u in sim.urls],
               "log_level": "warning"}
        with GatewayProcess(cfg, workdir) as gw:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == WORKERS,
                        what="every worker ready")
            answered, ok, elapsed = asyncio.run(closed_loop(gw.port, CLOSED_LOOP_CLIENTS,
                                                            seconds / 2))
            capacity_rps = ok / elapsed
            phases.append(Phase("capacity (closed loop)", 0.0, answered, ok, capacity_rps,
                                None, [], 0, WORKERS, None))
            time.sleep(3.0)   # let the smoothed signals forget the saturation phase
            for name, share in (("50 % of capacity", 0.5), ("120 % of capacity", 1.2)):
                utils: list[float] = []
                heads: list[float] = []
                desired: list[int] = []

                def sample(at_s: float, utils: list[float] = utils,
                           heads: list[float] = heads, desired: list[int] = desired) -> None:
                    status = gw.status()
                    fleet = status["fleet"]
                    desired.append(int(fleet["desired_replicas"]["reactive"]))
                    if at_s >= seconds / 2:       # the second half: signals have settled
                        utils.append(float(fleet["utilisation"]))
                        heads.append(float(fleet["headroom"]))

                rate = share * capacity_rps
                answered, ok, elapsed = asyncio.run(open_loop(gw.port, rate, seconds, sample,
                                                              rng))
                phases.append(Phase(name, rate, answered, ok, ok / elapsed,
                                    statistics.fmean(utils) if utils else None, utils,
                                    max(desired, default=0), WORKERS,
                                    statistics.fmean(heads) if heads else None))
                time.sleep(3.0)
    return phases


def table(rows: list[Phase]) -> str:
    cols = ["phase", "offered req/s", "answered (200)", "throughput req/s",
            "/status utilisation", "headroom", "desired replicas (current)"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join([
            r.phase, f"{r.offered_rate_per_s:.0f}" if r.offered_rate_per_s else "-",
            f"{r.answered} ({r.ok})", f"{r.throughput_per_s:.0f}",
            "-" if r.utilisation_mean is None else f"{100 * r.utilisation_mean:.0f} %",
            "-" if r.headroom_mean is None else f"{r.headroom_mean:.2f}",
            f"{r.desired_reactive_max} ({r.current_replicas})" if r.utilisation_mean is not None
            else "-"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.signals", description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each phase")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="signals-") as tmp:
        rows = run(args.seconds, Path(tmp))
    print(table(rows))
    half, over = rows[1], rows[2]
    print(f"50 %: utilisation {100 * (half.utilisation_mean or 0):.0f} % (target 40–60 %); "
          f"120 %: desired replicas {over.desired_reactive_max} vs current "
          f"{over.current_replicas} (target: above)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python -m loadtest.signals",
        "fleet": {"workers": WORKERS, "instances_per_worker": INSTANCES,
                  "service_ms": SERVICE_MS},
        "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
