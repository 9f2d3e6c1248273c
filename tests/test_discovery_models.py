"""Model discovery (``gateway.fleet.discovery``): the pure catalog on a fake clock, then the async
directory against real servers on loopback — the Triton simulator and a real Triton
(PyTriton) — counting the probes each lookup costs on the server side."""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from gateway.core.errors import BadRequest, NoHealthyWorker, NotFound, Overloaded
from gateway.core.types import ModelKey, WorkerId
from gateway.fleet.discovery import (
    Action,
    Deferred,
    DiscoveryLimits,
    Found,
    ModelCatalog,
    ModelDirectory,
    ModelFacts,
    ModelUnknown,
    NeedsProbe,
    NoWorkerReady,
    VersionUnknown,
    fetch_via_pools,
    is_valid_name,
    is_valid_version,
    model_facts,
    model_path,
)
from gateway.fleet.upstream import Pool, PoolLimits
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleet
from gateway.tools.local import TritonFleet

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
SIMPLE = ModelKey("simple")


# ------------------------------------------------------------------ pure helpers

@pytest.mark.parametrize(("name", "valid"), [
    ("simple", True),
    ("add_sub-v2.onnx", True),
    ("a b", True),                     # printable; quoted in paths
    ("100%", True),
    ("modèle", True),
    ("x" * 256, True),
    ("x" * 257, False),
    ("é" * 129, False),                # 258 UTF-8 bytes
    ("", False),
    (".", False),
    ("..", False),
    ("a/b", False),
    ("a\\b", False),
    ("a\nb", False),
    ("a\x00b", False),
    ("\ud800", False),                 # lone surrogate: not encodable
])
def test_model_names_are_checked_before_any_probe(name: str, valid: bool) -> None:
    assert is_valid_name(name) is valid


@pytest.mark.parametrize(("version", "valid"), [
    ("", True), ("1", True), ("0012", True), ("9" * 19, True), ("9" * 20, False),
    ("1a", False), ("-1", False), ("١", False),  # Arabic-Indic one: isdigit() but not ASCII
])
def test_versions_are_ascii_digits(version: str, valid: bool) -> None:
    assert is_valid_version(version) is valid


@pytest.mark.parametrize(("key", "suffix", "path"), [
    (ModelKey("simple"), "ready", "/v2/models/simple/ready"),
    (ModelKey("simple", "3"), "config", "/v2/models/simple/versions/3/config"),
    (ModelKey("a b?#%"), "ready", "/v2/models/a%20b%3F%23%25/ready"),
    (ModelKey("simple"), "", "/v2/models/simple"),
])
def test_paths_quote_the_name(key: ModelKey, suffix: str, path: str) -> None:
    assert model_path(key, suffix) == path


@pytest.mark.parametrize(("config", "facts"), [
    ({"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_microseconds": 500},
      "instance_group": [{"count": 4, "kind": "KIND_CPU"}]},
     ModelFacts(64, True, 4, False, 500)),
    ({"max_batch_size": 0, "instance_group": [{"count": 2, "gpus": [0, 1]}, {"count": 1}]},
     ModelFacts(0, False, 5, False)),
    ({"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_microseconds": "100"},
      "model_transaction_policy": {"decoupled": True}},
     ModelFacts(8, True, 1, True, 100)),
    ({"max_batch_size": "x", "instance_group": "nonsense"}, ModelFacts(0, False, 1, False)),
    ({"max_batch_size": 8, "dynamic_batching": {
        "default_queue_policy": {"allow_timeout_override": True}}},
     ModelFacts(8, True, 1, False, timeout_override=True)),
    ({"max_batch_size": 8, "dynamic_batching": {
        "default_queue_policy": {"allow_timeout_override": False},
        "priority_queue_policy": {"1": {"allow_timeout_override": True},
                                  "2": {"allow_timeout_override": True}}}},
     ModelFacts(8, True, 1, False, timeout_override=True)),
    ({"max_batch_size": 8, "dynamic_batching": {
        "priority_queue_policy": {"1": {"allow_timeout_override": True}, "2": {}}}},
     ModelFacts(8, True, 1, False)),
    ({"default_queue_policy": {"allow_timeout_override": True}},   # no dynamic batcher
     ModelFacts(0, False, 1, False)),
    ({"max_batch_size": 4, "dynamic_batching": {"priority_levels": "3"}},
     ModelFacts(4, True, 1, False, priority_levels=3)),
    ({"max_batch_size": 4, "dynamic_batching": {"priority_levels": -2}},
     ModelFacts(4, True, 1, False)),
    ([], None),
])
def test_facts_from_a_model_config(config: object, facts: ModelFacts | None) -> None:
    assert model_facts(config) == facts


