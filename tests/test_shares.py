"""Replicas sharing one fleet (pure): the share arithmetic of ``gateway.core.shares`` as tables
and properties, and the membership hub of ``gateway serve --processes N`` with a fake clock."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.shares import (
    Allocation,
    Report,
    WorkerModel,
    allocate,
    apportion,
    deal,
    fallback,
    fleet_limits,
    median_low,
    peers_in_flight,
    quotas,
    wants,
    water_fill,
)
from gateway.engine import hub
from gateway.engine.coordinator import Coordinator
from gateway.engine.hub import Hub, HubClient, HubUnavailable

REPO = Path(__file__).resolve().parents[1]


def report(member: str, limits: Mapping[WorkerModel, int] | None = None,
           demand: Mapping[str, Mapping[str, float]] | None = None,
           in_flight: Mapping[WorkerModel, int] | None = None) -> Report:
    return Report(member=member, demand=demand or {}, limits=limits or {},
                  in_flight=in_flight or {})


def fleet_of(workers: Mapping[str, int], model: str = "m") -> dict[WorkerModel, int]:
    return {(w, model): n for w, n in workers.items()}


def rows(reports: list[Report], weights: Mapping[str, float] | None = None
         ) -> dict[str, Allocation]:
    """Every member's own row, each computed as that member would."""
    return {r.member: allocate(reports, r.member, weights or {}) for r in reports}


def column_sums(table: Mapping[str, Allocation]) -> dict[WorkerModel, int]:
    out: dict[WorkerModel, int] = {}
    for a in table.values():
        for key, n in a.units.items():
            out[key] = out.get(key, 0) + n
    return out


# ------------------------------------------------------------------------------ water_fill

@pytest.mark.parametrize(("total", "claims", "weights", "expected"), [
    # one claim satisfied, the other takes what it leaves
    (10, {"a": 2, "b": 20}, {}, {"a": 2, "b": 8}),
    # both unsatisfied: by weight
    (10, {"a": 20, "b": 20}, {"a": 3, "b": 1}, {"a": 7.5, "b": 2.5}),
    # every claim satisfied: the rest is left over, nobody gets more than it claims
    (10, {"a": 1, "b": 1}, {}, {"a": 1, "b": 1}),
    # no claim, nothing
    (10, {"a": 0, "b": 5}, {}, {"a": 0, "b": 5}),
    (0, {"a": 4, "b": 5}, {}, {"a": 0, "b": 0}),
    (10, {}, {}, {}),
    # a small claim satisfied first, the rest by weight 3:1
    (12, {"a": 2, "b": 100, "c": 100}, {"b": 3}, {"a": 2, "b": 7.5, "c": 2.5}),
    # a weighted claim that its weight over-serves is satisfied, its leftover re-shared
    (10, {"a": 1, "b": 100}, {"a": 9}, {"a": 1, "b": 9}),
])
def test_water_fill(total: float, claims: dict[str, float], weights: dict[str, float],
                    expected: dict[str, float]) -> None:
    got = water_fill(total, claims, weights)
    assert got == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1000), st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 500)),
       st.dictionaries(st.sampled_from("abcdef"), st.floats(0.1, 10)))
def test_water_fill_never_over_claims_and_uses_what_it_can(
        total: float, claims: dict[str, float], weights: dict[str, float]) -> None:
    got = water_fill(total, claims, weights)
    assert set(got) == set(claims)
    for k, c in claims.items():
        assert 0.0 <= got[k] <= c + 1e-6
    # all of total is handed out, unless every claim is satisfied
    assert sum(got.values()) == pytest.approx(min(total, sum(claims.values())), abs=1e-6)


# ------------------------------------------------------------------------------ quotas

@pytest.mark.parametrize(("total", "demand", "weights", "expected"), [
    # one tenant, saturated: proportional to each member's demand
    (10, {"a": {"t": 80}, "b": {"t": 10}, "c": {"t": 10}}, {}, {"a": 8, "b": 1, "c": 1}),
    (100, {"a": {"t": 800}, "b": {"t": 100}, "c": {"t": 100}}, {},
     {"a": 80, "b": 10, "c": 10}),
    # demand below the total: the spare by demand + 1 (a: 2 + 8 × 3/4, b: 8 × 1/4)
    (10, {"a": {"t": 2}}, {}, {"a": 8, "b": 2}),
    (12, {}, {}, {"a": 4, "b": 4, "c": 4}),
    # tenants weighted 3:1 entering through different members: their weights' shares
    (12, {"a": {"x": 100}, "b": {"y": 100}}, {"x": 3, "y": 1}, {"a": 9, "b": 3}),
    # one tenant through both members, another through one: tenant halves, then by demand
    (10, {"a": {"x": 100}, "b": {"x": 100, "y": 100}}, {}, {"a": 2.5, "b": 7.5}),
    # a member with no demand at all while others saturate: nothing spare, nothing for it
    (10, {"a": {"t": 50}, "b": {"t": 50}}, {}, {"a": 5, "b": 5, "c": 0}),
])
def test_quotas(total: float, demand: dict[str, dict[str, float]], weights: dict[str, float],
                expected: dict[str, float]) -> None:
    got = quotas(total, demand, weights, sorted(expected))
    assert got == pytest.approx(expected)
    assert sum(got.values()) == pytest.approx(total)


