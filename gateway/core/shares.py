"""One fleet, many gateways: how replicas share each worker's concurrency budget (pure).

Several gateway replicas (or ``--processes N`` on one host) send to the same workers. Each
(worker, model) has one learned limit, the fleet's; the replicas hold *shares* of it, so the
sum of what all of them send stays within the limit and the queue stays in the gateways.

The rules, as Doorman's leases (youtube/doorman) but computed by every replica alike:

* **Reports.** Every heartbeat each replica publishes a :class:`Report`: its demand (requests
  waiting or in flight) per model and tenant, its learned limit and its in-flight count per
  (worker, model), and the counters the capacity signals are made of. A report lives for a
  lease (a few heartbeats); a replica that stops reporting drops out when it expires.
* **One function of the reports.** Every replica computes :func:`allocate` over the same
  live reports and keeps its own row, so no leader is needed and the rows add up.
* **The fleet's limit** of a (worker, model) is the median (low) of the limits the replicas
  learned: each learns from latency that reflects the worker's whole load, so their figures
  agree; the median ignores one replica's noisy figure.
* **Shares follow demand, weighted by tenant.** For each model the fleet's units (the sum of
  its limits over the workers) are divided among tenants by weighted max-min fairness over
  their demand summed over the replicas (``admission.tenants.*.weight``); each tenant's part
  goes to the replicas in proportion to its demand there. A slot held is GPU time held, so
  slot shares are GPU-second shares: tenant ``a`` entering only through one replica and
  ``b`` only through another still get their weights' shares. What demand leaves over goes
  by demand + 1 per replica: mostly where demand may grow next, a little to an idle replica
  so that its first request can start at once.
* **Granted atomically, raised only into what others gave up** (:func:`grant_units`): each
  heartbeat a replica asks for its target (from the last heartbeat's reports); the store
  that keeps the reports (one Lua script in Redis, the hub's one thread) grants it, one
  replica at a time, no more than the limit less what the others hold, and records what it
  then holds (its units, or its in-flight requests where more). A share falls at once and
  rises only into units the others gave up, so demand that moves (a herd at one replica)
  moves the shares over a heartbeat or two without two replicas ever holding the same units.
* **Whole units, spread over the workers.** The real-valued shares become integers by the
  largest remainder (every replica with demand gets at least one unit while there are
  units enough), and each replica's units are dealt across the workers in turn, so each
  replica can use every worker.

Bounded: at most :data:`MAX_KEYS` (worker, model) entries and :data:`MAX_TENANTS` tenants per
model are read from a report; reports beyond :data:`MAX_MEMBERS` are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_MEMBERS: Final = 256
MAX_KEYS: Final = 4096
MAX_TENANTS: Final = 256
MAX_UNITS: Final = 4096  # per (worker, model): more than any worker runs at once
ANONYMOUS: Final = ""    # the tenant of requests without an API key

WorkerModel = tuple[str, str]  # (worker id, model name; "" for a worker's whole budget)


@dataclass(frozen=True, slots=True)
class Report:
    """What one replica publishes each heartbeat."""

    member: str
    demand: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    limits: Mapping[WorkerModel, int] = field(default_factory=dict)
    in_flight: Mapping[WorkerModel, int] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    # what this replica holds now: its units, or its in-flight requests where more
    held: Mapping[WorkerModel, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "member": self.member,
            "demand": {m: dict(t) for m, t in self.demand.items()},
            "limits": _nest(self.limits),
            "in_flight": _nest(self.in_flight),
            "counters": dict(self.counters),
            "held": _nest(self.held),
        }

    @classmethod
    def from_json(cls, data: object) -> Report | None:
        """A report read back, or None when it is not one (another version, damaged)."""
        if not isinstance(data, dict) or not isinstance(data.get("member"), str):
            return None
        try:
            demand: dict[str, dict[str, float]] = {}
            for model, tenants in list(_mapping(data.get("demand")).items())[:MAX_KEYS]:
                demand[str(model)] = {str(t): max(0.0, _number(v)) for t, v in
                                      list(_mapping(tenants).items())[:MAX_TENANTS]}
            counters = {str(k): _number(v) for k, v in
                        list(_mapping(data.get("counters")).items())[:MAX_KEYS]}
            return cls(member=data["member"], demand=demand,
                       limits=_flat(data.get("limits")), in_flight=_flat(data.get("in_flight")),
                       counters=counters, held=_flat(data.get("held")))
        except (TypeError, ValueError):
            return None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _mapping(value: object) -> Mapping[object, object]:
    return value if isinstance(value, dict) else {}


def _nest(flat: Mapping[WorkerModel, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (worker, model), n in flat.items():
        out.setdefault(worker, {})[model] = int(n)
    return out


def _flat(value: object) -> dict[WorkerModel, int]:
    out: dict[WorkerModel, int] = {}
    for worker, models in _mapping(value).items():
        for model, n in _mapping(models).items():
            if len(out) >= MAX_KEYS:
                return out
            out[str(worker), str(model)] = min(MAX_UNITS, max(0, int(_number(n))))
    return out


# the arithmetic -------------------------------------------------------------------------------
def median_low(values: Sequence[int]) -> int:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def fleet_limits(reports: Iterable[Report]) -> dict[WorkerModel, int]:
    """Each (worker, model)'s fleet-wide limit: the median (low) of the replicas' figures."""
    seen: dict[WorkerModel, list[int]] = {}
    for r in reports:
        for key, n in r.limits.items():
            seen.setdefault(key, []).append(n)
    return {key: median_low(ns) for key, ns in seen.items()}


def water_fill(total: float, claims: Mapping[str, float],
               weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted max-min fair division of ``total`` among ``claims``: nobody gets more than
    it claims; what the satisfied leave is divided among the others by weight."""
    # Sorted, never a set's order: every replica (each its own hash seed) must add the same
    # floats in the same order and so compute the same table.
    out = {k: 0.0 for k in claims}
    active = sorted(k for k, c in claims.items() if c > 0)
    left = total
    while active and left > 1e-12:
        weight_sum = sum(max(weights.get(k, 1.0), 1e-9) for k in active)
        per_weight = left / weight_sum
        satisfied = [k for k in active
                     if claims[k] - out[k] <= per_weight * max(weights.get(k, 1.0), 1e-9)]
        if not satisfied:
            for k in active:
                out[k] += per_weight * max(weights.get(k, 1.0), 1e-9)
            break
        for k in satisfied:
            left -= claims[k] - out[k]
            out[k] = claims[k]
        active = [k for k in active if k not in satisfied]
    return out


