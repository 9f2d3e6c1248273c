"""Per-(worker, model) concurrency limits (gateway.core.concurrency): pure, time as an argument."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core import routing
from gateway.core.concurrency import (
    GROWTH,
    MAX_MODELS_PER_WORKER,
    ModelCapacity,
    ModelLimits,
    worker_bound,
)
from gateway.core.config import RoutingConfig
from gateway.core.types import ModelKey, NoRoute, Route, WorkerSnapshot
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess


def drive(limits: ModelLimits, *, true_parallel: int, service_s: float, seconds: float,
          worker: str = "w", model: str = "m") -> list[int]:
    """Saturating demand: the model always has ``limit`` requests in flight; one that
    starts with n in flight takes service × max(1, n / true_parallel). Returns the limit
    after every completion."""
    now = 0.0
    seen = []
    while now < seconds:
        n = limits.limit(worker, model)
        assert n is not None
        rtt = service_s * max(1.0, n / true_parallel)
        now += rtt / n                      # completions arrive n per rtt
        limits.on_sample(worker, model, now, rtt, n)
        seen.append(limits.limit(worker, model) or 0)
    return seen


def test_before_any_sample_the_limit_is_what_the_config_says() -> None:
    limits = ModelLimits()
    limits.learn("w", {"a": ModelCapacity(units=4, static=8), "b": ModelCapacity(1, 2)})
    assert limits.limit("w", "a") == 8
    assert limits.limits("w") == {"a": 8, "b": 2}
    assert limits.limit("w", "unknown") is None
    assert limits.limit("other", "a") is None


@pytest.mark.parametrize(("units", "static", "true_parallel", "low", "high"), [
    # the config is right: about the static limit (tolerance × C + √limit)
    (4, 8, 4, 6, 12),
    # the config says 1 instance, the model runs 8 at once: the limit grows, up to 2×
    (1, 2, 8, 3, GROWTH * 2),
    # the config says 8 instances, the GPU runs 2 at once: the unloaded latency is measured
    # at the units, so the limit is no better than the config's figure — and never lower
    (8, 16, 2, 8, 16),
])
def test_the_limit_adapts_to_what_the_model_really_runs(units: int, static: int,
                                                        true_parallel: int, low: int,
                                                        high: int) -> None:
    limits = ModelLimits()
    limits.learn("w", {"m": ModelCapacity(units=units, static=static)})
    seen = drive(limits, true_parallel=true_parallel, service_s=0.02, seconds=20.0)
    settled = seen[len(seen) // 2:]
    assert min(seen) >= units                   # never below the units: instances stay busy
    assert max(seen) <= GROWTH * static
    assert low <= sorted(settled)[len(settled) // 2] <= high


def test_static_mode_keeps_the_configs_figure() -> None:
    limits = ModelLimits(adaptive=False)
    limits.learn("w", {"m": ModelCapacity(units=1, static=2)})
    assert set(drive(limits, true_parallel=8, service_s=0.02, seconds=5.0)) == {2}


def test_the_worker_bound_follows_limits_that_grew_up_to_growth() -> None:
    limits = ModelLimits()
    limits.learn("w", {"m": ModelCapacity(units=1, static=2)})
    assert worker_bound(2, limits.limits("w")) == 2
    drive(limits, true_parallel=8, service_s=0.02, seconds=20.0)
    assert worker_bound(2, limits.limits("w")) == min(GROWTH * 2, limits.limit("w", "m") or 0)
    assert worker_bound(2, limits.limits("w")) > 2


def test_new_facts_start_over_and_forgotten_workers_leave_nothing() -> None:
    limits = ModelLimits()
    limits.learn("w", {"m": ModelCapacity(units=1, static=2)})
    drive(limits, true_parallel=8, service_s=0.02, seconds=20.0)
    assert (limits.limit("w", "m") or 0) > 2
    limits.learn("w", {"m": ModelCapacity(units=2, static=4)})
    assert limits.limit("w", "m") == 4
    limits.forget("w")
    assert limits.limit("w", "m") is None
    assert limits.statistics() == []


def test_models_per_worker_are_bounded() -> None:
    limits = ModelLimits()
    limits.learn("w", {f"m{i}": ModelCapacity(1, 2) for i in range(MAX_MODELS_PER_WORKER + 10)})
    assert len(limits.limits("w")) == MAX_MODELS_PER_WORKER
    for i in range(MAX_MODELS_PER_WORKER + 10):  # samples of models not kept are ignored
        limits.on_sample("w", f"m{i}", 1.0, 0.01, 1)
    assert len(limits.statistics()) == MAX_MODELS_PER_WORKER


def test_bad_samples_are_ignored() -> None:
    limits = ModelLimits()
    limits.learn("w", {"m": ModelCapacity(1, 2)})
    for rtt in (0.0, -1.0, float("nan")):
        limits.on_sample("w", "m", 1.0, rtt, 1)
    assert not any(s.adaptive for s in limits.statistics())


class Load:
    def __init__(self, per_model: dict[tuple[str, str], int]) -> None:
        self.per_model = per_model

    def in_flight(self, worker: str) -> int:
        return sum(n for (w, _), n in self.per_model.items() if w == worker)

    def in_flight_model(self, worker: str, model: str) -> int:
        return self.per_model.get((worker, model), 0)


def snap(wid: str, limits: dict[str, int]) -> WorkerSnapshot:
    return WorkerSnapshot(id=wid, pool_priority=0, ready=True,
                          models_ready=frozenset({"a", "b"}), slots=16, in_flight=0,
                          in_flight_model=0, signals=None, model_limits=limits)


@pytest.mark.parametrize(("a_in_flight", "b_in_flight", "model", "routed_to"), [
    (1, 0, "a", "w1"),       # below a's limit on w1
    (2, 0, "a", None),       # a at its limit: saturated, though w1 has 14 free slots
    (2, 0, "b", "w1"),       # b has no limit there: the same worker takes it
    (2, 3, "b", "w1"),
])
def test_the_router_holds_a_model_at_its_limit_on_a_worker(a_in_flight: int, b_in_flight: int,
                                                           model: str,
                                                           routed_to: str | None) -> None:
    table = routing.RoutingTable([snap("w1", {"a": 2})])
    load = Load({("w1", "a"): a_in_flight, ("w1", "b"): b_in_flight})
    decision = routing.Router(RoutingConfig(), rng=random.Random(1)).decide(
        table, ModelKey(model), load)
    if routed_to is None:
        assert isinstance(decision, NoRoute) and decision.saturated
    else:
        assert isinstance(decision, Route) and decision.worker == routed_to


def test_a_model_at_its_limit_on_one_worker_goes_to_another() -> None:
    table = routing.RoutingTable([snap("w1", {"a": 2}), snap("w2", {"a": 2})])
    load = Load({("w1", "a"): 2, ("w2", "a"): 1})
    router = routing.Router(RoutingConfig(), rng=random.Random(1))
    for _ in range(20):
        decision = router.decide(table, ModelKey("a"), load)
        assert isinstance(decision, Route) and decision.worker == "w2"


# ---------------------------------------------------------------- end to end, simulator

BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [1.0] * 16}]}).encode()


async def flood_and_watch(gw: GatewayProcess, worker: str, seconds: float) -> dict[str, Any]:
    """40 clients flood model a; one client sends model b in turn; /status is watched."""
    stop = time.monotonic() + seconds
    a_codes: list[int] = []
    b_codes: list[int] = []
    a_lat: list[float] = []
    b_lat: list[float] = []
    peaks: list[tuple[int, int]] = []   # (a in flight, a's limit) as /status showed them
    async with httpx.AsyncClient(base_url=gw.url, timeout=30,
                                 limits=httpx.Limits(max_connections=64)) as client:
        async def flood() -> None:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = await client.post("/v2/models/a/infer", content=BODY)
                a_codes.append(r.status_code)
                a_lat.append(time.monotonic() - t0)

        async def light() -> None:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = await client.post("/v2/models/b/infer", content=BODY)
                b_codes.append(r.status_code)
                b_lat.append(time.monotonic() - t0)

        async def watch() -> None:
            while time.monotonic() < stop:
                doc = (await client.get("/status.json")).json()
                for w in doc["workers"]:
                    entry = w.get("model_limits", {}).get("a")
                    if w["id"] == worker and entry is not None:
                        peaks.append((entry["in_flight"], entry["limit"]))
                await asyncio.sleep(0.05)

        await asyncio.gather(*(flood() for _ in range(40)), light(), watch())
    return {"a": a_codes, "b": b_codes, "peaks": peaks, "a_lat": a_lat, "b_lat": b_lat}


def run_flood(tmp_path: Path, mode: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """One simulated worker serving two models (4 instances each, as its configs say)."""
    models = (SimModel(name="a", base_ms=20.0), SimModel(name="b", base_ms=20.0))
    with SimFleetThread([WorkerSpec(slots=4, models=models)]) as sim:
        wid = f"127.0.0.1:{sim.ports[0]}"
        cfg: dict[str, Any] = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"}],
                               "health": {"interval_s": 0.2, "rise": 1}}
        if mode != "adaptive":
            cfg["upstream"] = {"model_limits": mode}
        with GatewayProcess(cfg, tmp_path) as gw:
            gw.wait_for(lambda: set(gw.worker_status(wid)["model_limits"]) == {"a", "b"},
                        what="per-model limits learned")
            learned = gw.worker_status(wid)
            # 4 execute + 4 wait per model; the worker's bound is the sum
            assert learned["slots"] == 16
            assert {m: (v["units"], v["static"], v["limit"])
                    for m, v in learned["model_limits"].items()} == {"a": (4, 8, 8),
                                                                    "b": (4, 8, 8)}
            got = asyncio.run(flood_and_watch(gw, wid, 3.0))
            assert set(got["a"]) == {200} and set(got["b"]) == {200}
            # b kept being served, and not behind a's waiters: its typical answer came in
            # well under a's (whose requests wait for a's limit). A ratio, so a loaded
            # machine slowing every answer does not decide it.
            a_typical, b_typical = statistics.median(got["a_lat"]), statistics.median(got["b_lat"])
            assert len(got["b"]) >= 5
            assert b_typical < a_typical / 2, (a_typical, b_typical)
            assert got["peaks"], "no /status sample during the flood"
            assert max(n for n, _ in got["peaks"]) >= 4    # the flood did reach a's limit
            after = gw.worker_status(wid)["model_limits"]["a"]
            metrics = httpx.get(gw.url + "/metrics", timeout=10).text
            assert f'gateway_model_concurrency_limit{{model="a",worker="{wid}"}}' in metrics
            return got, after, wid


def test_a_flooded_model_is_held_at_its_static_limit_while_another_model_runs(
        tmp_path: Path) -> None:
    """``model_limits: static``: model a never has more than its 8 in flight on the worker,
    though the worker takes 16, so model b — below its own limit — is sent at once instead
    of queueing behind a's waiters."""
    got, after, _ = run_flood(tmp_path, "static")
    assert max(n for n, _ in got["peaks"]) <= 8
    assert {limit for _, limit in got["peaks"]} == {8}
    assert not after["adaptive"]