@pytest.mark.parametrize(("weights", "fractions"), [
    ({"x": 3, "y": 1}, (0.75, 0.25)),
    ({"x": 1, "y": 1}, (0.5, 0.5)),
    ({"x": 1, "y": 4}, (0.2, 0.8)),
])
def test_weighted_tenants_through_different_members_get_their_weights(
        weights: dict[str, float], fractions: tuple[float, float]) -> None:
    """Tenant x only through member a, y only through b, both saturating 12 units of a
    model on 3 workers: the whole table (everyone's rows) gives x and y their weights'
    parts of the units."""
    limits = fleet_of({"w1": 4, "w2": 4, "w3": 4})
    reports = [report("a", limits, {"m": {"x": 500}}), report("b", limits, {"m": {"y": 500}})]
    table = rows(reports, weights)
    got = tuple(sum(table[m].units.values()) / 12 for m in ("a", "b"))
    assert got == pytest.approx(fractions, abs=1 / 12)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 500), st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.dictionaries(st.sampled_from(["x", "y", ""]), st.floats(0, 300), max_size=3),
    max_size=4), st.dictionaries(st.sampled_from(["x", "y", ""]), st.floats(0.1, 10)))
def test_quotas_hand_out_the_whole_total(total: float,
                                         demand: dict[str, dict[str, float]],
                                         weights: dict[str, float]) -> None:
    members = sorted(set(demand) | {"a"})
    got = quotas(total, demand, weights, members)
    assert set(got) == set(members)
    assert all(v >= 0 for v in got.values())
    assert sum(got.values()) == pytest.approx(total, rel=1e-9, abs=1e-6)


# ------------------------------------------------------------------------------ apportion

@pytest.mark.parametrize(("total", "shares", "wanting", "expected"), [
    (10, {"a": 7.5, "b": 2.5}, ["a", "b"], {"a": 8, "b": 2}),
    # too few units for everyone who wants one: the largest shares, then ids, first
    (2, {"a": 0.5, "b": 0.5, "c": 0.5}, ["a", "b", "c"], {"a": 1, "b": 1, "c": 0}),
    (2, {"a": 0.1, "b": 0.5, "c": 0.3}, ["a", "b", "c"], {"a": 0, "b": 1, "c": 1}),
    # at least one unit per member with demand while units last
    (3, {"a": 0.1, "b": 0.1, "c": 2.8}, ["a", "b", "c"], {"a": 1, "b": 1, "c": 1}),
    (8, {"a": 7.9, "b": 0.05, "c": 0.05}, ["a", "b", "c"], {"a": 6, "b": 1, "c": 1}),
    # a member without demand gets no unit first
    (3, {"a": 0.1, "b": 0.1, "c": 2.8}, ["c"], {"a": 0, "b": 0, "c": 3}),
    # nobody wants any: evenly in id order
    (5, {"b": 0.0, "a": 0.0}, [], {"a": 3, "b": 2}),
    # ties of remainders go by member id
    (4, {"c": 4 / 3, "b": 4 / 3, "a": 4 / 3}, [], {"a": 2, "b": 1, "c": 1}),
    (0, {"a": 1.0, "b": 2.0}, ["a", "b"], {"a": 0, "b": 0}),
])
def test_apportion(total: int, shares: dict[str, float], wanting: list[str],
                   expected: dict[str, int]) -> None:
    assert apportion(total, shares, wanting) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 64), st.dictionaries(st.sampled_from("abcdefgh"), st.floats(0, 50),
                                           min_size=1), st.data())
def test_apportion_sums_to_the_total_with_one_unit_each_first(
        total: int, raw: dict[str, float], data: st.DataObject) -> None:
    scale = sum(raw.values())
    # real-valued shares of the total, as quotas gives them
    shares = ({m: v * total / scale for m, v in raw.items()} if scale > 0
              else {m: total / len(raw) for m in raw})
    wanting = data.draw(st.lists(st.sampled_from(sorted(raw)), unique=True))
    got = apportion(total, shares, wanting)
    assert sum(got.values()) == total
    assert all(n >= 0 for n in got.values())
    if total >= len(wanting):
        assert all(got[m] >= 1 for m in wanting), (got, wanting)
    # the same whatever order the wanting come in (allocate passes the shares in id order)
    assert apportion(total, shares, list(reversed(wanting))) == got


# ------------------------------------------------------------------------------ deal

