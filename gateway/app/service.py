"""The composition root: builds the gateway's parts from a configuration and wires them.

Parts (each a module of its own): the :class:`~gateway.fleet.monitor.Fleet` (probes, scrapes,
discovery), the :class:`~gateway.engine.dispatch.Dispatcher` (limits, routing, queue, retries,
breakers), the :class:`~gateway.engine.tablesync.RoutingTableSync`, the
:class:`~gateway.core.tenants.TenantDirectory`, the
:class:`~gateway.fleet.aggregates.TritonAggregates`
(statistics, repository index and control over every worker), the
:class:`~gateway.engine.batchgateway.BatchingGateway` and the
:class:`~gateway.ops.telemetry.Telemetry` exporter, which reads this object through the small
:class:`~gateway.ops.state.GatewayState` view.

:meth:`GatewayService.reload` swaps in a new configuration without dropping a request
(in-flight requests keep the objects they hold; new requests see the new ones).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from gateway.core import routing
from gateway.core.batching import BatchRecord
from gateway.core.breaker import BreakerBoard
from gateway.core.concurrency import ModelLimitStatistics
from gateway.core.config import GatewayConfig
from gateway.core.fairshare import FairShareStatistics
from gateway.core.shares import ANONYMOUS, Report, WorkerModel
from gateway.core.tenants import TenantDirectory
from gateway.core.types import ModelKey, WorkerId
from gateway.engine import hub
from gateway.engine.batchgateway import BatchingGateway
from gateway.engine.coordinator import Coordinator, Exchange
from gateway.engine.dispatch import Dispatcher
from gateway.engine.looplag import LoopLag
from gateway.engine.redis_store import RedisStore
from gateway.engine.tablesync import RoutingTableSync
from gateway.fleet.aggregates import TritonAggregates
from gateway.fleet.discovery import Action, Found, ModelDirectory, fetch_via_pools
from gateway.fleet.monitor import Fleet, run_until_stopped
from gateway.fleet.upstream import Pool
from gateway.fleet.workers import Worker
from gateway.ops.telemetry import Telemetry

if TYPE_CHECKING:
    from gateway.ops.tracing import Tracing

log = logging.getLogger("gateway")


class FleetLoad:
    """The routing core's LoadSource: live in-flight counts straight from the workers."""

    __slots__ = ("_workers",)

    def __init__(self, workers: dict[WorkerId, Worker]) -> None:
        self._workers = workers

    def in_flight(self, worker: WorkerId) -> int:
        w = self._workers.get(worker)
        return w.in_flight if w is not None else 0

    def in_flight_model(self, worker: WorkerId, model: str) -> int:
        w = self._workers.get(worker)
        return w.in_flight_by_model.get(model, 0) if w is not None else 0


def processes_on_this_host() -> int:
    """N under ``gateway serve --processes N`` (the parent says so), else 1."""
    try:
        return max(1, int(os.environ.get(hub.PROCESSES_ENV_VAR, "1")))
    except ValueError:
        return 1


def _make_redis(cfg: GatewayConfig) -> RedisStore | None:
    buckets = [cfg.admission.global_limit]
    buckets += [t.rate_limit for t in cfg.admission.tenants.values()]
    buckets += [m.rate_limit for m in cfg.models.values()]
    if not any(b is not None and b.scope == "global" for b in buckets) and \
            not cfg.admission.redis.url.reveal():
        return None
    return RedisStore(cfg.admission.redis)