def quotas(total: float, demand: Mapping[str, Mapping[str, float]],
           weights: Mapping[str, float], members: Sequence[str]) -> dict[str, float]:
    """Real-valued shares of ``total`` units of one model: ``demand`` is member → tenant →
    requests; tenants are served by weighted max-min fairness on their summed demand, each
    tenant's part split among members by its demand there; the rest by demand + 1."""
    by_tenant: dict[str, float] = {}
    for m in members:
        for tenant, d in sorted(demand.get(m, {}).items()):
            by_tenant[tenant] = by_tenant.get(tenant, 0.0) + d
    tenant_part = water_fill(total, by_tenant, weights)
    out = {m: 0.0 for m in members}
    for m in members:
        for tenant, d in sorted(demand.get(m, {}).items()):
            if by_tenant[tenant] > 0:
                out[m] += tenant_part[tenant] * d / by_tenant[tenant]
    # What demand leaves over goes by demand + 1: mostly to the busy replicas, whose demand
    # may grow next, a little to the idle ones, so that a first request there can start.
    spare = max(0.0, total - sum(out.values()))
    weight = {m: 1.0 + sum(demand.get(m, {}).values()) for m in members}
    weight_sum = sum(weight.values())
    for m in members:
        out[m] += spare * weight[m] / weight_sum
    return out


def apportion(total: int, shares: Mapping[str, float], wanting: Iterable[str] = ()) -> \
        dict[str, int]:
    """Whole units summing to ``total``: first one for each member in ``wanting`` (with
    demand) while units last, the rest by the largest remainder (ties by member id, so every
    replica computes the same)."""
    out = {m: 0 for m in shares}
    if not shares:
        return out
    left = total
    for m in sorted(set(wanting) & set(shares), key=lambda k: (-shares[k], k)):
        if left <= 0:
            break
        out[m] = 1
        left -= 1
    scale = sum(max(0.0, s - out[m]) for m, s in shares.items())
    if left <= 0 or scale <= 0:
        if left > 0:  # nobody wants more: evenly, in id order
            order = sorted(shares)
            for i in range(left):
                out[order[i % len(order)]] += 1
        return out
    exact = {m: max(0.0, s - out[m]) * left / scale for m, s in shares.items()}
    floors = {m: math.floor(x) for m, x in exact.items()}
    rest = left - sum(floors.values())
    for m in sorted(exact, key=lambda k: (-(exact[k] - floors[k]), k))[:rest]:
        floors[m] += 1
    for m in out:
        out[m] += floors[m]
    return out