@pytest.mark.parametrize(("units", "counts", "order", "expected"), [
    ({"w1": 3, "w2": 3, "w3": 2}, {"a": 3, "b": 3, "c": 2}, ["a", "b", "c"],
     {"a": {"w1": 1, "w2": 1, "w3": 1}, "b": {"w1": 1, "w2": 1, "w3": 1},
      "c": {"w1": 1, "w2": 1}}),
    # a member's units cover as many workers as they can, round by round
    ({"w1": 4, "w2": 4}, {"a": 6, "b": 2}, ["a", "b"],
     {"a": {"w1": 3, "w2": 3}, "b": {"w1": 1, "w2": 1}}),
    # the order decides who gets which worker
    ({"w1": 1, "w2": 1}, {"a": 1, "b": 1}, ["b", "a"], {"b": {"w1": 1}, "a": {"w2": 1}}),
    # a member without units gets none
    ({"w1": 2}, {"a": 2}, ["a", "b"], {"a": {"w1": 2}, "b": {}}),
    ({}, {"a": 0}, ["a"], {"a": {}}),
])
def test_deal(units: dict[str, int], counts: dict[str, int], order: list[str],
              expected: dict[str, dict[str, int]]) -> None:
    assert deal(units, counts, order) == expected


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["w1", "w2", "w3", "w4"]), st.integers(0, 12),
                       min_size=1), st.data())
def test_deal_spreads_every_unit_once(units: dict[str, int], data: st.DataObject) -> None:
    members = ["a", "b", "c"]
    total = sum(units.values())
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=2)))
    counts = {"a": cuts[0], "b": cuts[1] - cuts[0], "c": total - cuts[1]}
    out = deal(units, counts, members)
    per_worker: dict[str, int] = {}
    for m in members:
        assert sum(out[m].values()) == counts[m]
        for w, n in out[m].items():
            per_worker[w] = per_worker.get(w, 0) + n
    assert per_worker == {w: n for w, n in units.items() if n > 0}


def test_deal_gives_a_small_share_distinct_workers() -> None:
    units = {f"w{i}": 4 for i in range(5)}
    out = deal(units, {"a": 3, "b": 17}, ["a", "b"])
    assert out["a"] == {"w0": 1, "w1": 1, "w2": 1}          # three units, three workers
    assert set(out["b"]) == set(units)


# ------------------------------------------------------------------------------ fleet limits

@pytest.mark.parametrize(("values", "expected"), [
    ([4], 4), ([8, 6], 6), ([8, 6, 12], 8), ([1, 2, 3, 4], 2), ([5, 5, 100], 5),
    ([100, 1, 1], 1),
])
def test_median_low(values: list[int], expected: int) -> None:
    assert median_low(values) == expected


def test_fleet_limits_are_the_median_low_of_the_members_figures() -> None:
    reports = [
        report("a", {("w1", "m"): 8, ("w2", "m"): 4, ("w3", ""): 16}),
        report("b", {("w1", "m"): 6, ("w2", "m"): 40}),
        report("c", {("w1", "m"): 12}),
    ]
    # w1: [8, 6, 12] → 8; w2: [4, 40] → 4 (a noisy figure is not taken); w3: a's alone
    assert fleet_limits(reports) == {("w1", "m"): 8, ("w2", "m"): 4, ("w3", ""): 16}
    assert allocate(reports, "a", {}).fleet == fleet_limits(reports)


# ------------------------------------------------------------------------------ allocate

def test_idle_members_share_evenly_and_a_leaver_gives_its_units_to_the_others() -> None:
    limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
    three = [report(m, limits) for m in ("a", "b", "c")]
    table = rows(three)
    assert sorted(sum(a.units.values()) for a in table.values()) == [8, 8, 8]
    assert column_sums(table) == limits
    assert all(a.members == ("a", "b", "c") for a in table.values())
    # every member can use every worker
    assert all(n >= 1 for a in table.values() for n in a.units.values())
    assert sum(a.share() for a in table.values()) == pytest.approx(1.0)

    two = [r for r in three if r.member != "b"]            # b's report expired
    after = rows(two)
    assert sorted(sum(a.units.values()) for a in after.values()) == [12, 12]
    assert column_sums(after) == limits
    assert all(after[m].of(w, "m") >= table[m].of(w, "m") for m in ("a", "c")
               for w in ("w1", "w2", "w3"))
    assert sum(a.share() for a in after.values()) == pytest.approx(1.0)


def test_shares_follow_demand_with_one_unit_for_every_member_with_demand() -> None:
    limits = fleet_of({"w1": 4, "w2": 4, "w3": 4})
    reports = [report("a", limits, {"m": {"": 80}}), report("b", limits, {"m": {"": 10}}),
               report("c", limits, {"m": {"": 10}})]
    table = rows(reports)
    assert {m: sum(a.units.values()) for m, a in table.items()} == \
        {"a": 10, "b": 1, "c": 1}
    assert column_sums(table) == limits
    assert table["a"].share() == pytest.approx(10 / 12)