@pytest.mark.parametrize(("result", "action", "status", "message", "retry"), [
    (ModelUnknown(ModelKey("m"), "probed"), Action.OTHER, 404,
     "Request for unknown model: 'm' is not found", False),
    (ModelUnknown(ModelKey("m"), "probed"), Action.READY, 400, "Model version not ready", False),
    (VersionUnknown(ModelKey("m", "9"), "probed"), Action.OTHER, 404,
     "Request for unknown model: 'm' version 9 is not found", False),
    (VersionUnknown(ModelKey("m", "9"), "probed"), Action.READY, 400,
     "Model version not ready", False),
    (NoWorkerReady(ModelKey("m"), "not_ready", 1.0), Action.OTHER, 503,
     "no ready worker has model 'm'", True),
    (NoWorkerReady(ModelKey("m"), "not_ready", 1.0), Action.READY, 400,
     "Model version not ready", False),
    (Deferred(ModelKey("m"), "rate_limit", 2.0), Action.OTHER, 503, None, True),
])
def test_outcomes_answer_like_triton(
        result: ModelUnknown | VersionUnknown | NoWorkerReady | Deferred, action: Action,
        status: int, message: str | None, retry: bool) -> None:
    err = result.error(action)
    assert err.status == status
    assert message is None or err.message == message
    assert (err.retry_after_s is not None) is retry
    expected = {404: NotFound, 400: BadRequest}.get(
        status, Overloaded if isinstance(result, Deferred) else NoHealthyWorker)
    assert isinstance(err, expected)


# ------------------------------------------------------------------ the catalog, fake clock

LIMITS = DiscoveryLimits(negative_ttl_s=5.0, max_models=3, max_negatives=3,
                         max_rounds_in_flight=2, rounds_per_s=1.0, round_burst=2,
                         max_refresh_keys=2)


def _found_on(cat: ModelCatalog, key: ModelKey, workers: frozenset[WorkerId],
              now: float, facts: ModelFacts | None = None) -> Found:
    asked = cat.decide(key, workers, now)
    assert isinstance(asked, NeedsProbe)
    out = cat.record_round(key, dict.fromkeys(asked.targets, True), facts, now)
    assert isinstance(out, Found)
    return out


@pytest.mark.parametrize(("ready", "expect"), [
    (frozenset({A, B}), Found(SIMPLE, frozenset({A}), None, cached=True)),
    (frozenset({B}), NeedsProbe(SIMPLE, (B,))),          # the one serving it is not ready
    (frozenset(), NoWorkerReady(SIMPLE, "no_ready_worker", 1.0)),
])
def test_seeded_models_answer_without_a_probe(ready: frozenset[WorkerId],
                                              expect: object) -> None:
    cat = ModelCatalog(LIMITS)
    cat.on_worker_models(A, ["simple", "simple/1", "simple/?"])
    assert cat.decide(SIMPLE, ready, now=0.0) == expect


def test_seeds_follow_the_fleet_and_forget_worker_drops_everything() -> None:
    cat = ModelCatalog(LIMITS)
    cat.on_worker_models(A, ["simple", "simple/1"])
    cat.on_worker_models(B, ["simple"])
    assert cat.workers_for(SIMPLE) == {A, B}
    assert cat.workers_for(ModelKey("simple", "1")) == {A}
    cat.on_worker_models(A, ["simple/1"])       # A no longer lists "simple"
    assert cat.workers_for(SIMPLE) == {B}
    cat.forget_worker(B)
    assert cat.workers_for(SIMPLE) == frozenset()
    assert cat.workers_for(ModelKey("simple", "1")) == {A}