def deal(units: Mapping[str, int], counts: Mapping[str, int],
         order: Sequence[str]) -> dict[str, dict[str, int]]:
    """Spread each member's ``counts`` units over the workers' ``units``: the units are laid
    out round by round (each worker's first, then each one's second…) and handed out in runs,
    members in ``order``; so every member's units cover as many workers as they can."""
    workers = sorted(units)
    laid = [w for k in range(max(units.values(), default=0)) for w in workers if units[w] > k]
    out: dict[str, dict[str, int]] = {m: {} for m in order}
    i = 0
    for m in order:
        for w in laid[i:i + counts.get(m, 0)]:
            out[m][w] = out[m].get(w, 0) + 1
        i += counts.get(m, 0)
    return out


@dataclass(frozen=True, slots=True)
class Allocation:
    """One replica's row: its units per (worker, model), and who it shared them with."""

    units: Mapping[WorkerModel, int]
    members: tuple[str, ...]
    fleet: Mapping[WorkerModel, int]

    def of(self, worker: str, model: str) -> int:
        return self.units.get((worker, model), 0)

    def share(self) -> float:
        """This replica's part of the fleet's units, 0…1."""
        total = sum(self.fleet.values())
        return sum(self.units.values()) / total if total else 1.0


def allocate(reports: Sequence[Report], me: str, weights: Mapping[str, float]) -> Allocation:
    """This replica's units per (worker, model), from every live replica's report (the
    module doc). ``me`` must be among the reports."""
    by_member = {r.member: r for r in reports}
    if me not in by_member:
        raise ValueError(f"{me!r} is not among the reports")
    live = sorted(by_member.values(), key=lambda r: r.member)[:MAX_MEMBERS]
    if me not in {r.member for r in live}:  # bounded, but never without this replica
        live = sorted([*live[:-1], by_member[me]], key=lambda r: r.member)
    members = [r.member for r in live]
    limits = fleet_limits(live)
    by_model: dict[str, dict[str, int]] = {}
    for (worker, model), n in limits.items():
        by_model.setdefault(model, {})[worker] = n
    mine: dict[WorkerModel, int] = {}
    for model, units in sorted(by_model.items()):
        total = sum(units.values())
        demand = {r.member: dict(r.demand.get(model, {})) for r in live}
        if model == "":  # a worker's whole budget: every model's demand counts
            demand = {r.member: _summed(r.demand) for r in live}
        wanting = [m for m in members if sum(demand.get(m, {}).values()) > 0]
        counts = apportion(total, quotas(total, demand, weights, members), wanting)
        # Rotate the deal's start by model so that small shares land on different workers.
        start = sum(map(ord, model)) % len(members)
        order = members[start:] + members[:start]
        for worker, n in deal(units, counts, order)[me].items():
            mine[worker, model] = n
        for worker in units:
            mine.setdefault((worker, model), 0)
    return Allocation(units=mine, members=tuple(members), fleet=limits)


# (target units, the fleet's limit, what may run here until the grant comes back)
Want = tuple[int, int, int]