def test_a_worker_budget_without_models_counts_every_models_demand() -> None:
    limits = {("w1", ""): 6, ("w2", ""): 6}
    reports = [report("a", limits, {"m1": {"": 50}, "m2": {"": 50}}), report("b", limits)]
    table = rows(reports)
    assert table["a"].units == {("w1", ""): 6, ("w2", ""): 6}
    assert table["b"].units == {("w1", ""): 0, ("w2", ""): 0}
    assert table["b"].share() == 0.0


def test_allocate_needs_me_among_the_reports() -> None:
    with pytest.raises(ValueError, match="not among"):
        allocate([report("a", {("w", "m"): 4})], "z", {})


def test_a_lone_member_gets_the_whole_fleet() -> None:
    limits = fleet_of({"w1": 3, "w2": 5}) | {("w1", "n"): 2}
    a = allocate([report("a", limits)], "a", {})
    assert a.units == limits and a.share() == 1.0 and a.members == ("a",)
    assert a.of("w1", "m") == 3 and a.of("nowhere", "m") == 0


def test_no_fleet_yet_is_a_whole_share() -> None:
    assert allocate([report("a")], "a", {}).share() == 1.0


WORKERS = ["w1", "w2", "w3", "w4"]
MODELS = ["", "m", "n"]


@st.composite
def fleets(draw: st.DrawFn) -> list[Report]:
    """1–7 members, each with its own learned limits (they disagree a little), demand per
    model and tenant, some members knowing only some workers."""
    n = draw(st.integers(1, 7))
    names = draw(st.lists(st.text("abcdefxyz:0123456789", min_size=1, max_size=8),
                          min_size=n, max_size=n, unique=True))
    keys = draw(st.lists(st.tuples(st.sampled_from(WORKERS), st.sampled_from(MODELS)),
                         min_size=1, max_size=8, unique=True))
    out = []
    for name in names:
        known = draw(st.lists(st.sampled_from(keys), unique=True))
        limits = {k: draw(st.integers(0, 24)) for k in known}
        demand = draw(st.dictionaries(
            st.sampled_from(MODELS),
            st.dictionaries(st.sampled_from(["", "x", "y"]),
                            st.floats(0, 200, allow_nan=False) | st.just(0.0), max_size=3),
            max_size=3))
        out.append(report(name, limits, demand))
    return out


@settings(max_examples=150, deadline=None)
@given(fleets(), st.dictionaries(st.sampled_from(["", "x", "y"]), st.floats(0.1, 10)),
       st.randoms(use_true_random=False))
def test_every_members_row_adds_up_to_each_fleet_limit(
        reports: list[Report], weights: dict[str, float], rng: random.Random) -> None:
    table = rows(reports, weights)
    limits = fleet_limits(reports)
    # every member computes the same fleet, the same members, and its rows add up
    assert all(a.fleet == limits for a in table.values())
    assert {a.members for a in table.values()} == {tuple(sorted(r.member for r in reports))}
    sums = column_sums(table)
    assert set(sums) == set(limits)
    for key, limit in limits.items():
        assert sums[key] == limit, (key, sums[key], limit)
    for a in table.values():
        assert all(n >= 0 for n in a.units.values())
    # the reports' order does not matter: each member computes the same row
    shuffled = list(reports)
    rng.shuffle(shuffled)
    for r in reports:
        assert allocate(shuffled, r.member, dict(reversed(list(weights.items())))) == \
            table[r.member]


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_members_with_demand_get_a_unit_of_every_model_that_has_enough(
        reports: list[Report]) -> None:
    table = rows(reports)
    for model in MODELS:
        total = sum(n for (_, m), n in fleet_limits(reports).items() if m == model)
        if model == "":
            wanting = [r.member for r in reports
                       if sum(sum(t.values()) for t in r.demand.values()) > 0]
        else:
            wanting = [r.member for r in reports if sum(r.demand.get(model, {}).values()) > 0]
        if total == 0 or total < len(wanting):
            continue
        for m in wanting:
            assert sum(n for (_, mm), n in table[m].units.items() if mm == model) >= 1, \
                (model, m, table[m].units)


# Each replica is its own process, with its own string-hash seed (PYTHONHASHSEED is random
# by default): the table must not depend on it. Tenants x, y, z weighted 0.1/0.2/0.3 saturate
# 9 units through a, b, c: a's 4.5 and c's 1.5 tie exactly on their remainders.
TIE_SCRIPT = """
import json, sys
from gateway.core.shares import Report, allocate
lim = {("w1", "m"): 9}
reps = [Report(m, demand={"m": {t: 1000.0}}, limits=lim) for m, t in
        (("a", "z"), ("b", "y"), ("c", "x"))]
w = {"x": 0.1, "y": 0.2, "z": 0.3}
print(json.dumps({r.member: allocate(reps, r.member, w).units["w1", "m"] for r in reps}))
"""