class GatewayService:
    def __init__(self, cfg: GatewayConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._built = False
        self.cfg = cfg
        self.clock = clock
        self.started_at = time.time()
        self.generation = 1
        self.config_path: str | None = None
        self.rng = rng or random.Random()
        self.draining = False
        self._known: frozenset[str] = frozenset()
        self._ready_ids: frozenset[WorkerId] = frozenset()
        self._directory_ids: set[WorkerId] = set()
        self.fleet = Fleet(cfg, clock=clock, on_change=self._fleet_changed)
        self.table = routing.RoutingTable()
        self.redis_store = _make_redis(cfg)
        self.dispatcher = Dispatcher(cfg, self.fleet, clock=clock, rng=self.rng,
                                     redis_store=self.redis_store,
                                     local_limit_share=1.0 / processes_on_this_host())
        self.dispatcher.attach(self.table, FleetLoad(self.fleet.workers))
        self.table_sync = RoutingTableSync(lambda: self.cfg, self.fleet, self.dispatcher,
                                           self.table, clock)
        self.tenants = TenantDirectory.from_config(cfg)
        self.models = ModelDirectory(fetch_via_pools(self._pool_of), clock=clock)
        self.aggregates = TritonAggregates(self.fleet.routable, self.fleet.probe_models,
                                           lambda: self.cfg.upstream.read_timeout_s)
        self.loop_lag = LoopLag(clock=clock)
        self.dispatcher.loop_lag = self.loop_lag.lag_s
        self.telemetry = Telemetry(self)
        self.tracing = self._make_tracing()
        self.dispatcher.on_queue_wait = self.telemetry.observe_queue_wait
        self.batching = BatchingGateway(lambda: self.cfg, self.dispatcher,
                                        any_worker_with=self.any_worker_with,
                                        get_json=self.aggregates.get_json, clock=clock,
                                        on_batch=self._on_batch)
        self.dispatcher.on_release = self.batching.instance_freed
        self.dispatcher.on_stall_change = lambda _t: self.table_sync.refresh()
        self.coordinator = self._make_coordinator()
        self.table_sync.coordinator = self.coordinator
        if self.coordinator is not None:
            coordinator = self.coordinator
            self.dispatcher.coordinated = True
            self.dispatcher.share = lambda: (coordinator.allocation.share()
                                             if coordinator.allocation is not None else 1.0)
            self.dispatcher.peers_in_flight = coordinator.peers_in_flight
            self.telemetry.peers = lambda: coordinator.peers
        self._built = True
        self._fleet_changed()

    def __repr__(self) -> str:
        return f"<GatewayService gen={self.generation} {self.fleet!r}>"

    def reload(self, cfg: GatewayConfig) -> None:
        """Swap in a validated configuration. Workers are added, drained or updated; limits,
        breakers' settings, routing weights take effect for new requests."""
        old_store = self.redis_store
        if cfg.tracing != self.cfg.tracing:
            log.warning("tracing changes take effect at the next restart")
        if cfg.admission.redis.url.reveal() != self.cfg.admission.redis.url.reveal() or \
                cfg.cluster != self.cfg.cluster:
            log.warning("admission.redis.url and cluster changes take effect for replica "
                        "coordination at the next restart")
        self.redis_store = _make_redis(cfg) if cfg.admission.redis != \
            self.cfg.admission.redis or old_store is None else old_store
        self.cfg = cfg
        self.tenants = TenantDirectory.from_config(cfg)
        self.fleet.apply(cfg)
        self.dispatcher.reconfigure(cfg, redis_store=self.redis_store)
        self.generation += 1
        self._fleet_changed()
        log.info("configuration generation %d in force", self.generation)

    def _fleet_changed(self) -> None:
        if not self._built:
            return  # during construction; __init__ calls this once at the end
        known: set[str] = set(self.cfg.models)
        for w in self.fleet.workers.values():
            known.update(m for m in w.models_ready if "/" not in m)
            self.models.on_worker_models(w.id, w.models_ready)
        self._known = frozenset(known)
        present = set(self.fleet.workers)
        for gone in self._directory_ids - present:
            self.models.forget_worker(gone)
        self._directory_ids = present
        self._ready_ids = frozenset(w.id for w in self.fleet.routable())
        self.table_sync.refresh()
        self.dispatcher.wake_waiters(len(self.fleet.workers) or 1)

    # replicas as one: the heartbeat's exchange and report ----------------------------------
    def _make_coordinator(self) -> Coordinator | None:
        """Redis when admission.redis.url is set (replicas across hosts), else the parent
        process under ``gateway serve --processes N``, else none (one gateway alone)."""
        exchange: Exchange
        if self.cfg.admission.redis.url.reveal() and self.redis_store is not None:
            exchange, via = self.redis_store, "redis"
        elif os.environ.get(hub.ENV_VAR):
            exchange, via = hub.HubClient(os.environ[hub.ENV_VAR]), "processes"
        else:
            return None
        cluster = self.cfg.cluster
        return Coordinator(exchange, via=via, report=self.report,
                           weights=self._tenant_weights, on_change=self._shares_changed,
                           heartbeat_s=cluster.heartbeat_s, lease_s=cluster.lease_s,
                           clock=self.clock)

    def _make_tracing(self) -> Tracing | None:
        """OpenTelemetry is imported only when tracing is on (``tracing.otlp_endpoint``)."""
        if not self.cfg.tracing.otlp_endpoint:
            return None
        from gateway.ops.tracing import Tracing

        return Tracing(self.cfg.tracing, candidates=self._candidates)

    def _candidates(self, key: ModelKey) -> Sequence[str]:
        """The ready workers serving ``key`` (what a routing span names)."""
        return [w.id for w in self.fleet.routable()
                if w.snapshot(key, 0.0, 0.0).has_model(key)]

    def _tenant_weights(self) -> dict[str, float]:
        weights = {name: t.weight for name, t in self.cfg.admission.tenants.items()}
        weights.setdefault(ANONYMOUS, 1.0)
        return weights

    def report(self) -> Report:
        """What this replica tells the others each heartbeat (gateway.core.shares)."""
        limits: dict[WorkerModel, int] = {}
        in_flight: dict[WorkerModel, int] = {}
        for w in self.fleet.workers.values():
            if not w.is_routable:
                continue
            own = self.table_sync.own_limits.get(w.id)
            if own is None:
                continue
            for model, n in own.items():
                limits[w.id, model] = n
                in_flight[w.id, model] = (w.in_flight if model == "" else
                                          w.in_flight_by_model.get(model, 0))
        coordinator = self.coordinator
        return Report(member=coordinator.member if coordinator is not None else "",
                      demand=self.dispatcher.demand(), limits=limits, in_flight=in_flight,
                      counters=self.telemetry.counters())

    def _shares_changed(self) -> None:
        self.table_sync.refresh()
        self.dispatcher.wake_waiters(len(self.fleet.workers) or 1)

    def _on_batch(self, record: BatchRecord) -> None:
        self.telemetry.observe_batch(record.key.model, record.members, record.fill_ratio)

    # questions the proxy asks -------------------------------------------------------------
    def model_known(self, name: str) -> bool:
        return name in self._known

    def model_ready(self, key: ModelKey) -> bool:
        return self.any_worker_with(key) is not None

    def serves(self, key: ModelKey) -> bool:
        """Does some ready worker list ``key`` (cheap: no snapshots)? A version counts only
        when it was listed or looked up itself: ``name/?`` (a model found by name, versions
        unknown) lets the router send any version on, but the gateway must not answer for
        one — ``/ready`` of a version the worker lacks is Triton's 400, not 200."""
        entry = f"{key.name}/{key.version}" if key.version else key.name
        return any(entry in w.models_ready for w in self.fleet.routable())

    async def resolve(self, key: ModelKey, action: Action) -> None:
        """Make sure some ready worker serves ``key``: look it up on the workers when the
        fleet does not list it (PyTriton's index is empty; a version may be unlisted), or
        raise the error Triton itself would answer (404 unknown model or version, 400 for
        ``/ready``, 503 + Retry-After when no worker can tell now)."""
        if self.serves(key):
            return
        result = await self.models.lookup(key, self._ready_ids)
        if not isinstance(result, Found):
            raise result.error(action)
        self.fleet.learn_model(key.name)
        entry = f"{key.name}/{key.version}" if key.version else key.name
        for wid in result.workers:
            w = self.fleet.workers.get(wid)
            if w is not None and entry not in w.models_ready:
                extra = {entry, key.name}
                if not any(m.startswith(key.name + "/") for m in w.models_ready):
                    extra.add(f"{key.name}/?")
                w.models_ready = w.models_ready | extra
        self._fleet_changed()

    def _pool_of(self, wid: WorkerId) -> Pool | None:
        w = self.fleet.workers.get(wid)
        return w.pool if w is not None else None

    def any_worker_with(self, key: ModelKey) -> Worker | None:
        ready = [w for w in self.fleet.routable() if w.snapshot(
            key, 0.0, 0.0).has_model(key)]
        return self.rng.choice(ready) if ready else None

    # GatewayState: what telemetry and the admin pages read ---------------------------------
    @property
    def breakers(self) -> BreakerBoard:
        return self.dispatcher.breakers

    @property
    def queue_length(self) -> int:
        return self.dispatcher.queue_length

    def workers(self) -> Iterable[Worker]:
        return self.fleet.workers.values()

    def saturation_seconds(self) -> float:
        return self.dispatcher.saturation_seconds()

    def dispatch_statistics(self) -> dict[str, float]:
        return self.dispatcher.statistics()

    def fair_share(self) -> FairShareStatistics:
        return self.dispatcher.fair.statistics(self.clock())

    def limits_description(self) -> list[dict[str, object]]:
        return self.dispatcher.limiter.describe()

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.fleet.workers.values())

    def loop_lag_s(self) -> float:
        return self.loop_lag.lag_s()

    def loop_lag_worst_s(self) -> float:
        return self.loop_lag.worst_s

    def model_limits(self) -> list[ModelLimitStatistics]:
        return self.dispatcher.model_limits.statistics()

    def stall_state(self, worker: str) -> str:
        return self.dispatcher.stalls.state(worker).value

    def cluster(self) -> dict[str, object] | None:
        coordinator = self.coordinator
        if coordinator is None:
            return None
        s = coordinator.statistics()
        units: dict[str, dict[str, int]] = {}
        fleet: dict[str, dict[str, int]] = {}
        a = coordinator.allocation
        if a is not None:
            for (wid, model), n in a.units.items():
                units.setdefault(wid, {})[model] = n
            for (wid, model), n in a.fleet.items():
                fleet.setdefault(wid, {})[model] = n
        return {"member": s.member, "via": s.via, "members": s.members,
                "share": s.share, "healthy": s.healthy, "exchanges_total": s.exchanges_total,
                "failures_total": s.failures_total, "last_ok_age_s": s.last_ok_age_s,
                "units": units, "fleet_limits": fleet}

    # running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Background work, supervised: fleet loops, routing-table refresh, telemetry, the
        stall watch."""
        self.loop_lag.start()
        try:
            await self._run()
        finally:
            self.loop_lag.stop()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_until_stopped(self.fleet))
            table = tg.create_task(self.table_sync.run())
            tele = tg.create_task(self.telemetry.run())
            stalls = tg.create_task(self.dispatcher.watch_stalls())
            beat = tg.create_task(self.coordinator.run()) if self.coordinator else None
            await self.fleet._stopping.wait()
            table.cancel()
            tele.cancel()
            stalls.cancel()
            if beat is not None:
                beat.cancel()

    def stop(self) -> None:
        self.fleet.stop()

    async def aclose(self) -> None:
        coordinator = self.coordinator
        if coordinator is not None:
            await coordinator.close(owns_exchange=coordinator.via == "processes")
        await self.batching.aclose()
        await self.models.aclose()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the last spans out (bounded)
        await self.fleet.aclose()
        store = self.redis_store
        if store is not None:
            await store.aclose()
