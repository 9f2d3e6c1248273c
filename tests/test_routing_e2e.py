"""Load-aware routing through the real gateway (a subprocess) in front of the simulator.

Each test starts its own simulated fleet (``SimFleetThread``) and gateway, drives a bounded
amount of traffic, and judges the routing by the simulator's per-worker statistics: the
herd (1,000 requests inside one scrape interval), stale and missing metrics, a CPU-only
worker, pool spill-over and return, the free-memory filter — which estimates the free
memory *now* from the last scrape and the requests sent since (a table of that rule first) —
and the expected-latency scorer keeping traffic off a slow worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any

import pytest

from gateway.core import routing
from gateway.core.config import ModelConfig, RoutingConfig
from gateway.core.routing import drop_reason
from gateway.core.types import (
    GpuSignal,
    ModelKey,
    ModelSignal,
    Route,
    WorkerSignals,
    WorkerSnapshot,
)
from gateway.fleet.upstream import Pool, PoolLimits
from gateway.sim.core import GIB, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import SimProcess

pytestmark = pytest.mark.timeout(60)

INFER = "/v2/models/simple/infer"
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [1.0] * 16}]}).encode()
HEADERS = [(b"content-type", b"application/json")]
STALE_AFTER_S = 3.0  # scrapes every 0.3 s: fresh signals stay fresh on a busy machine


def successes(sim: SimFleetThread) -> list[int]:
    return [w.core.success for w in sim.statistics().workers]


def served_since(sim: SimFleetThread, before: list[int]) -> list[int]:
    return [a - b for a, b in zip(successes(sim), before, strict=True)]


async def _send(port: int, n: int, concurrency: int) -> list[int]:
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=concurrency,
                                              read_timeout_s=30.0))
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            resp = await pool.request("POST", INFER, HEADERS, BODY)
            await resp.read()
            statuses.append(resp.status)

    try:
        await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await pool.aclose()
    return statuses


def send(gw: GatewayProcess, n: int, concurrency: int = 1) -> list[int]:
    """``n`` infer requests through the gateway, at most ``concurrency`` at once."""
    return asyncio.run(_send(gw.port, n, concurrency))


def config(sim: SimFleetThread | SimProcess, **extra: Any) -> dict[str, Any]:
    workers = [{"url": f"http://127.0.0.1:{p}", "metrics_url": f"http://127.0.0.1:{p}/metrics"}
               for p in sim.ports]
    cfg: dict[str, Any] = {
        "log_level": "warning",
        "workers": workers,
        "models": {"simple": {}},
        "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
        "scrape": {"interval_s": 0.3, "timeout_s": 1.0, "stale_after_s": STALE_AFTER_S},
        "admission": {"breaker": {"slow_start_s": 0}},
    }
    cfg.update(extra)
    return cfg


def start(cfg: dict[str, Any], tmp_path: Path, *, with_signals: bool = True) -> GatewayProcess:
    gw = GatewayProcess(cfg, tmp_path).start()
    n = len(cfg["workers"])
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == n, what="workers ready")
    if with_signals:
        gw.wait_for(lambda: all(w["signals_age_s"] is not None for w in gw.status()["workers"]),
                    what="a scrape of every worker")
    return gw


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[list[Any]]:
    """Things to stop at teardown, last started first."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for thing in reversed(started):
            thing.stop()


def test_herd_spreads_requests_decided_within_one_scrape_interval(
        tmp_path: Path, stack: list[Any]) -> None:
    n_workers, n_requests = 8, 1000
    # The workers in a process of their own: in this one they would share the interpreter
    # with the herd's 1,000 clients, and the latency the router rightly avoids would be
    # the test's own.
    sim = SimProcess(n_workers, slots=8, base_ms=20.0)
    stack.append(sim.start())
    # Slots high enough that the slot limit cannot hide a herd: only the live in-flight
    # counts stand between 1,000 simultaneous decisions and the worker that looked best.
    # One scrape in 5 s: the whole burst (well under a second) sees the same signals.
    cfg = config(sim, scrape={"interval_s": 5.0, "timeout_s": 1.0, "stale_after_s": 30.0})
    cfg["workers"] = [dict(w, slots=n_requests) for w in cfg["workers"]]
    gw = start(cfg, tmp_path)
    stack.append(gw)
    before = [w["core"]["success"] for w in sim.stats()]
    statuses = send(gw, n_requests, concurrency=n_requests)
    assert statuses.count(200) == n_requests
    served = [w["core"]["success"] - b for w, b in zip(sim.stats(), before, strict=True)]
    fair = n_requests / n_workers
    assert sum(served) == n_requests
    assert max(served) <= 2.5 * fair, served
    assert min(served) >= fair / 4, served


