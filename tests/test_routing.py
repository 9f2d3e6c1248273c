"""Routing core: filter and scorer tables, pickers with a seeded RNG, pools, packing, slow
start, stickiness, the herd, the expected-latency scorer and its peak-EWMA service times (a
fake clock, and a small closed-loop event simulation), and a Hypothesis property over random
fleets."""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import routing
from gateway.core.config import ModelConfig, RoutingConfig, WeightsConfig
from gateway.core.routing import (
    DROP_BREAKER,
    DROP_MEMORY,
    DROP_NO_MODEL,
    DROP_NOT_READY,
    DROP_SATURATED,
    NEUTRAL_SCORE,
    InFlightCounters,
    Router,
    RoutingTable,
    ServiceTimes,
    drop_reason,
    expected_completion_s,
    expected_latency_score,
    is_saturated,
    latency_score,
    memory_score,
    normalised_weights,
    queue_score,
    required_memory_bytes,
    route,
)
from gateway.core.types import (
    GpuSignal,
    ModelKey,
    ModelSignal,
    NoRoute,
    Route,
    WorkerSignals,
    WorkerSnapshot,
)

GIB = 2**30
M = ModelKey("m")


def signals(free_gib: float = 40.0, total_gib: float = 80.0, pending: float = 0.0,
            gpu: bool = True) -> WorkerSignals:
    gpus = (GpuSignal("GPU-0", total_gib * GIB, (total_gib - free_gib) * GIB, 0.5),) if gpu else ()
    return WorkerSignals(scraped_at=0.0, gpus=gpus, models={"m": ModelSignal(pending=pending)})


def worker(wid: str = "w0", *, ready: bool = True, models: tuple[str, ...] = ("m",),
           slots: int = 8, in_flight: int = 0, in_flight_model: int = 0, priority: int = 0,
           sig: WorkerSignals | None = None, breaker: bool = True, share: float = 1.0,
           latency_s: float = 0.0) -> WorkerSnapshot:
    return WorkerSnapshot(id=wid, pool_priority=priority, ready=ready,
                          models_ready=frozenset(models), slots=slots, in_flight=in_flight,
                          in_flight_model=in_flight_model,
                          signals=signals() if sig is None else sig, breaker_allows=breaker,
                          traffic_share=share, latency_ewma_s=latency_s)


def stale(**kw: object) -> WorkerSnapshot:
    return replace(worker(**kw), signals=None)  # type: ignore[arg-type]


def router(seed: int = 1, models: dict[str, ModelConfig] | None = None,
           **cfg: object) -> Router:
    return Router(RoutingConfig(**cfg), models, rng=random.Random(seed))  # type: ignore[arg-type]


def routed(decision: Route | NoRoute) -> Route:
    assert isinstance(decision, Route), decision
    return decision


# ---------------------------------------------------------------- filters

@pytest.mark.parametrize(("snapshot", "key", "need_bytes", "expected"), [
    (worker(), M, 0.0, None),
    (worker(ready=False), M, 0.0, DROP_NOT_READY),
    (worker(models=("other",)), M, 0.0, DROP_NO_MODEL),
    (worker(models=("m", "m/1")), ModelKey("m", "2"), 0.0, DROP_NO_MODEL),
    (worker(models=("m", "m/2")), ModelKey("m", "2"), 0.0, None),
    (worker(models=("m", "m/?")), ModelKey("m", "7"), 0.0, None),
    (worker(breaker=False), M, 0.0, DROP_BREAKER),
    (worker(sig=signals(free_gib=1)), M, 2.0 * GIB, DROP_MEMORY),
    (worker(sig=signals(free_gib=3)), M, 2.0 * GIB, None),
    (worker(sig=signals(gpu=False)), M, 2.0 * GIB, None),   # no GPU signals: neutral
    (stale(), M, 2.0 * GIB, None),                            # stale signals: neutral
    (worker(slots=4, in_flight=4), M, 0.0, DROP_SATURATED),
    (worker(slots=4, in_flight=3), M, 0.0, None),
])
def test_drop_reason(snapshot: WorkerSnapshot, key: ModelKey, need_bytes: float,
                     expected: str | None) -> None:
    assert drop_reason(snapshot, key, need_bytes=need_bytes) == expected


@pytest.mark.parametrize(("configured", "batch", "learned", "expected"), [
    (None, 1, None, 0.0),
    (1000, 1, None, 1000.0),
    (1000, 4, None, 4000.0),
    (None, 4, 250.0, 1000.0),
    (1000, 2, 250.0, 2000.0),   # configured wins over learned
])
def test_required_memory_bytes(configured: int | None, batch: int, learned: float | None,
                               expected: float) -> None:
    cfg = ModelConfig(memory_bytes_per_request=configured)
    assert required_memory_bytes(cfg, batch, learned) == expected