def test_the_default_adapts_each_models_limit_within_its_bounds(tmp_path: Path) -> None:
    """The default (adaptive): a's limit follows the flood's latency, staying between its
    units (4) and twice its static figure (16), and so does a's in-flight count; the
    unloaded latency was measured (the simulator's 20 ms, plus the machine's noise)."""
    got, after, _ = run_flood(tmp_path, "adaptive")
    assert all(n <= GROWTH * 8 for n, _ in got["peaks"])
    assert all(4 <= limit <= GROWTH * 8 for _, limit in got["peaks"])
    assert after["adaptive"]                                  # the limiter ran ...
    assert 15.0 <= after["min_latency_ms"] <= 150.0           # ... and measured the model


def test_model_limits_off_leaves_only_the_workers_total(tmp_path: Path) -> None:
    models = (SimModel(name="a", base_ms=20.0),)
    with SimFleetThread([WorkerSpec(slots=4, models=models)]) as sim:
        wid = f"127.0.0.1:{sim.ports[0]}"
        cfg = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"}],
               "health": {"interval_s": 0.2, "rise": 1},
               "upstream": {"model_limits": "off"}}
        with GatewayProcess(cfg, tmp_path) as gw:
            gw.wait_for(lambda: gw.worker_status(wid)["slots"] == 8, what="slots learned")
            assert gw.worker_status(wid)["model_limits"] == {}
            metrics = httpx.get(gw.url + "/metrics", timeout=10).text
            assert "gateway_model_concurrency_limit{" not in metrics