def test_stale_and_missing_metrics_still_route_and_say_so(tmp_path: Path,
                                                          stack: list[Any]) -> None:
    sim = SimFleetThread([WorkerSpec(slots=4, base_ms=2.0)] * 3)
    stack.append(sim.start())
    gw = start(config(sim), tmp_path)
    stack.append(gw)
    ids = [w["id"] for w in gw.status()["workers"]]
    sim.set_fault(1, metrics="hang")
    sim.set_fault(2, metrics="error")

    def stale() -> bool:
        ws = {w["id"]: w for w in gw.status()["workers"]}
        return all(ws[i]["gpu_free_bytes"] is None and ws[i]["signals_age_s"] > STALE_AFTER_S
                   for i in ids[1:])

    gw.wait_for(stale, timeout_s=15, what="workers 1 and 2 with stale signals")
    fresh = gw.worker_status(ids[0])
    assert fresh["gpu_free_bytes"] is not None and fresh["signals_age_s"] < STALE_AFTER_S
    before = successes(sim)
    assert send(gw, 90, concurrency=3) == [200] * 90
    served = served_since(sim, before)
    assert all(s > 0 for s in served), (served, gw.status()["workers"], gw.log())
    age = gw.worker_status(ids[1])["signals_age_s"]
    assert age is not None and age > STALE_AFTER_S  # still growing: scrapes keep failing
    assert gw.proc is not None and gw.proc.poll() is None


def test_cpu_only_worker_is_routed_to_and_memory_filter_drops_small_gpu(
        tmp_path: Path, stack: list[Any]) -> None:
    big = WorkerSpec(slots=4, base_ms=5.0)
    small = WorkerSpec(slots=4, base_ms=5.0, memory_total_bytes=4 * GIB,
                       memory_base_used_bytes=int(3.5 * GIB))     # 0.5 GiB free
    cpu = WorkerSpec(slots=4, base_ms=5.0, has_gpu=False)
    sim = SimFleetThread([big, small, cpu])
    stack.append(sim.start())
    cfg = config(sim, models={"simple": {"memory_bytes_per_request": GIB}})
    gw = start(cfg, tmp_path)
    stack.append(gw)
    ws = gw.status()["workers"]
    assert ws[1]["gpu_free_bytes"] < GIB
    assert ws[2]["gpu_free_bytes"] is None and ws[2]["signals_age_s"] is not None
    before = successes(sim)
    assert send(gw, 120, concurrency=4) == [200] * 120
    served = served_since(sim, before)
    assert served[1] == 0, served          # too little free GPU memory: filtered out
    assert served[2] > 0, served           # CPU-only: the memory scorer is neutral
    assert served[0] > 0, served


def test_pools_spill_when_preferred_is_saturated_and_return(tmp_path: Path,
                                                            stack: list[Any]) -> None:
    sim = SimFleetThread([WorkerSpec(slots=2, base_ms=60.0, per_item_ms=0.0)] * 2
                         + [WorkerSpec(slots=8, base_ms=5.0)] * 2)
    stack.append(sim.start())
    cfg = config(sim, pools=[{"name": "onprem", "priority": 0},
                             {"name": "burst", "priority": 1}])
    for i, w in enumerate(cfg["workers"]):   # on-premises: 2 slow workers, 2 slots each
        w.update({"pool": "onprem", "slots": 2} if i < 2 else {"pool": "burst"})
    gw = start(cfg, tmp_path)
    stack.append(gw)

    before = successes(sim)
    assert send(gw, 10) == [200] * 10                 # light: one at a time
    light = served_since(sim, before)
    assert light[2] == light[3] == 0 and sum(light) == 10, light

    before = successes(sim)
    assert send(gw, 120, concurrency=12) == [200] * 120   # 12 at once > 4 on-prem slots
    heavy = served_since(sim, before)
    assert heavy[2] + heavy[3] > 0 and heavy[0] + heavy[1] > 0, heavy

    before = successes(sim)
    assert send(gw, 10) == [200] * 10                 # load gone: back on-premises
    after = served_since(sim, before)
    assert after[2] == after[3] == 0, after