def test_every_process_computes_the_same_table_whatever_its_hash_seed() -> None:
    tables = set()
    for seed in range(8):
        out = subprocess.run([sys.executable, "-c", TIE_SCRIPT], capture_output=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}, cwd=REPO,
                             timeout=60, check=True)
        tables.add(out.stdout.strip())
    assert len(tables) == 1, tables


def test_an_absurd_limit_in_a_damaged_report_costs_no_more_than_a_real_one() -> None:
    damaged = Report.from_json({"member": "b", "limits": {"w9": {"m": 3 * 10 ** 6}}})
    assert damaged is not None
    started = time.perf_counter()
    allocate([report("a", {("w1", "m"): 8}), damaged], "a", {})
    assert time.perf_counter() - started < 0.1


# ------------------------------------------------------------------------------ fallback

def test_fallback_keeps_the_last_known_allocation() -> None:
    last = allocate([report("a", {("w", "m"): 8}), report("b", {("w", "m"): 8})], "a", {})
    assert fallback(last, {("w", "m"): 20, ("v", "m"): 4}, 5) is last


@pytest.mark.parametrize(("own", "seen", "expected"), [
    ({("w1", "m"): 8, ("w2", "m"): 2, ("w3", "m"): 0}, 3, {("w1", "m"): 2, ("w2", "m"): 1,
                                                         ("w3", "m"): 0}),
    ({("w1", ""): 9}, 3, {("w1", ""): 3}),
    ({("w1", ""): 9}, 0, {("w1", ""): 9}),          # none seen: this replica alone
    ({("w1", ""): 9}, 1, {("w1", ""): 9}),
    ({("w1", "m"): 1}, 4, {("w1", "m"): 1}),        # at least one unit
    ({}, 3, {}),
])
def test_fallback_without_one_is_a_1_over_n_share_of_own_limits(
        own: dict[WorkerModel, int], seen: int, expected: dict[WorkerModel, int]) -> None:
    a = fallback(None, own, seen)
    assert a.units == expected
    assert a.fleet == own and a.members == ()


def test_peers_in_flight_sums_the_others() -> None:
    reports = [report("a", in_flight={("w", "m"): 3}), report("b", in_flight={("w", "m"): 2}),
               report("c", in_flight={("w", "m"): 1, ("v", ""): 4})]
    assert peers_in_flight(reports, "a") == {("w", "m"): 3, ("v", ""): 4}
    assert peers_in_flight(reports, "zz") == {("w", "m"): 6, ("v", ""): 4}


# ------------------------------------------------------------------------------ reports

def test_report_round_trips_through_json() -> None:
    r = Report(member="host:12:ab", demand={"m": {"": 3.0, "acme": 1.5}, "n": {}},
               limits={("w1", "m"): 8, ("w1", "n"): 2, ("w2", ""): 4},
               in_flight={("w1", "m"): 5, ("w2", ""): 0},
               counters={"arrivals:m": 10.0, "saturation_s": 0.25},
               held={("w1", "m"): 6, ("w2", ""): 1})
    wire = json.dumps(r.to_json())
    assert Report.from_json(json.loads(wire)) == r
    assert Report.from_json(json.loads(json.dumps(Report("x").to_json()))) == Report("x")


@pytest.mark.parametrize("data", [
    None, [], "report", 3, {"demand": {}},                      # not a report
    {"member": 7},
    {"member": "a", "demand": {"m": {"t": "3"}}},                # a string for a number
    {"member": "a", "limits": {"w": {"m": "8"}}},
    {"member": "a", "in_flight": {"w": {"m": None}}},
    {"member": "a", "counters": {"arrivals:m": "many"}},
    {"member": "a", "limits": {"w": {"m": True}}},               # a bool is no number
    {"member": "a", "demand": {"m": {"t": math.nan}}},           # not finite
    {"member": "a", "counters": {"saturation_s": math.inf}},
    {"member": "a", "limits": {"w": {"m": -math.inf}}},
])
def test_from_json_rejects_damaged_reports_without_raising(data: object) -> None:
    assert Report.from_json(data) is None


def test_from_json_reads_nan_written_by_json_as_damage() -> None:
    raw = '{"member": "a", "demand": {"m": {"t": NaN}}}'
    assert Report.from_json(json.loads(raw)) is None


def test_from_json_clamps_and_ignores_what_it_cannot_use() -> None:
    r = Report.from_json({"member": "a", "demand": {"m": {"t": -4}}, "limits": {"w": 3},
                          "in_flight": {"w": {"m": -2}}, "future_field": 1})
    assert r == Report("a", demand={"m": {"t": 0.0}}, in_flight={("w", "m"): 0})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(JSON, JSON, JSON, JSON)