def test_a_probe_round_answers_found_and_is_cached_with_its_facts() -> None:
    cat = ModelCatalog(LIMITS)
    facts = ModelFacts(64, True, 4, False)
    asked = cat.decide(SIMPLE, {A, B, C}, now=0.0)
    assert asked == NeedsProbe(SIMPLE, (A, B, C))
    out = cat.record_round(SIMPLE, {A: True, B: False, C: None}, facts, now=0.0)
    assert out == Found(SIMPLE, frozenset({A}), facts, cached=False)
    assert cat.decide(SIMPLE, {A, B, C}, now=100.0) == Found(SIMPLE, frozenset({A}), facts,
                                                            cached=True)
    stats = cat.statistics(0.0)
    assert (stats.probes_sent, stats.probe_failures, stats.hits) == (3, 1, 1)


@pytest.mark.parametrize(("answers", "expect"), [
    ({A: False, B: False}, ModelUnknown(SIMPLE, "probed")),
    ({A: False, B: None}, NoWorkerReady(SIMPLE, "probe_failed", 1.0)),
    ({A: None, B: None}, NoWorkerReady(SIMPLE, "probe_failed", 1.0)),
])
def test_negative_answers_are_cached_until_the_ttl(answers: dict[WorkerId, bool | None],
                                                   expect: object) -> None:
    cat = ModelCatalog(LIMITS)
    assert isinstance(cat.decide(SIMPLE, {A, B}, now=0.0), NeedsProbe)
    assert cat.record_round(SIMPLE, answers, None, now=0.0) == expect
    for now in (0.1, 4.9):
        assert cat.decide(SIMPLE, {A, B}, now=now) == expect     # no probe
    assert isinstance(cat.decide(SIMPLE, {A, B}, now=5.0), NeedsProbe)
    assert cat.statistics(5.0).negatives_cached == 0


def test_a_known_model_on_no_ready_worker_is_not_ready_rather_than_unknown() -> None:
    cat = ModelCatalog(LIMITS)
    _found_on(cat, SIMPLE, frozenset({A}), now=0.0)
    asked = cat.decide(SIMPLE, {B}, now=1.0)                   # A went down; ask B
    assert asked == NeedsProbe(SIMPLE, (B,))
    assert cat.record_round(SIMPLE, {B: False}, None, now=1.0) == NoWorkerReady(
        SIMPLE, "not_ready", 1.0)
    # A is back: found again at once, the negative does not hide it
    assert cat.decide(SIMPLE, {A, B}, now=2.0) == Found(SIMPLE, frozenset({A}), None, True)


def test_versions_resolve_the_model_first_and_ask_only_its_workers() -> None:
    cat = ModelCatalog(LIMITS)
    v9 = ModelKey("simple", "9")
    assert cat.decide(v9, {A, B}, now=0.0) == NeedsProbe(v9, (), base_first=True)
    assert isinstance(cat.record_round(SIMPLE, {A: False, B: True}, None, now=0.0), Found)
    assert cat.decide(v9, {A, B}, now=0.0) == NeedsProbe(v9, (B,))
    assert cat.record_round(v9, {B: False}, None, now=0.0) == VersionUnknown(v9, "probed")
    assert cat.decide(v9, {A, B}, now=1.0) == VersionUnknown(v9, "probed")
    # an unknown model with a version is unknown from the model's own negative
    nope3 = ModelKey("nope", "3")
    assert cat.decide(nope3, {A, B}, now=0.0) == NeedsProbe(nope3, (), base_first=True)
    cat.record_round(ModelKey("nope"), {A: False, B: False}, None, now=0.0)
    assert cat.decide(nope3, {A, B}, now=0.0) == ModelUnknown(nope3, "cached")