@pytest.mark.parametrize(("in_flight_then", "pending", "in_flight_now", "fits"), [
    (None, 0.0, 9, True),    # not recorded: the scraped free bytes alone (2 GiB)
    (0, 0.0, 0, True),       # idle then and now: 2 GiB free
    (0, 0.0, 1, True),       # one sent since: 1 GiB left
    (0, 0.0, 2, False),      # two sent since: nothing left
    (2, 0.0, 2, True),       # two executing then and now: still the scraped 2 GiB
    (2, 0.0, 0, True),       # both finished since: 4 GiB back
    (3, 1.0, 4, False),      # one queued then (held no memory); two more sent since
    (3, 0.0, 3, True),       # 4 GiB seen idle (these two rows): 3 in flight leave 1 GiB
    (3, 0.0, 4, False),      # the scrape alone says 1 GiB left, idle says 0: "3 executing"
                             # then counted a response still in transit
])
def test_drop_reason_estimates_free_memory_now(in_flight_then: int | None, pending: float,
                                               in_flight_now: int, fits: bool) -> None:
    idle = 4 * GIB if (in_flight_then, pending) == (3, 0.0) else None
    signals = WorkerSignals(scraped_at=0.0, gpus=(GpuSignal("GPU-0", 8 * GIB, 6 * GIB, 0.5),),
                            models={"simple": ModelSignal(pending=pending)},
                            in_flight_at_scrape=in_flight_then, idle_free_bytes=idle)
    worker = WorkerSnapshot(id="w", pool_priority=0, ready=True,
                            models_ready=frozenset({"simple"}), slots=16,
                            in_flight=in_flight_now, in_flight_model=in_flight_now,
                            signals=signals)
    reason = drop_reason(worker, ModelKey("simple"), need_bytes=GIB)
    assert (reason is None) is fits, reason
    table_says = routing.route([worker], ModelKey("simple"), RoutingConfig(), rng=Random(0),
                               models={"simple": ModelConfig(memory_bytes_per_request=GIB)})
    assert isinstance(table_says, Route) is fits, table_says


def test_memory_filter_counts_requests_sent_since_the_scrape(tmp_path: Path,
                                                             stack: list[Any]) -> None:
    """A GPU with room for two requests at once gets at most two from the gateway, though
    every decision falls inside one scrape interval (the scraped free memory says four)."""
    per_request = GIB
    small = WorkerSpec(slots=4, base_ms=30.0, per_item_ms=0.0, memory_total_bytes=6 * GIB,
                       memory_base_used_bytes=4 * GIB, memory_per_item_bytes=per_request)
    big = WorkerSpec(slots=4, base_ms=30.0, per_item_ms=0.0, memory_per_item_bytes=per_request)
    sim = SimFleetThread([small, big, big])
    stack.append(sim.start())
    cfg = config(sim, models={"simple": {"memory_bytes_per_request": per_request}},
                 scrape={"interval_s": 10.0, "timeout_s": 1.0, "stale_after_s": 60.0})
    cfg["workers"] = [dict(w, slots=4) for w in cfg["workers"]]
    gw = start(cfg, tmp_path)
    stack.append(gw)
    before = successes(sim)
    statuses = send(gw, 150, concurrency=10)
    assert statuses == [200] * 150, sorted(set(statuses))
    stats = sim.statistics().workers
    assert stats[0].core.oom_total == 0
    assert served_since(sim, before)[0] > 0     # still used, two at a time


def test_expected_latency_keeps_traffic_off_a_slow_worker(tmp_path: Path,
                                                          stack: list[Any]) -> None:
    """Two 20 ms workers and one 80 ms worker (4 slots each), 10 clients in a closed loop:
    least-in-flight gives the slow worker about a seventh of the requests; the default
    scorer (minimal config: slots, capacity and service times learned) only probes it."""
    specs = [WorkerSpec(slots=4, base_ms=ms, per_item_ms=0.0) for ms in (20.0, 20.0, 80.0)]
    sim = SimFleetThread(specs)
    stack.append(sim.start())
    minimal = {"log_level": "warning", "workers": config(sim)["workers"],
               "health": {"interval_s": 0.3, "rise": 1}}
    shares = {}
    for name, extra in (("default", {}), ("least_inflight",
                                          {"routing": {"policy": "least_inflight"}})):
        gw = start({**minimal, **extra}, tmp_path, with_signals=False)
        gw.wait_for(lambda g=gw: all(w["slots"] == 8 for w in g.status()["workers"]),  # type: ignore[misc]
                    what="slots learned from the model configs")
        send(gw, 100, concurrency=10)                       # warm-up: service times measured
        before = successes(sim)
        statuses = send(gw, 500, concurrency=10)
        served = served_since(sim, before)
        gw.stop()
        assert statuses.count(200) == 500
        shares[name] = served[2] / sum(served)
    assert shares["least_inflight"] > 0.08, shares
    assert shares["default"] < 0.4 * shares["least_inflight"], shares