def wants(target: Allocation | None, own_limits: Mapping[WorkerModel, int],
          in_flight: Mapping[WorkerModel, int], members_seen: int = 1, *,
          in_use: Mapping[WorkerModel, int] | None = None) -> dict[WorkerModel, Want]:
    """What this replica asks the exchange for, per (worker, model): its target from the
    last heartbeat's reports; for a (worker, model) the target does not know yet, or with no
    target (just started, or back after the store was lost), its own limit over the
    replicas it last saw — all of it when it never saw another — so that replicas coming
    back together (Redis restarted empty) ask for a fair part each instead of the first
    taking everything for a heartbeat.

    With each, what may run here until the grant comes back — held, as far as the others
    are told: the requests in flight, or the units in use now (``in_use``) where more. Those
    stay usable here during the exchange, so a unit given up goes to another replica at this
    one's next heartbeat, when it can no longer start a request on it. (Counted by in-flight
    alone, a request started between the report and the smaller grant's arrival ran beside
    the other replica's use of the same unit: 9 in flight on a worker whose limit was 8.)"""
    members = max(1, len(target.members)) if target is not None else max(1, members_seen)
    using = in_use or {}
    out: dict[WorkerModel, Want] = {}
    for key, limit in own_limits.items():
        running = max(in_flight.get(key, 0), using.get(key, 0))
        if target is not None and key in target.units:
            out[key] = (target.units[key], target.fleet.get(key, limit), running)
        else:
            out[key] = (limit // members, limit, running)
    return out


def grant_units(want: Mapping[WorkerModel, Want], others_held: Mapping[WorkerModel, int]
                ) -> tuple[dict[WorkerModel, int], dict[WorkerModel, int]]:
    """The exchange's grant, made atomically where every report is kept (one Lua script in
    Redis, the hub's one thread): per (worker, model) the units this replica may use — its
    target, but never more than the others leave free of the limit by what they hold — and
    what it then holds: those units, or what may still run there where more (a share just
    lowered still has requests to finish, and its old units until the grant arrives). Since
    grants are made one replica at a time against the others' recorded holdings, two
    replicas never raise into the same units:
    while demand moves (a herd at one replica) the sum stays within each limit."""
    granted: dict[WorkerModel, int] = {}
    held: dict[WorkerModel, int] = {}
    for key, (target, limit, flying) in want.items():
        n = max(0, min(target, limit - others_held.get(key, 0)))
        granted[key] = n
        held[key] = max(n, flying)
    return granted, held


def want_json(want: Mapping[WorkerModel, Want]) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for (worker, model), (target, limit, flying) in want.items():
        out.setdefault(worker, {})[model] = [int(target), int(limit), int(flying)]
    return out


def want_json_units(units: Mapping[WorkerModel, int]) -> dict[str, dict[str, int]]:
    """Units per (worker, model) as JSON: {worker: {model: n}}."""
    return _nest(units)


def units_from_json(data: object) -> dict[WorkerModel, int]:
    """Units read back from JSON (bounded; damaged entries left out)."""
    try:
        return _flat(data)
    except (TypeError, ValueError):
        return {}


def want_from_json(data: object) -> dict[WorkerModel, Want]:
    """A want read back by the hub; damaged entries are left out."""
    out: dict[WorkerModel, Want] = {}
    for worker, models in _mapping(data).items():
        for model, triple in _mapping(models).items():
            if len(out) >= MAX_KEYS:
                return out
            if not isinstance(triple, list) or len(triple) != 3:
                continue
            try:
                target, limit, flying = (min(MAX_UNITS, max(0, int(_number(v))))
                                         for v in triple)
            except (TypeError, ValueError):
                continue
            out[str(worker), str(model)] = (target, limit, flying)
    return out


def _summed(demand: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for tenants in demand.values():
        for tenant, d in tenants.items():
            out[tenant] = out.get(tenant, 0.0) + d
    return out


def fallback(last: Allocation | None, own_limits: Mapping[WorkerModel, int],
             members_seen: int, *, expired: bool = False) -> Allocation:
    """The safe local share when the reports cannot be read (Redis lost): the last known
    row while this replica's own lease lasts (the others still count its holding), else —
    its lease run out, so the others may have taken its units — 1/N of its own limits, N the
    replicas last seen (at least one unit each)."""
    if last is not None and not expired:
        return last
    n = max(1, members_seen)
    units = {key: max(1, limit // n) if limit > 0 else 0 for key, limit in own_limits.items()}
    return Allocation(units=units, members=(), fleet=dict(own_limits))


def peers_in_flight(reports: Iterable[Report], me: str) -> dict[WorkerModel, int]:
    """What the other replicas have in flight per (worker, model), as they last said."""
    out: dict[WorkerModel, int] = {}
    for r in reports:
        if r.member == me:
            continue
        for key, n in r.in_flight.items():
            out[key] = out.get(key, 0) + n
    return out
