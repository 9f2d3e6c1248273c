"""Keeps the routing table in step with the fleet: one snapshot per worker (signals,
readiness, breaker state, stalled or not, slow-start share, effective slots, the learned
in-flight limit of each of its models), refreshed on every fleet change, every stall
state change and every scrape tick — never per request.

A worker that joins, or comes back after start-up, gets a fresh breaker that ramps its
traffic share up (slow start); a worker that left is removed from the table, the breaker
board and the dispatcher's per-worker state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from gateway.core import routing
from gateway.core.concurrency import worker_bound
from gateway.core.config import GatewayConfig
from gateway.core.types import ModelKey, WorkerId, WorkerSnapshot
from gateway.engine.coordinator import Coordinator
from gateway.engine.dispatch import Dispatcher
from gateway.fleet.monitor import Fleet

log = logging.getLogger("gateway")


class RoutingTableSync:
    __slots__ = ("_cfg", "_clock", "_dispatcher", "_fleet", "_serving_seen", "_started_mono",
                 "coordinator", "own_limits", "table")

    def __init__(self, cfg: Callable[[], GatewayConfig], fleet: Fleet, dispatcher: Dispatcher,
                 table: routing.RoutingTable, clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self._fleet = fleet
        self._dispatcher = dispatcher
        self._clock = clock
        self._started_mono = clock()
        self._serving_seen: dict[WorkerId, float] = {}
        self.table = table
        # Replicas as one: this replica's units of each (worker, model) (None: alone), and
        # the limits it learned itself, per worker and model ("": the worker as a whole),
        # which it reports to the others.
        self.coordinator: Coordinator | None = None
        self.own_limits: dict[WorkerId, dict[str, int]] = {}

    def __repr__(self) -> str:
        return f"<RoutingTableSync workers={len(self._serving_seen)}>"

    def refresh(self) -> None:
        """Re-snapshot every worker into the routing table."""
        cfg = self._cfg()
        now = self._clock()
        board = self._dispatcher.breakers
        present = set()
        for w in self._fleet.workers.values():
            present.add(w.id)
            if w.id not in board:
                board.add_worker(w.id, now, slow_start=False)
            if w.serving_since is not None and self._serving_seen.get(w.id) != w.serving_since:
                # Joined or came back after start-up: a fresh breaker that ramps up.
                if w.id in self._serving_seen or w.serving_since - self._started_mono > \
                        cfg.health.interval_s * (cfg.health.rise + 2):
                    board.remove_worker(w.id)
                    board.add_worker(w.id, now, slow_start=True)
                self._serving_seen[w.id] = w.serving_since
            snap = w.snapshot(ModelKey(""), now, cfg.scrape.stale_after_s,
                              breaker_allows=board.state(w.id, now).gauge != 2,
                              traffic_share=board.traffic_share(w.id, now),
                              stalled=self._dispatcher.stalls.is_excluded(w.id))
            if cfg.admission.adaptive.enabled:
                slots = self._dispatcher.effective_slots(w)
                if slots != snap.slots:
                    snap = dataclasses.replace(snap, slots=slots)
            per_model = cfg.upstream.model_limits != "off"
            limits = self._dispatcher.model_limits
            limits.learn(w.id, w.model_capacity if per_model else {})
            if w.model_capacity and per_model:
                model_limits = limits.limits(w.id)
                bound = worker_bound(w.slots, model_limits)
                # admission.adaptive's per-worker limit, where on, may only lower it
                slots = min(snap.slots, bound) if cfg.admission.adaptive.enabled else bound
                snap = dataclasses.replace(snap, model_limits=model_limits, slots=slots)
            snap = self._shared(w.id, snap)
            self.table.update(snap)
        for wid in [wid for wid in self.own_limits if wid not in present]:
            del self.own_limits[wid]
        for wid in [wid for wid in board.workers() if wid not in present]:
            board.remove_worker(wid)
            self.table.remove(wid)
            self._serving_seen.pop(wid, None)
            self._dispatcher.forget_worker(wid)

    def _shared(self, wid: WorkerId, snap: WorkerSnapshot) -> WorkerSnapshot:
        """Record the limits this replica learned; where replicas share the fleet, take this
        replica's units of them instead (gateway.core.shares)."""
        own = dict(snap.model_limits) if snap.model_limits else {"": snap.slots}
        self.own_limits[wid] = own
        coordinator = self.coordinator
        if coordinator is None or coordinator.allocation is None:
            return snap
        # A (worker, model) not yet in the fleet's figures (this replica saw it first): its
        # own limit over the replicas, until the next heartbeat.
        members = max(1, len(coordinator.allocation.members))
        units = {}
        for m, limit in own.items():
            n = coordinator.units(wid, m)
            units[m] = n if n is not None else max(1, limit // members)
        if "" in units:
            return dataclasses.replace(snap, slots=min(snap.slots, units[""]))
        return dataclasses.replace(snap, model_limits=units,
                                   slots=min(snap.slots, sum(units.values())))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self._cfg().scrape.interval_s))
            try:
                self.refresh()
            except Exception:
                log.exception("routing table refresh failed")