@pytest.mark.parametrize(("pending", "in_flight", "slots", "threshold", "expected"), [
    (0, 0, 4, 1.0, False),
    (0, 4, 4, 1.0, True),      # slot limit
    (2, 1, 4, 1.0, False),
    (3, 1, 4, 1.0, True),      # queue threshold
    (3, 1, 4, 2.0, False),
])
def test_is_saturated(pending: float, in_flight: int, slots: int, threshold: float,
                      expected: bool) -> None:
    assert is_saturated(pending, in_flight, slots, threshold) is expected


@pytest.mark.parametrize(("excluded", "need"), [
    (worker("bad", ready=False), 0.0),
    (worker("bad", models=("other",)), 0.0),
    (worker("bad", breaker=False), 0.0),
    (worker("bad", sig=signals(free_gib=1)), 2.0 * GIB),
    (worker("bad", slots=2, in_flight=2), 0.0),
])
@pytest.mark.parametrize("policy", ["load_aware", "round_robin", "random", "least_inflight"])
@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_filtered_worker_never_chosen(excluded: WorkerSnapshot, need: float, policy: str,
                                      picker: str) -> None:
    # The unfit worker looks best on every score (idle, all memory free, fastest).
    better = replace(excluded, signals=excluded.signals or signals())
    fleet = [better, *(worker(f"ok{i}", in_flight=5, sig=signals(free_gib=10)) for i in range(4))]
    table = RoutingTable(fleet)
    r = router(policy=policy, picker=picker)
    for _ in range(50):
        d = routed(r.decide(table, M, learned_bytes_per_request=need or None))
        assert d.worker != "bad"


# ---------------------------------------------------------------- scorers

@pytest.mark.parametrize(("sig", "expected"), [
    (None, NEUTRAL_SCORE),
    (signals(gpu=False), NEUTRAL_SCORE),
    (signals(free_gib=20, total_gib=80), 0.25),
    (signals(free_gib=80, total_gib=80), 1.0),
    (signals(free_gib=0, total_gib=80), 0.0),
])
def test_memory_score(sig: WorkerSignals | None, expected: float) -> None:
    assert memory_score(sig) == pytest.approx(expected)


@pytest.mark.parametrize(("pending", "in_flight", "slots", "expected"), [
    (0, 0, 8, 1.0),
    (0, 8, 8, 0.5),
    (4, 4, 8, 0.5),
    (24, 0, 8, 0.25),
    (0, 0, 0, 1.0),
])
def test_queue_score(pending: float, in_flight: int, slots: int, expected: float) -> None:
    assert queue_score(pending, in_flight, slots) == pytest.approx(expected)


@pytest.mark.parametrize(("latency", "fastest", "expected"), [
    (0.0, 0.01, NEUTRAL_SCORE),
    (0.01, 0.0, NEUTRAL_SCORE),
    (0.01, 0.01, 1.0),
    (0.04, 0.01, 0.25),
])
def test_latency_score(latency: float, fastest: float, expected: float) -> None:
    assert latency_score(latency, fastest) == pytest.approx(expected)


@pytest.mark.parametrize(("weights", "expected"), [
    (WeightsConfig(), (1 / 11, 2 / 11, 0.0, 8 / 11)),
    (WeightsConfig(memory=0, queue=0, latency=0, expected_latency=0), (0.0, 0.0, 0.0, 0.0)),
    (WeightsConfig(memory=1, queue=1, latency=2, expected_latency=0), (0.25, 0.25, 0.5, 0.0)),
])
def test_normalised_weights(weights: WeightsConfig, expected: tuple[float, ...]) -> None:
    assert normalised_weights(weights) == pytest.approx(expected)


def test_scores_stay_in_unit_interval() -> None:
    table = RoutingTable([worker("a", in_flight=7, sig=signals(free_gib=0, pending=100),
                                 latency_s=5.0)])
    d = routed(router(weights=WeightsConfig(latency=1)).decide(table, M))
    assert 0.0 <= d.score <= 1.0


def test_per_model_weights_override() -> None:
    # Memory-only weights for "m": the idle worker with little memory loses.
    fleet = [worker("roomy", in_flight=6, sig=signals(free_gib=70)),
             worker("idle", in_flight=0, sig=signals(free_gib=5))]
    table = RoutingTable(fleet)
    default = router(picker="full_scan")
    assert routed(default.decide(table, M)).worker == "idle"
    memory_only = ModelConfig(weights=WeightsConfig(memory=1, queue=0, latency=0,
                                                    expected_latency=0))
    override = router(picker="full_scan", models={"m": memory_only})
    assert routed(override.decide(table, M)).worker == "roomy"


def test_latency_scorer_prefers_fastest() -> None:
    fleet = [worker("slow", latency_s=0.08), worker("fast", latency_s=0.01),
             worker("unknown", latency_s=0.0)]
    r = router(picker="full_scan", weights=WeightsConfig(memory=0, queue=0, latency=1,
                                                         expected_latency=0))
    assert routed(r.decide(RoutingTable(fleet), M)).worker == "fast"