@pytest.mark.parametrize(("key", "expect"), [
    (ModelKey("a/b"), ModelUnknown(ModelKey("a/b"), "invalid_name")),
    (ModelKey(""), ModelUnknown(ModelKey(""), "invalid_name")),
    (ModelKey("x" * 300), ModelUnknown(ModelKey("x" * 300), "invalid_name")),
    (ModelKey("simple", "v1"), VersionUnknown(ModelKey("simple", "v1"), "invalid_version")),
])
def test_invalid_names_are_unknown_without_a_probe(key: ModelKey, expect: object) -> None:
    cat = ModelCatalog(LIMITS)
    assert cat.decide(key, {A}, now=0.0) == expect
    assert cat.statistics(0.0).invalid_names == 1


def test_positive_and_negative_caches_are_separate_lrus() -> None:
    cat = ModelCatalog(LIMITS)                        # max_models = max_negatives = 3
    for i in range(4):
        _found_on(cat, ModelKey(f"m{i}"), frozenset({A}), now=0.0)
    assert cat.workers_for(ModelKey("m0")) == frozenset()  # evicted, least recently used
    assert isinstance(cat.decide(ModelKey("m1"), {A}, now=0.0), Found)  # touch m1
    _found_on(cat, ModelKey("m4"), frozenset({A}), now=0.0)
    assert cat.workers_for(ModelKey("m1")) == {A}           # kept: used recently
    assert cat.workers_for(ModelKey("m2")) == frozenset()
    for i in range(10):                                      # a flood of unknown names ...
        cat.record_round(ModelKey(f"junk{i}"), {A: False}, None, now=0.0)
    stats = cat.statistics(0.0)
    assert (stats.models_known, stats.negatives_cached) == (3, 3)  # ... evicts no model
    assert {k for k in ("m1", "m3", "m4") if cat.workers_for(ModelKey(k))} == {"m1", "m3", "m4"}


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("steps", "admitted"), [
    # (advance_s, rounds finished before asking) per request; burst 2, 1/s, 2 at once
    ([(0.0, 0), (0.0, 0), (0.0, 0)], [True, True, False]),          # in flight: 2 max
    ([(0.0, 1), (0.0, 1), (0.0, 1)], [True, True, False]),          # burst spent
    ([(0.0, 1), (0.0, 1), (0.5, 1), (0.5, 0)], [True, True, False, True]),  # refill 1/s
    ([(0.0, 1), (10.0, 1), (0.0, 1), (0.0, 1)], [True, True, True, False]),  # cap: burst 2
])
def test_rounds_are_bounded_at_once_and_per_second(steps: list[tuple[float, int]],
                                                   admitted: list[bool]) -> None:
    cat = ModelCatalog(LIMITS)
    now, got, running = 0.0, [], 0
    for i, (advance, finish) in enumerate(steps):
        now += advance
        for _ in range(min(finish, running)):
            cat.round_finished()
            running -= 1
        refused = cat.admit_round(ModelKey(f"m{i}"), now)
        got.append(refused is None)
        running += refused is None
    assert got == admitted


def test_refresh_plan_rechecks_probed_keys_and_teaches_new_workers() -> None:
    cat = ModelCatalog(LIMITS)                                    # max_refresh_keys = 2
    cat.on_worker_models(A, ["seeded"])
    _found_on(cat, ModelKey("old"), frozenset({A}), now=0.0)
    _found_on(cat, ModelKey("new"), frozenset({A}), now=0.0)
    assert cat.refresh_plan(A) == (ModelKey("new"), ModelKey("old"))  # never seeded ones
    assert cat.refresh_plan(B) == (ModelKey("new"), ModelKey("old"))  # bounded: 2 of 3
    cat.record_refresh(B, {ModelKey("new"): True, ModelKey("old"): False}, {})
    assert cat.workers_for(ModelKey("new")) == {A, B}
    cat.record_refresh(A, {ModelKey("old"): False, ModelKey("new"): None},
                       {ModelKey("new"): ModelFacts(1, False, 1, False)})
    assert cat.workers_for(ModelKey("old")) == frozenset()      # unloaded on A
    assert cat.workers_for(ModelKey("new")) == {A, B}           # no answer: kept
    assert cat.facts(ModelKey("new")) == ModelFacts(1, False, 1, False)
    assert cat.facts_missing(A) == (ModelKey("seeded"),)
    assert "known=4/3" not in repr(cat) and "negatives=0" in repr(cat)


