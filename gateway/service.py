"""The composition root: builds the gateway's parts from a configuration and wires them.

Parts (each a module of its own): the :class:`~gateway.fleet.Fleet` (probes, scrapes,
discovery), the :class:`~gateway.dispatch.Dispatcher` (limits, routing, queue, retries,
breakers), the :class:`~gateway.tablesync.RoutingTableSync`, the
:class:`~gateway.tenants.TenantDirectory`, the :class:`~gateway.aggregates.TritonAggregates`
(statistics, repository index and control over every worker), the
:class:`~gateway.batchgateway.BatchingGateway` and the
:class:`~gateway.telemetry.Telemetry` exporter, which reads this object through the small
:class:`~gateway.state.GatewayState` view.

:meth:`GatewayService.reload` swaps in a new configuration without dropping a request
(in-flight requests keep the objects they hold; new requests see the new ones).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable

from gateway import routing
from gateway.aggregates import TritonAggregates
from gateway.batchgateway import BatchingGateway
from gateway.batching import BatchRecord
from gateway.breaker import BreakerBoard
from gateway.concurrency import ModelLimitStatistics
from gateway.config import GatewayConfig
from gateway.discovery import Action, Found, ModelDirectory, fetch_via_pools
from gateway.dispatch import Dispatcher
from gateway.fairshare import FairShareStatistics
from gateway.fleet import Fleet, run_until_stopped
from gateway.looplag import LoopLag
from gateway.redis_store import RedisStore
from gateway.tablesync import RoutingTableSync
from gateway.telemetry import Telemetry
from gateway.tenants import TenantDirectory
from gateway.types import ModelKey, WorkerId
from gateway.upstream import Pool
from gateway.workers import Worker

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


def _make_redis(cfg: GatewayConfig) -> RedisStore | None:
    buckets = [cfg.admission.global_limit]
    buckets += [t.rate_limit for t in cfg.admission.tenants.values()]
    buckets += [m.rate_limit for m in cfg.models.values()]
    if not any(b is not None and b.scope == "global" for b in buckets):
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
                                     redis_store=self.redis_store)
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
        self.dispatcher.on_queue_wait = self.telemetry.observe_queue_wait
        self.batching = BatchingGateway(lambda: self.cfg, self.dispatcher,
                                        any_worker_with=self.any_worker_with,
                                        get_json=self.aggregates.get_json, clock=clock,
                                        on_batch=self._on_batch)
        self.dispatcher.on_release = self.batching.instance_freed
        self._built = True
        self._fleet_changed()

    def __repr__(self) -> str:
        return f"<GatewayService gen={self.generation} {self.fleet!r}>"

    def reload(self, cfg: GatewayConfig) -> None:
        """Swap in a validated configuration. Workers are added, drained or updated; limits,
        breakers' settings, routing weights take effect for new requests."""
        old_store = self.redis_store
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

    def _on_batch(self, record: BatchRecord) -> None:
        self.telemetry.observe_batch(record.key.model, record.members, record.fill_ratio)

    # questions the proxy asks -------------------------------------------------------------
    def model_known(self, name: str) -> bool:
        return name in self._known

    def model_ready(self, key: ModelKey) -> bool:
        return self.any_worker_with(key) is not None

    def serves(self, key: ModelKey) -> bool:
        """Does some ready worker list ``key`` (cheap: no snapshots)?"""
        for w in self.fleet.routable():
            ready = w.models_ready
            if (key.name in ready if not key.version else
                    f"{key.name}/{key.version}" in ready or f"{key.name}/?" in ready):
                return True
        return False

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

    # running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Background work, supervised: fleet loops, routing-table refresh, telemetry."""
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
            await self.fleet._stopping.wait()
            table.cancel()
            tele.cancel()

    def stop(self) -> None:
        self.fleet.stop()

    async def aclose(self) -> None:
        await self.batching.aclose()
        await self.models.aclose()
        await self.fleet.aclose()
        store = self.redis_store
        if store is not None:
            await store.aclose()