# ---------------------------------------------------------------- pickers

def test_p2c_is_reproducible_with_a_seed() -> None:
    fleet = [worker(f"w{i}", in_flight=i % 5) for i in range(50)]
    table = RoutingTable(fleet)
    a, b = router(seed=7), router(seed=7)
    seq_a = [routed(a.decide(table, M)).worker for _ in range(100)]
    seq_b = [routed(b.decide(table, M)).worker for _ in range(100)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 10


def test_p2c_never_picks_the_worst_of_a_pair() -> None:
    fleet = [worker("idle"), worker("half", in_flight=4), worker("busy", in_flight=7)]
    r = router()
    picks = Counter(routed(r.decide(RoutingTable(fleet), M)).worker for _ in range(300))
    assert picks["busy"] == 0
    assert picks["idle"] > picks["half"] > 0


def test_p2c_samples_lazily_then_scans() -> None:
    # One fit worker among 200 statically eligible but full ones: draws miss, scan finds it.
    fleet = [worker(f"full{i}", slots=1, in_flight=1) for i in range(200)] + [worker("fit")]
    r = router()
    assert routed(r.decide(RoutingTable(fleet), M)).worker == "fit"
    assert r.statistics().scan_fallbacks == 1


def test_full_scan_picks_best_and_breaks_ties_at_random() -> None:
    fleet = [worker(f"w{i}", in_flight=3) for i in range(4)] + [worker("best", in_flight=1)]
    r = router(picker="full_scan")
    table = RoutingTable(fleet)
    d = routed(r.decide(table, M))
    assert d.worker == "best" and d.reason == "full scan: best of 5"
    tied = RoutingTable(worker(f"w{i}") for i in range(4))
    assert len({routed(r.decide(tied, M)).worker for _ in range(100)}) == 4


def test_round_robin_cycles_and_skips_unfit() -> None:
    fleet = [worker("a"), worker("b", breaker=False), worker("c"), worker("d", slots=1,
                                                                          in_flight=1)]
    r = router(policy="round_robin")
    table = RoutingTable(fleet)
    picks = [routed(r.decide(table, M)).worker for _ in range(6)]
    assert picks == ["a", "c", "a", "c", "a", "c"]


def test_random_baseline_spreads() -> None:
    table = RoutingTable(worker(f"w{i}", in_flight=i) for i in range(5))
    r = router(policy="random")
    picks = Counter(routed(r.decide(table, M)).worker for _ in range(500))
    assert set(picks) == {f"w{i}" for i in range(5)}


def test_least_inflight_uses_live_counts() -> None:
    table = RoutingTable(worker(f"w{i}") for i in range(3))
    load = InFlightCounters()
    for _ in range(3):
        load.begin("w0", "m")
    load.begin("w1", "m")
    r = router(policy="least_inflight")
    d = routed(r.decide(table, M, load))
    assert d.worker == "w2" and d.reason.startswith("least in-flight (0")


# ---------------------------------------------------------------- refusals

def test_no_route_reasons() -> None:
    r = router()
    d = r.decide(RoutingTable([worker()]), ModelKey("nope"))
    assert isinstance(d, NoRoute) and not d.saturated and "nope" in d.reason
    down = RoutingTable([worker("a", ready=False), worker("b", breaker=False)])
    d = r.decide(down, M)
    assert isinstance(d, NoRoute) and "1 not ready" in d.reason and "1 breaker open" in d.reason
    small = RoutingTable([worker(sig=signals(free_gib=1))])
    d = r.decide(small, M, learned_bytes_per_request=2 * GIB)
    assert isinstance(d, NoRoute) and not d.saturated and "2048 MiB" in d.reason
    full = RoutingTable([worker(f"w{i}", slots=2, in_flight=2) for i in range(3)])
    d = r.decide(full, M)
    assert isinstance(d, NoRoute) and d.saturated and "all 3" in d.reason
    d = r.decide(RoutingTable([worker(models=("m", "m/1"))]), ModelKey("m", "9"))
    assert isinstance(d, NoRoute) and not d.saturated and "m/9" in d.reason
    stats = r.statistics()
    assert stats.refused == 5 and stats.refused_saturated == 1 and stats.routed == 0


def test_versioned_key_goes_to_a_worker_with_that_version() -> None:
    fleet = [worker("v1", models=("m", "m/1")), worker("v2", models=("m", "m/2")),
             worker("any", models=("m", "m/?"))]
    r = router()
    picks = {routed(r.decide(RoutingTable(fleet), ModelKey("m", "2"))).worker
             for _ in range(100)}
    assert picks == {"v2", "any"}


# ---------------------------------------------------------------- pools

@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_pool_spills_only_when_preferred_is_saturated_and_returns(picker: str) -> None:
    fleet = [worker("p0a", slots=2), worker("p0b", slots=2),
             worker("p1", slots=8, priority=1)]
    table = RoutingTable(fleet)
    load = InFlightCounters()
    r = router(picker=picker)
    first = [routed(r.decide(table, M, load)) for _ in range(4)]
    for d in first:
        assert d.worker in ("p0a", "p0b")
        load.begin(d.worker, "m")
    spilled = routed(r.decide(table, M, load))
    assert spilled.worker == "p1" and "spilled to pool priority 1" in spilled.reason
    load.begin("p1", "m")
    load.end("p0b", "m")  # room again in the preferred pool
    back = routed(r.decide(table, M, load))
    assert back.worker == "p0b" and "spilled" not in back.reason
    assert r.statistics().spilled == 1


def test_pool_spills_on_scraped_queue() -> None:
    fleet = [worker("p0", slots=4, sig=signals(pending=4)), worker("p1", priority=1)]
    assert routed(router().decide(RoutingTable(fleet), M)).worker == "p1"
    calm = [worker("p0", slots=4, sig=signals(pending=1)), worker("p1", priority=1)]
    assert routed(router().decide(RoutingTable(calm), M)).worker == "p0"


def test_every_pool_queued_routes_to_least_loaded_below_slots() -> None:
    fleet = [worker("p0a", slots=4, sig=signals(pending=9)),
             worker("p0b", slots=4, sig=signals(pending=5)),
             worker("p1", priority=1, slots=4, sig=signals(pending=4))]
    r = router()
    d = routed(r.decide(RoutingTable(fleet), M))
    assert d.worker == "p0b" and "every pool saturated" in d.reason
    assert r.statistics().queue_fallbacks == 1


def test_last_level_queued_uses_drawn_candidates_without_scanning() -> None:
    fleet = [worker(f"w{i}", slots=4, sig=signals(pending=4 + i % 3)) for i in range(50)]
    r = router()
    d = routed(r.decide(RoutingTable(fleet), M))
    assert "every pool saturated" in d.reason
    assert r.statistics().scan_fallbacks == 0 and r.statistics().queue_fallbacks == 1


def test_saturated_everywhere_is_no_route_saturated() -> None:
    fleet = [worker("p0", slots=1, in_flight=1), worker("p1", slots=1, in_flight=1, priority=3)]
    d = router().decide(RoutingTable(fleet), M)
    assert isinstance(d, NoRoute) and d.saturated


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_pack_fills_one_worker_before_the_next(picker: str) -> None:
    table = RoutingTable(worker(f"w{i}", slots=4) for i in range(6))
    load = InFlightCounters()
    r = router(picker=picker, pack=True)
    picks = []
    for _ in range(8):
        d = routed(r.decide(table, M, load))
        load.begin(d.worker, "m")
        picks.append(d.worker)
    assert len(set(picks[:4])) == 1 and len(set(picks[4:])) == 1 and picks[0] != picks[4]
    assert r.statistics().packed == 6


def test_pack_prefers_worker_running_the_model_over_a_better_score() -> None:
    fleet = [worker("warm", in_flight=2, in_flight_model=2, sig=signals(free_gib=10)),
             worker("cold", sig=signals(free_gib=70))]
    d = routed(router(picker="full_scan", pack=True).decide(RoutingTable(fleet), M))
    assert d.worker == "warm" and d.reason.startswith("pack")
    d = routed(router(picker="full_scan", pack=False).decide(RoutingTable(fleet), M))
    assert d.worker == "cold"


def test_without_pack_load_spreads() -> None:
    table = RoutingTable(worker(f"w{i}", slots=4) for i in range(6))
    load = InFlightCounters()
    r = router(picker="full_scan")
    picks = []
    for _ in range(6):
        d = routed(r.decide(table, M, load))
        load.begin(d.worker, "m")
        picks.append(d.worker)
    assert len(set(picks)) == 6


# ---------------------------------------------------------------- slow start, sticky

@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_slow_start_share_thins_traffic(picker: str) -> None:
    fleet = [worker(f"w{i}") for i in range(4)] + [worker("new", share=0.2)]
    r = router(picker=picker, seed=3)
    table = RoutingTable(fleet)
    picks = Counter(routed(r.decide(table, M)).worker for _ in range(2000))
    steady = min(picks[f"w{i}"] for i in range(4))
    assert 0 < picks["new"] < 0.5 * steady


def test_slow_start_never_refuses() -> None:
    d = routed(router().decide(RoutingTable([worker("new", share=0.0)]), M))
    assert d.worker == "new"


def test_sticky_keeps_an_eligible_worker_and_falls_back() -> None:
    fleet = [worker("a"), worker("b", in_flight=7, priority=2), worker("c", breaker=False)]
    table = RoutingTable(fleet)
    r = router()
    d = routed(r.decide(table, M, sticky="b"))
    assert d.worker == "b" and d.reason.startswith("sticky")
    for gone in ("c", "unknown"):
        d = routed(r.decide(table, M, sticky=gone))
        assert d.worker == "a" and not d.reason.startswith("sticky")
    full = RoutingTable([worker("a"), worker("b", slots=1, in_flight=1)])
    assert routed(r.decide(full, M, sticky="b")).worker == "a"
    assert r.statistics().sticky == 1


# ---------------------------------------------------------------- the herd

def _herd(picker: str, live: bool) -> Counter[str]:
    # 100 identical workers but one with slightly more free memory; signals unchanged
    # for 1,000 decisions, as within one scrape interval.
    fleet = [worker(f"w{i}", slots=32, sig=signals(free_gib=40)) for i in range(99)]
    fleet.append(worker("w99", slots=32, sig=signals(free_gib=48)))
    table = RoutingTable(fleet)
    load = InFlightCounters()
    r = router(picker=picker, seed=11)
    picks: Counter[str] = Counter()
    for _ in range(1000):
        d = routed(r.decide(table, M, load if live else None))
        load.begin(d.worker, "m")
        picks[d.worker] += 1
    return picks


@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_live_in_flight_accounting_prevents_the_herd(picker: str) -> None:
    fair = 1000 / 100
    live = _herd(picker, live=True)
    assert max(live.values()) <= 3 * fair
    assert len(live) >= 90
    frozen = _herd(picker, live=False)
    if picker == "full_scan":
        assert frozen.most_common(1)[0] == ("w99", 1000)   # every request on one worker
    else:
        # P2C without live counts is no worse than random; with them, far more even.
        assert _spread(frozen, fair) > 3 * _spread(live, fair)
        assert frozen["w99"] > 1.5 * fair   # wins every pair it is drawn into


def _spread(picks: Counter[str], fair: float) -> float:
    return sum((picks[f"w{i}"] - fair) ** 2 for i in range(100))


# ---------------------------------------------------------------- expected latency

@pytest.mark.parametrize(("service", "ahead", "capacity", "triton_queue", "expected"), [
    (0.02, 0, 4, 0.0, 0.02),       # idle: one service time
    (0.02, 3, 4, 0.0, 0.02),       # below capacity: runs at once
    (0.02, 4, 4, 0.0, 0.025),      # full: waits for one of 4 to finish (s / 4)
    (0.02, 7, 4, 0.0, 0.04),       # a second round of 4
    (0.08, 0, 4, 0.0, 0.08),       # the slow idle worker loses to a fast one 7 deep
    (0.02, 0, 1, 0.0, 0.02),
    (0.02, 2, 1, 0.0, 0.06),       # capacity 1: Linkerd's cost, latency × (pending + 1)
    (0.02, 0, 0, 0.0, 0.02),       # unknown capacity counts as 1
    (0.02, 0, 4, 0.010, 0.025),    # Triton queues what the gateway cannot see: half of it
    (0.02, 7, 4, 0.010, 0.04),     # ... never lowering the live estimate
    (0.0, 0, 4, 0.0, routing.MIN_SERVICE_S),
])
def test_expected_completion_s(service: float, ahead: int, capacity: int,
                               triton_queue: float, expected: float) -> None:
    assert expected_completion_s(service, ahead, capacity, triton_queue) == \
        pytest.approx(expected)


@pytest.mark.parametrize(("expected", "best", "score"), [
    (0.02, 0.02, 1.0), (0.08, 0.02, 0.25), (0.0, 0.02, NEUTRAL_SCORE), (0.02, 0.0, NEUTRAL_SCORE),
])
def test_expected_latency_score(expected: float, best: float, score: float) -> None:
    assert expected_latency_score(expected, best) == pytest.approx(score)


def test_peak_ewma_jumps_on_a_slow_sample_and_decays_with_time() -> None:
    st = ServiceTimes()
    assert st.estimate("w", "m", 0.0) is None                       # cold
    st.observe("w", "m", 0.020, 0.0)
    st.observe("w", "m", 0.100, 0.01)                               # a peak counts at once
    assert st.estimate("w", "m", 0.01) == pytest.approx(0.100)
    st.observe("w", "m", 0.020, 0.01)                               # no time passed: kept
    assert st.estimate("w", "m", 0.01) == pytest.approx(0.100)
    tau = routing.SERVICE_DECAY_S
    st.observe("w", "m", 0.020, 0.01 + tau)                         # one time constant
    assert st.estimate("w", "m", 0.01 + tau) == \
        pytest.approx(0.020 + 0.080 / 2.718281828, rel=1e-3)
    for i in range(2, 12):                                          # many constants
        st.observe("w", "m", 0.020, 0.01 + i * tau)
    assert st.estimate("w", "m", 0.01 + 11 * tau) == pytest.approx(0.020, rel=1e-3)


def test_samples_are_normalised_by_the_work_ahead_over_capacity() -> None:
    st = ServiceTimes()
    # 40 ms with 7 others on a worker executing 4 at once: two rounds of 20 ms.
    st.observe("w", "m", 0.040, 0.0, in_flight=7, capacity=4)
    assert st.estimate("w", "m", 0.0) == pytest.approx(0.020)
    st.observe("v", "m", 0.020, 0.0, in_flight=2, capacity=4)      # below capacity: as is
    assert st.estimate("v", "m", 0.0) == pytest.approx(0.020)
    st.observe("v", "m", -1.0, 0.0)                                 # nonsense is ignored
    st.observe("v", "m", float("inf"), 0.0)
    assert st.estimate("v", "m", 0.0) == pytest.approx(0.020)


def test_idle_estimate_decays_toward_remeasurement_but_not_while_probing() -> None:
    st = ServiceTimes()
    st.observe("slow", "m", 0.080, 0.0)
    tau = routing.IDLE_DECAY_S
    assert st.estimate("slow", "m", 2 * tau) == pytest.approx(0.080 / 2.718281828**2, rel=1e-3)
    assert st.estimate("slow", "m", 2 * tau, probing=True) == pytest.approx(0.080)
    st.observe("slow", "m", 0.080, 2 * tau)                         # re-measured: slow again
    assert st.estimate("slow", "m", 2 * tau) == pytest.approx(0.080)


def test_service_times_are_bounded_per_worker_and_forgotten() -> None:
    st = ServiceTimes()
    n = routing.MAX_MODELS_PER_WORKER
    for i in range(n + 10):
        st.observe("w", f"model{i}", 0.01, float(i))
    stats = st.statistics()
    assert (stats.workers, stats.estimates, stats.evicted) == (1, n, 10)
    assert st.estimate("w", "model0", 1e3) is None                  # the stalest went
    assert st.estimate("w", f"model{n + 9}", float(n + 9)) == pytest.approx(0.01)
    st.forget("w")
    assert st.statistics().estimates == 0 and "estimates=0" in repr(st)


def _closed_loop(policy: str, *, seconds: float = 8.0, clients: int = 10,
                 service_s: tuple[float, ...] = (0.02, 0.02, 0.08),
                 seed: int = 5) -> tuple[Counter[str], list[float]]:
    """A small event simulation of the benchmark's case: workers executing 4 requests at
    once (FIFO beyond), ``clients`` closed-loop clients, the router deciding at each
    send with live in-flight counts and the service times measured so far."""
    names = [f"w{i}" for i in range(len(service_s))]
    table = RoutingTable(replace(worker(n, slots=8), capacity_units=4) for n in names)
    r = router(seed=seed, policy=policy)
    load, st = InFlightCounters(), ServiceTimes()
    running = dict.fromkeys(names, 0)
    waiting: dict[str, deque[tuple[float, int]]] = {n: deque() for n in names}
    events: list[tuple[float, int, str, float, int]] = []  # finish, seq, worker, sent, ahead
    seq = 0
    picks: Counter[str] = Counter()
    latencies: list[float] = []

    def start(w: str, now: float, sent: float, ahead: int) -> None:
        nonlocal seq
        running[w] += 1
        seq += 1
        heapq.heappush(events, (now + service_s[names.index(w)], seq, w, sent, ahead))

    def send(now: float) -> None:
        d = routed(r.decide(table, M, load, service=st, now=now))
        ahead = load.in_flight(d.worker)
        load.begin(d.worker, "m")
        picks[d.worker] += 1
        if running[d.worker] < 4:
            start(d.worker, now, now, ahead)
        else:
            waiting[d.worker].append((now, ahead))

    for _ in range(clients):
        send(0.0)
    while events:
        now, _, w, sent, ahead = heapq.heappop(events)
        if now > seconds:
            break
        running[w] -= 1
        if waiting[w]:
            start(w, now, *waiting[w].popleft())
        load.end(w, "m")
        st.observe(w, "m", now - sent, now, in_flight=ahead, capacity=4)
        if now > 1.0:
            latencies.append(now - sent)
        send(now)
    return picks, sorted(latencies)


def test_expected_latency_sends_less_to_the_slow_worker_than_least_inflight() -> None:
    picks, lat = _closed_loop("load_aware")
    lc_picks, lc_lat = _closed_loop("least_inflight")
    share = picks["w2"] / sum(picks.values())
    lc_share = lc_picks["w2"] / sum(lc_picks.values())
    assert lc_share > 0.10                   # least-in-flight feeds the 80 ms worker ...
    assert share < 0.02                      # ... expected latency only probes it
    assert picks["w2"] > 0                   # re-measured now and then, never starved
    p99, lc_p99 = lat[int(0.99 * len(lat))], lc_lat[int(0.99 * len(lc_lat))]
    assert p99 <= 0.8 * lc_p99 and lc_p99 >= 0.08
    assert len(lat) >= 0.95 * len(lc_lat)    # throughput no worse


def test_a_cold_worker_gets_a_probe_then_a_share_by_its_measurement() -> None:
    table = RoutingTable(replace(worker(n, slots=8), capacity_units=4)
                         for n in ("a", "b", "new"))
    st = ServiceTimes()
    for n in ("a", "b"):
        st.observe(n, "m", 0.020, 0.0)
    load = InFlightCounters()
    for n in ("a", "b"):
        for _ in range(5):
            load.begin(n, "m")
    r = router(picker="full_scan")
    first = routed(r.decide(table, M, load, service=st, now=0.01))
    assert first.worker == "new"             # as fast as the best measured, and idle
    load.begin("new", "m")
    # While its probe is in flight it counts PROBE_PENALTY × slower: no second request.
    assert routed(r.decide(table, M, load, service=st, now=0.02)).worker != "new"
    load.end("new", "m")
    st.observe("new", "m", 0.200, 0.21)      # measured: 10 × slower
    assert routed(r.decide(table, M, load, service=st, now=0.22)).worker != "new"


def test_a_slow_worker_is_remeasured_once_its_estimate_has_decayed() -> None:
    table = RoutingTable(replace(worker(n, slots=8), capacity_units=4)
                         for n in ("a", "slow"))
    st = ServiceTimes()
    st.observe("a", "m", 0.020, 0.0)
    st.observe("slow", "m", 0.080, 0.0)
    load = InFlightCounters()
    for _ in range(5):
        load.begin("a", "m")                 # a: 0.02 × 6 / 4 = 30 ms expected
    r = router(picker="full_scan")
    assert routed(r.decide(table, M, load, service=st, now=0.1)).worker == "a"
    later = 3 * routing.IDLE_DECAY_S         # 80 ms decayed to 4 ms: probe it
    assert routed(r.decide(table, M, load, service=st, now=later)).worker == "slow"
    load.begin("slow", "m")                  # probing: judged by its undecayed 80 ms
    assert routed(r.decide(table, M, load, service=st, now=later)).worker == "a"


def test_the_gateway_queue_weighs_against_a_slower_worker_with_a_free_unit() -> None:
    table = RoutingTable(replace(worker(n, slots=8), capacity_units=4) for n in ("a", "slow"))
    st = ServiceTimes()
    st.observe("a", "m", 0.020, 0.0)
    st.observe("slow", "m", 0.080, 0.0)
    load = InFlightCounters()
    for _ in range(4):
        load.begin("a", "m")                 # every execution unit of a busy: 25 ms
    r = router(picker="full_scan")

    def pick(queue_wait_s: float) -> str:
        return routed(r.decide(table, M, load, service=st, now=0.0,
                               queue_wait_s=queue_wait_s)).worker

    assert pick(0.0) == "a"
    assert pick(0.030) == "a"                # 55 ms: still sooner than the slow 80 ms
    assert pick(0.100) == "slow"             # the queue's wait exceeds the slow service
    load.end("a", "m")                       # a unit of a frees: the queue is not ahead
    assert pick(0.100) == "a"


def test_without_service_times_the_snapshot_latency_stands_in() -> None:
    fleet = [replace(worker("fast", latency_s=0.02, in_flight=5), capacity_units=4),
             replace(worker("slow", latency_s=0.08), capacity_units=4)]
    assert routed(router(picker="full_scan").decide(RoutingTable(fleet), M)).worker == "fast"


@pytest.mark.parametrize("picker", ["p2c", "full_scan"])
def test_slow_start_thins_a_measured_fast_worker_too(picker: str) -> None:
    table = RoutingTable([worker(f"w{i}") for i in range(4)] + [worker("new", share=0.2)])
    st = ServiceTimes()
    for i in range(4):
        st.observe(f"w{i}", "m", 0.05, 0.0)
    st.observe("new", "m", 0.01, 0.0)        # 5 × faster, but ramping up
    r = router(picker=picker, seed=3)
    picks = Counter(routed(r.decide(table, M, service=st, now=0.0)).worker
                    for _ in range(2000))
    assert 0 < picks["new"] < 0.5 * 2000


# ---------------------------------------------------------------- table and counters

def test_table_update_remove_and_statistics() -> None:
    table = RoutingTable([worker("a", models=("m", "x")), worker("b")])
    assert len(table) == 2 and table.models() == {"m", "x"}
    assert table.statistics().indexed == 3
    table.update(worker("a", models=("m", "x"), sig=signals(pending=5)))   # signals only
    assert table.statistics().indexed == 3
    assert (snap := table.snapshot("a")) is not None and snap.signals is not None
    assert snap.signals.pending() == 5
    table.update(worker("a", models=("m", "x"), ready=False))              # eligibility
    assert table.statistics().indexed == 1 and table.statistics().sidelined == 2
    r = router()
    assert all(routed(r.decide(table, M)).worker == "b" for _ in range(20))
    table.update(worker("a", models=("m",), priority=1))
    assert table.models() == {"m"} and table.statistics().sidelined == 0
    assert table.remove("b") and not table.remove("b") and "b" not in table
    assert routed(r.decide(table, M)).worker == "a"
    assert table.remove("a") and table.statistics().indexed == 0 and table.models() == set()
    assert repr(table) == "<RoutingTable workers=0 models=0>"


def test_in_flight_counters_are_bounded() -> None:
    c = InFlightCounters()
    c.begin("a", "m")
    c.begin("a", "x")
    assert (c.in_flight("a"), c.in_flight_model("a", "m"), c.in_flight_model("b", "m")) == (2, 1, 0)
    c.end("a", "m")
    c.end("a", "x")
    assert c.statistics().busy_workers == 0 and c.statistics().in_flight == 0
    with pytest.raises(ValueError):
        c.end("a", "m")
    assert "in_flight=0" in repr(c)


def test_router_statistics_and_repr() -> None:
    r = router()
    routed(r.decide(RoutingTable([worker()]), M))
    s = r.statistics()
    assert (s.policy, s.picker, s.decisions, s.routed) == ("load_aware", "p2c", 1, 1)
    assert "decisions=1" in repr(r)


def test_route_helper() -> None:
    d = route([worker("a")], M, RoutingConfig(), rng=random.Random(0))
    assert routed(d).worker == "a"


# ---------------------------------------------------------------- property

_sig = st.one_of(
    st.none(),
    st.builds(signals, free_gib=st.sampled_from([0.5, 4.0, 40.0]),
              pending=st.sampled_from([0.0, 2.0, 20.0]), gpu=st.booleans()),
)


@st.composite
def _fleet(draw: st.DrawFn) -> list[WorkerSnapshot]:
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        slots = draw(st.integers(0, 4))
        out.append(WorkerSnapshot(
            id=f"w{i}", pool_priority=draw(st.integers(0, 2)), ready=draw(st.booleans()),
            models_ready=frozenset(draw(st.sampled_from(
                [("m",), ("m", "m/1"), ("m", "m/?"), ("x",), ("m", "x")]))),
            slots=slots, in_flight=draw(st.integers(0, 5)), in_flight_model=draw(
                st.integers(0, 2)), signals=draw(_sig), breaker_allows=draw(st.booleans()),
            traffic_share=draw(st.sampled_from([0.0, 0.3, 1.0])),
            latency_ewma_s=draw(st.sampled_from([0.0, 0.01, 0.05]))))
    return out


@settings(max_examples=300, deadline=None)
@given(fleet=_fleet(), key=st.sampled_from([M, ModelKey("m", "1"), ModelKey("m", "2")]),
       policy=st.sampled_from(["load_aware", "round_robin", "random", "least_inflight"]),
       picker=st.sampled_from(["p2c", "full_scan"]), pack=st.booleans(),
       need=st.sampled_from([0.0, 2.0 * GIB]), seed=st.integers(0, 2**16), live=st.booleans())
def test_picker_never_returns_a_filtered_worker(fleet: list[WorkerSnapshot], key: ModelKey,
                                                policy: str, picker: str, pack: bool,
                                                need: float, seed: int, live: bool) -> None:
    r = router(seed=seed, policy=policy, picker=picker, pack=pack)
    table = RoutingTable(fleet)
    load = InFlightCounters() if live else None
    if load is not None:   # the same counts, arriving live instead of in the snapshots
        for w in fleet:
            for i in range(w.in_flight):
                load.begin(w.id, "m" if i < w.in_flight_model else "x")
    fit = [w for w in fleet if drop_reason(w, key, need_bytes=need) is None]
    for _ in range(3):
        d = r.decide(table, key, load, learned_bytes_per_request=need or None)
        if not fit:
            assert isinstance(d, NoRoute)
            full = any(drop_reason(w, key, need_bytes=need) == DROP_SATURATED for w in fleet)
            assert d.saturated is full
            continue
        chosen = routed(d)   # complete: a fit worker exists, so a route is found
        w = next(w for w in fleet if w.id == chosen.worker)
        assert drop_reason(w, key, need_bytes=need) is None
        assert 0.0 <= chosen.score <= 1.0
        # Pools: no unsaturated fit worker sits in a more preferred level.
        roomy = [f.pool_priority for f in fit
                 if not is_saturated(f.signals.pending() if f.signals else 0.0, f.in_flight,
                                     f.slots, 1.0)]
        if roomy:
            assert w.pool_priority == min(roomy)