# ------------------------------------------------------------------ shell helpers

@dataclass
class CountingFetch:
    """The real upstream fetch over real pools, counting what it sends."""

    pools: dict[WorkerId, Pool]
    calls: list[tuple[WorkerId, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._inner = fetch_via_pools(self.pools.get)

    async def __call__(self, worker: WorkerId, method: str, target: str, *,
                       timeout_s: float) -> tuple[int, bytes]:
        self.calls.append((worker, target))
        return await self._inner(worker, method, target, timeout_s=timeout_s)

    def count(self, suffix: str) -> int:
        return sum(t.endswith(suffix) for _, t in self.calls)

    async def aclose(self) -> None:
        for p in self.pools.values():
            await p.aclose()


def _pools(host_ports: list[tuple[str, int]]) -> dict[WorkerId, Pool]:
    limits = PoolLimits(max_connections=32, connect_timeout_s=1.0, read_timeout_s=5.0)
    return {f"{h}:{p}": Pool(h, p, limits) for h, p in host_ports}


def _random_names(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters + string.digits + " %?#._-", k=12))
            for _ in range(n)]


OTHER = SimModel(name="other", max_batch_size=0, dynamic_batching=False)


@dataclass
class SimRig:
    sim: SimFleet
    fetch: CountingFetch
    ids: list[WorkerId]

    def served(self) -> int:
        """HTTP requests the simulated workers received (the server-side count)."""
        return sum(w.http_requests for w in self.sim.statistics().workers)

    def directory(self, **limits: float) -> ModelDirectory:
        return ModelDirectory(self.fetch, DiscoveryLimits(**limits))  # type: ignore[arg-type]


@pytest.fixture
async def rig() -> AsyncIterator[SimRig]:
    """Two simulated workers on this loop: both serve ``simple``, only the second ``other``."""
    sim = SimFleet([WorkerSpec(), WorkerSpec(models=(SimModel(), OTHER))])
    await sim.start()
    fetch = CountingFetch(_pools([("127.0.0.1", p) for p in sim.ports]))
    try:
        yield SimRig(sim, fetch, list(fetch.pools))
    finally:
        await fetch.aclose()
        await sim.stop()


# ------------------------------------------------------------------ the directory, simulator

async def test_lookups_against_the_simulator_tell_every_outcome_apart(rig: SimRig) -> None:
    d = rig.directory()
    w1 = rig.ids[1]
    ready = frozenset(rig.ids)
    found = await d.lookup(SIMPLE, ready)
    assert isinstance(found, Found) and found.workers == ready and not found.cached
    # the simulator's model runs each request alone, on the worker's 4 slots (instances)
    assert found.facts == ModelFacts(max_batch_size=64, dynamic_batching=False, instances=4,
                                     decoupled=False)
    other = await d.lookup(ModelKey("other"), ready)
    assert isinstance(other, Found) and other.workers == {w1}
    assert other.facts == ModelFacts(0, False, 4, False)
    assert isinstance(await d.lookup(ModelKey("simple", "1"), ready), Found)
    assert await d.lookup(ModelKey("simple", "9"), ready) == VersionUnknown(
        ModelKey("simple", "9"), "probed")
    assert await d.lookup(ModelKey("nope"), ready) == ModelUnknown(ModelKey("nope"), "probed")
    before = len(rig.fetch.calls)
    assert await d.lookup(ModelKey("nope2", "3"), ready) == ModelUnknown(
        ModelKey("nope2", "3"), "cached")
    assert len(rig.fetch.calls) - before == 2        # one round, on the model name only
    assert await d.lookup(ModelKey("a/b"), ready) == ModelUnknown(ModelKey("a/b"),
                                                                  "invalid_name")
    assert await d.lookup(SIMPLE, frozenset()) == NoWorkerReady(SIMPLE, "no_ready_worker", 1.0)
    # every answer above is cached: asking again costs nothing
    before = rig.served()
    for key in (SIMPLE, ModelKey("other"), ModelKey("simple", "9"), ModelKey("nope")):
        assert d.lookup_nowait(key, ready) is not None
        await d.lookup(key, ready)
    assert rig.served() == before
    assert rig.served() == len(rig.fetch.calls)
    assert "ModelDirectory" in repr(d)