def test_from_json_never_raises(demand: object, limits: object, in_flight: object,
                                counters: object) -> None:
    data = {"member": "a", "demand": demand, "limits": limits, "in_flight": in_flight,
            "counters": counters}
    r = Report.from_json(data)
    if r is not None:
        assert all(n >= 0 for n in r.limits.values())
        assert all(math.isfinite(v) and v >= 0 for t in r.demand.values() for v in t.values())
    assert Report.from_json(demand) is None or isinstance(demand, dict)


# ------------------------------------------------------------------------------ the hub

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def live(reply: tuple[object, list[object]]) -> list[str]:
    return sorted(str(r) for r in reply[1])


def test_hub_report_lives_for_its_lease() -> None:
    clock = FakeClock()
    h = Hub(clock=clock)
    assert live(h.exchange("a", "ra", 1.5)) == ["ra"]
    clock.now = 1.0
    assert live(h.exchange("b", "rb", 1.5)) == ["ra", "rb"]
    clock.now = 1.49
    assert live(h.exchange("b", "rb2", 1.5)) == ["ra", "rb2"]
    clock.now = 1.5                                      # a's lease ends now
    assert live(h.exchange("b", "rb3", 1.5)) == ["rb3"]
    clock.now = 2.9
    assert live(h.exchange("a", "ra2", 1.5)) == ["ra2", "rb3"]   # a is back
    clock.now = 4.5
    assert live(h.exchange("c", "rc", 0.0)) == ["rc"]   # a and b expired; a tiny lease…
    clock.now = 4.549
    assert live(h.exchange("d", "rd", 1.0)) == ["rc", "rd"]      # …lives 0.05 s
    clock.now = 4.55
    assert live(h.exchange("d", "rd", 1.0)) == ["rd"]
    assert repr(h) == "<Hub members=1>"


def test_hub_leave_removes_a_member_at_once() -> None:
    clock = FakeClock()
    h = Hub(clock=clock)
    h.exchange("a", "ra", 10.0)
    h.exchange("b", "rb", 10.0)
    h.leave("a")
    h.leave("never-there")
    assert live(h.exchange("b", "rb", 10.0)) == ["rb"]


def test_hub_holds_a_bounded_number_of_members() -> None:
    clock = FakeClock()
    h = Hub(clock=clock)
    for i in range(hub.MAX_MEMBERS + 10):
        reply = h.exchange(f"m{i:04d}", i, 5.0)[1]
    assert len(reply) == hub.MAX_MEMBERS
    assert hub.MAX_MEMBERS + 5 not in reply              # a newcomer past the bound: not kept
    # members already in keep refreshing their reports
    assert "new" in h.exchange("m0000", "new", 5.0)[1]
    # once leases run out, there is room again
    clock.now = 5.0
    assert h.exchange("late", "late", 5.0)[1] == ["late"]


async def test_hub_over_its_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "hub.sock")
    h = Hub()
    await h.start(path)
    a, b = HubClient(path), HubClient(path)
    try:
        _, got = await a.exchange("a", b'{"member": "a"}', b"{}", 1.0, timeout_s=2.0)
        assert [json.loads(x) for x in got] == [{"member": "a", "held": {}}]
        _, got = await b.exchange("b", b'{"member": "b"}', b"{}", 1.0, timeout_s=2.0)
        assert sorted(json.loads(x)["member"] for x in got) == ["a", "b"]
        await a.leave("a", timeout_s=2.0)
        _, got = await b.exchange("b", b'{"member": "b"}', b"{}", 1.0, timeout_s=2.0)
        assert [json.loads(x)["member"] for x in got] == ["b"]
        # a damaged line: the hub drops the connection, the client says so and reconnects
        with pytest.raises(HubUnavailable):
            await a.exchange("a", b"{not json", b"{}", 1.0, timeout_s=2.0)
        _, got = await a.exchange("a", b"[]", b"{}", 1.0, timeout_s=2.0)
        assert len(got) == 2
    finally:
        await a.aclose()
        await b.aclose()
        await h.close()
    with pytest.raises(HubUnavailable):          # the hub gone
        await asyncio.wait_for(a.exchange("a", b"{}", b"{}", 1.0, timeout_s=1.0), 5.0)


# ------------------------------------------------------------------------------ heartbeats

class HubExchange:
    """The coordinator's exchange through an in-process hub (the children's HubClient does
    the same over the hub's socket)."""

    def __init__(self, h: Hub) -> None:
        self.hub = h

    async def exchange(self, member: str, payload: bytes, want: bytes, lease_s: float, *,
                       timeout_s: float) -> tuple[bytes, list[bytes]]:
        granted, reports = self.hub.exchange(member, json.loads(payload), lease_s,
                                             json.loads(want))
        return json.dumps(granted).encode(), [json.dumps(r).encode() for r in reports]

    async def leave(self, member: str, *, timeout_s: float) -> None:
        self.hub.leave(member)

    async def aclose(self) -> None:
        pass


