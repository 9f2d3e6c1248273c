"""Replicas as one gateway: the heartbeat that shares the fleet's budget (the async shell of
``gateway.core.shares``).

Every ``cluster.heartbeat_s`` the coordinator publishes this replica's report (demand per
model and tenant, learned limits, in-flight counts, the capacity signals' counters) through
the membership exchange — Redis when ``admission.redis.url`` is set, the parent process
under ``gateway serve --processes N`` — reads every live replica's report back, and computes
this replica's units per (worker, model) with :func:`gateway.core.shares.allocate`. The
routing table takes them at once (``on_change``); the request path never waits on the
exchange.

When the exchange fails (Redis stopped, the parent gone) the replica keeps the last share it
computed, or 1/N of its own limits before it ever had one (:func:`shares.fallback`), logs
that once, serves on, and takes the fleet's figures again once the exchange answers. A
replica that stops cleanly withdraws its report, so the others take its share at their next
heartbeat; one killed loses it when its lease (``cluster.lease_s``) runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.core import shares
from gateway.core.shares import Allocation, Report, WorkerModel

log = logging.getLogger("gateway.engine.coordinator")


class Exchange(Protocol):
    async def exchange(self, member: str, payload: bytes, want: bytes, lease_s: float, *,
                       timeout_s: float) -> tuple[bytes, list[bytes]]:
        """Publish ``payload`` (this replica's report) for ``lease_s``, be granted ``want``
        (gateway.core.shares.grant_units, atomically in the store): (granted, reports)."""

    async def leave(self, member: str, *, timeout_s: float) -> None: ...

    async def aclose(self) -> None: ...


def member_id() -> str:
    """This process, unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class CoordinatorStatistics:
    member: str
    via: str
    members: int
    share: float
    healthy: bool
    exchanges_total: int
    failures_total: int
    last_ok_age_s: float | None


class Coordinator:
    __slots__ = ("_clock", "_exchange", "_failures", "_heartbeat_s", "_last_ok", "_lease_s",
                 "_lost", "_members_seen", "_ok", "_on_change", "_others", "_report",
                 "_target", "_weights", "allocation", "member", "peers", "via")

    def __init__(self, exchange: Exchange, *, via: str, report: Callable[[], Report],
                 weights: Callable[[], Mapping[str, float]], on_change: Callable[[], None],
                 heartbeat_s: float, lease_s: float, member: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._exchange = exchange
        self.via = via
        self._report = report
        self._weights = weights
        self._on_change = on_change
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s
        self._clock = clock
        self.member = member or member_id()
        self.allocation: Allocation | None = None   # the units granted, used now
        self._target: Allocation | None = None      # the units to ask for next
        self.peers: list[Report] = []   # the other replicas' live reports
        self._others: dict[WorkerModel, int] = {}  # their in flight, summed once a beat
        self._lost = False
        self._members_seen = 1
        self._ok = 0
        self._failures = 0
        self._last_ok: float | None = None

    def __repr__(self) -> str:
        return (f"<Coordinator {self.member} via={self.via} members={self._members_seen} "
                f"lost={self._lost}>")

    async def tick(self) -> None:
        """One heartbeat: publish, read back, recompute this replica's units."""
        report = dataclasses.replace(self._report(), member=self.member)
        in_use = self.allocation.units if self.allocation is not None else None
        want = shares.wants(self._target, report.limits, report.in_flight, self._members_seen,
                            in_use=in_use)
        payload = json.dumps(report.to_json(), separators=(",", ":")).encode()
        want_payload = json.dumps(shares.want_json(want), separators=(",", ":")).encode()
        try:
            granted_raw, raw = await self._exchange.exchange(
                self.member, payload, want_payload, self._lease_s,
                timeout_s=max(0.05, self._heartbeat_s))
            granted = shares.units_from_json(json.loads(granted_raw))
        except Exception as exc:  # the exchange's own errors, whatever the transport
            self._failures += 1
            if not self._lost:
                self._lost = True
                log.warning("replica coordination via %s lost (%s): serving on with the last "
                            "known share (%d replicas seen)", self.via,
                            type(exc).__name__, self._members_seen)
            # Past its own lease the others no longer count this replica's holding: 1/N.
            expired = self._last_ok is None or \
                self._clock() - self._last_ok >= self._lease_s
            self.allocation = shares.fallback(self.allocation, report.limits,
                                              self._members_seen, expired=expired)
            self._target = None
            self._on_change()
            return
        reports = [r for r in (self._parse(b) for b in raw) if r is not None]
        if not any(r.member == self.member for r in reports):
            reports.append(report)
        self._ok += 1
        self._last_ok = self._clock()
        if self._lost:
            self._lost = False
            log.info("replica coordination via %s recovered: %d replicas", self.via,
                     len(reports))
        self._members_seen = len(reports)
        self.peers = [r for r in reports if r.member != self.member]
        self._others = shares.peers_in_flight(self.peers, self.member)
        # Use what the store granted now; ask for the new target at the next heartbeat.
        self._target = shares.allocate(reports, self.member, self._weights())
        self.allocation = Allocation(units=granted, members=self._target.members,
                                     fleet=self._target.fleet)
        self._on_change()

    @staticmethod
    def _parse(raw: bytes) -> Report | None:
        try:
            return Report.from_json(json.loads(raw))
        except ValueError:
            return None

    def units(self, worker: str, model: str) -> int | None:
        """This replica's units of (worker, model); None when not coordinating yet or the
        fleet does not know that key."""
        a = self.allocation
        if a is None or (worker, model) not in a.units:
            return None
        return a.units[worker, model]

    def peers_in_flight(self) -> dict[WorkerModel, int]:
        """The other replicas' in-flight requests per (worker, model), as of the last
        heartbeat (read on every completion: computed once a beat)."""
        return self._others

    async def run(self) -> None:
        while True:
            started = self._clock()
            try:
                await self.tick()
            except Exception:
                log.exception("replica coordination heartbeat failed")
            await asyncio.sleep(max(0.0, self._heartbeat_s - (self._clock() - started)))

    async def close(self, *, owns_exchange: bool) -> None:
        """Withdraw this replica's report, so the others take its share at their next
        heartbeat; close the exchange where this coordinator owns it."""
        with contextlib.suppress(Exception):
            await self._exchange.leave(self.member, timeout_s=0.5)
        if owns_exchange:
            with contextlib.suppress(Exception):
                await self._exchange.aclose()

    def statistics(self) -> CoordinatorStatistics:
        a = self.allocation
        return CoordinatorStatistics(
            member=self.member, via=self.via, members=self._members_seen,
            share=a.share() if a is not None else 1.0, healthy=not self._lost,
            exchanges_total=self._ok, failures_total=self._failures,
            last_ok_age_s=None if self._last_ok is None else self._clock() - self._last_ok)