async def test_concurrent_lookups_of_one_name_share_one_round(rig: SimRig) -> None:
    d = rig.directory()
    ready = frozenset(rig.ids)
    before = rig.served()
    results = await asyncio.gather(*(d.lookup(SIMPLE, ready) for _ in range(200)))
    assert all(isinstance(r, Found) and r.workers == ready for r in results)
    # one /ready per worker, one /config: 3 requests for 200 lookups
    assert rig.served() - before == 3
    assert (rig.fetch.count("/ready"), rig.fetch.count("/config")) == (2, 1)
    assert d.statistics().rounds_started == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_round(rig: SimRig) -> None:
    d = rig.directory()
    ready = frozenset(rig.ids)
    first = asyncio.ensure_future(d.lookup(SIMPLE, ready))
    second = asyncio.ensure_future(d.lookup(SIMPLE, ready))
    await asyncio.sleep(0)
    first.cancel()
    assert isinstance(await second, Found)
    assert d.statistics().rounds_in_flight == 0


async def test_a_hung_worker_costs_one_timeout_and_gives_a_retryable_answer(
        rig: SimRig) -> None:
    rig.sim.set_fault(0, hang=True)
    d = rig.directory(probe_timeout_s=0.2)
    ready = frozenset(rig.ids)
    started = time.monotonic()
    found = await d.lookup(SIMPLE, ready)
    assert isinstance(found, Found) and found.workers == {rig.ids[1]}
    assert await d.lookup(ModelKey("nope"), ready) == NoWorkerReady(
        ModelKey("nope"), "probe_failed", 1.0)
    assert time.monotonic() - started < 2.0
    assert d.statistics().probe_failures == 2


async def test_refresh_teaches_a_worker_that_joined_later(rig: SimRig) -> None:
    d = rig.directory()
    w0, w1 = rig.ids
    assert (await d.lookup(SIMPLE, {w0})) == Found(
        SIMPLE, frozenset({w0}), ModelFacts(64, False, 4, False), cached=False)
    d.on_worker_models(w1, [])                 # w1 joins, its index says nothing
    await d.refresh_worker(w1)
    assert d.catalog.workers_for(SIMPLE) == {w0, w1}
    found = d.lookup_nowait(SIMPLE, {w0, w1})
    assert isinstance(found, Found) and found.workers == {w0, w1}
    d.forget_worker(w0)
    assert d.catalog.workers_for(SIMPLE) == {w1}