class Replicas:
    """Coordinators of replicas ``a``, ``b``, ``c`` on one hub and one fake clock, each
    reporting the fleet's limits and its own demand; they beat in turn, a third of a
    heartbeat apart, as replicas started at different moments do."""

    HEARTBEAT_S = 0.25

    def __init__(self, limits: Mapping[WorkerModel, int]) -> None:
        self.clock = FakeClock()
        self.hub = Hub(clock=self.clock)
        self.limits = dict(limits)
        self.demand = {m: 0.0 for m in ("a", "b", "c")}
        self.coordinators = {m: self._coordinator(m) for m in self.demand}
        self.worst: dict[WorkerModel, int] = {}   # the most units held at once, all rows

    def _coordinator(self, member: str) -> Coordinator:
        def report() -> Report:
            return Report(member, demand={"m": {"": self.demand[member]}}, limits=self.limits)

        return Coordinator(HubExchange(self.hub), via="test", report=report, weights=dict,
                           on_change=lambda: None, heartbeat_s=self.HEARTBEAT_S,
                           lease_s=6 * self.HEARTBEAT_S, member=member, clock=self.clock)

    def rows_summed(self) -> dict[WorkerModel, int]:
        out: dict[WorkerModel, int] = {}
        for c in self.coordinators.values():
            if c.allocation is not None:
                for key, n in c.allocation.units.items():
                    out[key] = out.get(key, 0) + n
        return out

    async def settle(self, members: str = "abc", beats: int = 12) -> bool:
        """Beat until the rows add up to the fleet's limits (at most ``beats`` heartbeats)."""
        for _ in range(beats):
            await self.beat(members)
            if self.rows_summed() == self.limits and all(
                    self.coordinators[m].statistics().members == len(members) for m in members):
                return True
        return False

    async def beat(self, members: str = "abc") -> None:
        for m in members:
            self.clock.now += self.HEARTBEAT_S / 3
            await self.coordinators[m].tick()
            for key, n in self.rows_summed().items():
                self.worst[key] = max(self.worst.get(key, 0), n)


async def test_heartbeats_share_the_fleet_and_a_leaver_gives_its_share_back() -> None:
    limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
    r = Replicas(limits)
    assert await r.settle(), r.rows_summed()
    assert all(c.statistics().members == 3 and c.statistics().healthy
               for c in r.coordinators.values())
    await r.coordinators.pop("b").close(owns_exchange=True)     # a clean stop: it leaves
    a, c = r.coordinators["a"], r.coordinators["c"]
    assert await r.settle("ac")
    assert a.statistics().members == c.statistics().members == 2
    assert {key: (a.units(*key) or 0) + (c.units(*key) or 0) for key in limits} == limits
    assert a.units("nowhere", "m") is None


async def test_demand_rising_at_every_replica_keeps_the_rows_within_the_limit() -> None:
    """Settled idle replicas, then 12 requests waiting at each (the fleet's 24 units over 3
    workers): at every moment the units all replicas hold add up to at most each worker's 8."""
    limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
    r = Replicas(limits)
    assert await r.settle()
    r.worst.clear()
    for m in r.demand:
        r.demand[m] = 12.0
    assert await r.settle()
    assert r.worst == limits, r.worst


async def test_replicas_starting_together_never_hold_more_than_the_fleet_limit() -> None:
    limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
    r = Replicas(limits)
    assert await r.settle()
    assert r.worst == limits, r.worst


def test_a_want_holds_what_may_run_until_the_grant_comes_back() -> None:
    """The third figure of a want (held, as the others see it): in flight, or the units in
    use now where more; a (worker, model) outside the replica's limits is not asked for."""
    limits = fleet_of({"w1": 8, "w2": 8})
    got = wants(None, limits, {("w1", "m"): 3, ("w2", "m"): 1}, 2,
                in_use={("w1", "m"): 2, ("w2", "m"): 4, ("w9", "m"): 5})
    assert got == {("w1", "m"): (4, 8, 3), ("w2", "m"): (4, 8, 4)}
    assert wants(None, limits, {("w1", "m"): 3}, 2) == {("w1", "m"): (4, 8, 3),
                                                         ("w2", "m"): (4, 8, 0)}