async def test_a_flood_of_random_names_costs_a_bounded_number_of_probes(rig: SimRig) -> None:
    rate, burst = 20.0, 10
    d = rig.directory(rounds_per_s=rate, round_burst=burst, max_rounds_in_flight=8)
    ready = frozenset(rig.ids)
    assert isinstance(await d.lookup(SIMPLE, ready), Found)
    before, sent_before = rig.served(), len(rig.fetch.calls)
    started = time.monotonic()
    names = _random_names(1000, seed=1)
    # all at once ...
    burst_results = await asyncio.gather(*(d.lookup(ModelKey(n), ready) for n in names[:500]))
    # ... then one after another, as fast as the loop goes
    serial_results = [await d.lookup(ModelKey(n), ready) for n in names[500:]]
    elapsed = time.monotonic() - started
    probes = rig.served() - before
    assert probes == len(rig.fetch.calls) - sent_before
    max_rounds = burst + rate * elapsed + 1
    assert probes <= max_rounds * len(ready), (probes, elapsed)
    results = burst_results + serial_results
    assert all(isinstance(r, ModelUnknown | Deferred) for r in results)
    assert sum(isinstance(r, Deferred) for r in results) >= 1000 - max_rounds
    stats = d.statistics()
    assert stats.rounds_started <= max_rounds and stats.rounds_in_flight == 0
    # the flood evicted no model, and a real name is found once a round is allowed again
    assert d.lookup_nowait(SIMPLE, ready) == Found(SIMPLE, ready, ModelFacts(64, False, 4, False),
                                                   cached=True)
    await asyncio.sleep(1.5 / rate)
    assert isinstance(await d.lookup(ModelKey("other"), ready), Found)


# ------------------------------------------------------------------ the directory, real Triton

@pytest.fixture
async def triton_fetch(triton_fleet: TritonFleet) -> AsyncIterator[CountingFetch]:
    """Pools to the session's real Triton workers (``conftest.triton_fleet``)."""
    ports = [("127.0.0.1", w.ports.http) for w in triton_fleet.workers]
    fetch = CountingFetch(_pools(ports))
    try:
        yield fetch
    finally:
        await fetch.aclose()


@pytest.mark.triton
async def test_real_triton_models_are_found_by_asking(triton_fetch: CountingFetch) -> None:
    d = ModelDirectory(triton_fetch)
    ready = frozenset(triton_fetch.pools)
    found = await d.lookup(ModelKey("add_sub"), ready)       # not in PyTriton's index
    assert isinstance(found, Found) and found.workers == ready
    assert found.facts == ModelFacts(max_batch_size=64, dynamic_batching=True, instances=1,
                                     decoupled=False, max_queue_delay_us=500)
    identity = await d.lookup(ModelKey("identity"), ready)
    assert isinstance(identity, Found) and identity.facts is not None
    assert identity.facts.max_batch_size == 8
    assert isinstance(await d.lookup(ModelKey("add_sub", "1"), ready), Found)
    assert await d.lookup(ModelKey("add_sub", "9"), ready) == VersionUnknown(
        ModelKey("add_sub", "9"), "probed")
    assert await d.lookup(ModelKey("nope"), ready) == ModelUnknown(ModelKey("nope"), "probed")
    assert await d.lookup(ModelKey("nope", "2"), ready) == ModelUnknown(
        ModelKey("nope", "2"), "cached")
    odd = ModelKey("a b%2e?#")                              # quoted, so Triton gets it whole
    assert await d.lookup(odd, ready) == ModelUnknown(odd, "probed")


@pytest.mark.triton
async def test_real_triton_flood_of_random_names_is_bounded(
        triton_fetch: CountingFetch) -> None:
    rate, burst = 50.0, 20
    d = ModelDirectory(triton_fetch, DiscoveryLimits(rounds_per_s=rate, round_burst=burst))
    ready = frozenset(triton_fetch.pools)
    names = _random_names(1000, seed=2)
    started = time.monotonic()
    results = await asyncio.gather(*(d.lookup(ModelKey(n), ready) for n in names[:500]))
    results += [await d.lookup(ModelKey(n, "1"), ready) for n in names[500:]]
    elapsed = time.monotonic() - started
    max_rounds = burst + rate * elapsed + 1
    assert len(triton_fetch.calls) <= max_rounds * len(ready), (len(triton_fetch.calls), elapsed)
    assert all(isinstance(r, ModelUnknown | Deferred) for r in results)
    print(f"1000 random names: {len(triton_fetch.calls)} requests to {len(ready)} workers "
          f"in {elapsed:.2f} s")
    await asyncio.sleep(1.5 / rate)
    assert isinstance(await d.lookup(ModelKey("add_sub"), ready), Found)