class BusyReplicas(Replicas):
    """Replicas that keep every unit busy: at each report one request has just finished
    (in flight = units − 1), and another starts on the freed unit while the exchange is
    under way — so until its next report a replica may run its old units, whatever the
    grant that comes back. ``worst`` is what they may run at once, summed."""

    def __init__(self, limits: Mapping[WorkerModel, int]) -> None:
        super().__init__(limits)
        self.may_run: dict[str, dict[WorkerModel, int]] = {}

    def _coordinator(self, member: str) -> Coordinator:
        def report() -> Report:
            c = self.coordinators[member]
            units = c.allocation.units if c.allocation is not None else {}
            return Report(member, demand={"m": {"": self.demand[member]}}, limits=self.limits,
                          in_flight={k: max(0, n - 1) for k, n in units.items()})

        return Coordinator(HubExchange(self.hub), via="test", report=report, weights=dict,
                           on_change=lambda: None, heartbeat_s=self.HEARTBEAT_S,
                           lease_s=6 * self.HEARTBEAT_S, member=member, clock=self.clock)

    async def beat(self, members: str = "abc") -> None:
        for m in members:
            self.clock.now += self.HEARTBEAT_S / 3
            c = self.coordinators[m]
            old = dict(c.allocation.units) if c.allocation is not None else {}
            await c.tick()
            new = c.allocation.units if c.allocation is not None else {}
            self.may_run[m] = {k: max(old.get(k, 0), new.get(k, 0)) for k in {*old, *new}}
            summed: dict[WorkerModel, int] = {}
            for run in self.may_run.values():
                for key, n in run.items():
                    summed[key] = summed.get(key, 0) + n
            for key, n in summed.items():
                self.worst[key] = max(self.worst.get(key, 0), n)


async def test_a_unit_given_up_goes_to_another_replica_only_at_the_givers_next_beat() -> None:
    """Demand moves from replica a to b while every unit is busy. What a gives up reaches b
    only once a has reported again, after its smaller grant came back: at no moment can
    the requests the replicas may run exceed a worker's limit. (With a's in-flight alone
    counted as held, b raised into the unit a had just refilled during its exchange.)"""
    limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
    r = BusyReplicas(limits)
    for m in r.demand:
        r.demand[m] = 12.0
    assert await r.settle()
    r.worst.clear()
    r.demand.update(a=0.0, b=100.0)
    for _ in range(8):
        await r.beat()
    assert r.coordinators["b"].allocation is not None
    assert sum(r.coordinators["b"].allocation.units.values()) > 8   # b took a's units...
    assert all(r.worst[key] <= limits[key] for key in r.worst), (r.worst, limits)  # ...late


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 1.0, 5.0, 12.0, 100.0])),
                min_size=1, max_size=12))
def test_demand_moving_between_replicas_never_puts_rows_over_the_limit(
        changes: list[tuple[int, float]]) -> None:
    """Settled replicas; then, a tick at a time, one replica's demand changes before it
    beats: the units all replicas hold never add up to more than a worker's limit."""
    async def scenario() -> dict[WorkerModel, int]:
        limits = fleet_of({"w1": 8, "w2": 8, "w3": 8})
        r = Replicas(limits)
        assert await r.settle()
        r.worst.clear()
        for i, (who, demand) in enumerate(changes):
            r.demand["abc"[who]] = demand
            await r.beat("abc"[i % 3])
        await r.settle()
        return r.worst

    worst = asyncio.run(scenario())
    assert all(n <= 8 for n in worst.values()), worst


def test_the_hub_grants_one_member_at_a_time_against_the_others_holdings() -> None:
    """Two replicas both asking for all of a worker's 8 units: the first is granted 8, the
    second what is left (0); once the first lowers its want, the second may rise into it."""
    clock = FakeClock()
    h = Hub(clock=clock)
    want_all = {"w1": {"m": [8, 8, 0]}}
    granted_a, _ = h.exchange("a", {"member": "a"}, 1.5, want_all)
    granted_b, _ = h.exchange("b", {"member": "b"}, 1.5, want_all)
    assert granted_a == {"w1": {"m": 8}} and granted_b == {"w1": {"m": 0}}
    # a lowers to 3 but still has 5 in flight: it holds 5, b may take 3
    h.exchange("a", {"member": "a"}, 1.5, {"w1": {"m": [3, 8, 5]}})
    granted_b, reports = h.exchange("b", {"member": "b"}, 1.5, want_all)
    assert granted_b == {"w1": {"m": 3}}
    held = {r["member"]: r["held"]["w1"]["m"] for r in reports if isinstance(r, dict)}
    assert held == {"a": 5, "b": 3}
    # a's lease runs out: its holding no longer counts
    clock.now = 2.0
    granted_b, _ = h.exchange("b", {"member": "b"}, 1.5, want_all)
    assert granted_b == {"w1": {"m": 8}}


@pytest.mark.parametrize(("target", "limit", "others", "flying", "granted", "held"), [
    (5, 8, 0, 0, 5, 5),      # room: the target
    (5, 8, 6, 0, 2, 2),      # only what the others leave
    (5, 8, 9, 0, 0, 0),      # the others over the limit (a share just lowered): nothing
    (2, 8, 0, 4, 2, 4),      # lowered below what is in flight: holds the in-flight
    (0, 8, 0, 0, 0, 0),
])
def test_grant_units_table(target: int, limit: int, others: int, flying: int, granted: int,
                           held: int) -> None:
    from gateway.core.shares import grant_units
    key = ("w", "m")
    g, h = grant_units({key: (target, limit, flying)}, {key: others})
    assert (g[key], h[key]) == (granted, held)
