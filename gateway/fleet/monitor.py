"""The fleet: which workers exist, whether they are ready, which models they serve, and
what their Triton metrics say. The async shell around ``gateway.fleet.workers`` (lifecycle),
``gateway.core.signals`` (metrics parsing) and DNS discovery.

Background loops (health probes, metrics scrapes, DNS re-resolution, drain reaping) run in
one supervised task group owned by :class:`Fleet`; each iteration is bounded in time and
concurrency, and a failing iteration is logged and retried at the next tick, never left to
kill the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable

from gateway.core import signals as triton_signals
from gateway.core.concurrency import ModelCapacity
from gateway.core.config import AUTO_SLOTS_FALLBACK, GatewayConfig, WorkerConfig
from gateway.core.errors import UpstreamError
from gateway.core.types import WorkerId
from gateway.fleet.discovery import model_facts
from gateway.fleet.upstream import PoolLimits, fetch
from gateway.fleet.workers import Event, State, Worker, after_probe, transition, worker_id

log = logging.getLogger("gateway.fleet.monitor")

MAX_DERIVED_SLOTS = 4096  # learned per-worker slot limit, at most
MAX_LEARNED_MODELS = 256  # names learned by discovery, probed on each model poll
MODEL_PROBE_EVERY = 5  # model readiness is re-probed every N health intervals


def instance_count(model_config: object) -> int:
    """Model instances in a Triton model config: Σ count (× GPUs listed, for GPU groups);
    a model without instance_group has one instance; 0 for a document that is no config."""
    facts = model_facts(model_config)
    return facts.instances if facts is not None else 0


def pool_limits(cfg: GatewayConfig) -> PoolLimits:
    u = cfg.upstream
    return PoolLimits(max_connections=u.max_connections_per_worker,
                      connect_timeout_s=u.connect_timeout_s, read_timeout_s=u.read_timeout_s)


class Fleet:
    def __init__(self, cfg: GatewayConfig, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.workers: dict[WorkerId, Worker] = {}
        self._discovered: dict[WorkerId, WorkerConfig] = {}
        self._on_change = on_change or (lambda: None)
        self._probe_round = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._closing: list[Worker] = []
        # Model names learned on first use (gateway.fleet.discovery): probed by name on every
        # model poll, like configured names. Bounded: the names come from clients.
        self.learned_models: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.apply(cfg)

    def __repr__(self) -> str:
        states: dict[str, int] = {}
        for w in self.workers.values():
            states[w.state.value] = states.get(w.state.value, 0) + 1
        return f"<Fleet {states}>"

    # membership -------------------------------------------------------------------------
    def _wanted(self) -> dict[WorkerId, WorkerConfig]:
        wanted: dict[WorkerId, WorkerConfig] = {}
        for wc in self.cfg.workers:
            wanted[worker_id(wc.url)] = wc
        wanted.update(self._discovered)
        return wanted

    def apply(self, cfg: GatewayConfig) -> None:
        """Bring membership in line with ``cfg`` (and the last DNS answer): add new workers,
        drain removed ones, update pools and slots of kept ones. Never drops a request."""
        self.cfg = cfg
        limits = pool_limits(cfg)
        wanted = self._wanted()
        for wid, wc in wanted.items():
            prio = cfg.pool_priority(wc.pool)
            w = self.workers.get(wid)
            if w is None or w.state in (State.DRAINING, State.GONE):
                if w is not None and w.state is State.DRAINING:
                    # Re-added while draining: start over as a fresh joiner beside it.
                    self._retire(w)
                w = Worker(wc.url, wc.resolved_metrics_url(), pool_name=wc.pool,
                           pool_priority=prio, slots=AUTO_SLOTS_FALLBACK, limits=limits,
                           name=wc.name)
                self.workers[wid] = w
                log.info("worker %s joining (pool %s)", wid, wc.pool)
            else:
                w.pool_name, w.pool_priority = wc.pool, prio
                w.pool.limits = limits
            w.configured_slots = wc.slots
            w.slots = self._slots_for(w)
        for wid, w in list(self.workers.items()):
            if wid not in wanted and w.state not in (State.DRAINING, State.GONE):
                w.state = transition(w.state, Event.REMOVE)
                log.info("worker %s draining (%d in flight)", wid, w.in_flight)
        self._reap()
        self._on_change()

    def _slots_for(self, w: Worker) -> int:
        if w.configured_slots is not None:
            return w.configured_slots
        default = self.cfg.upstream.default_slots
        if isinstance(default, int):
            return default
        return w.derived_slots or AUTO_SLOTS_FALLBACK

    def _retire(self, w: Worker) -> None:
        self.workers.pop(w.id, None)
        self._closing.append(w)

    def _reap(self) -> None:
        for wid, w in list(self.workers.items()):
            if w.state is State.DRAINING and w.in_flight == 0:
                w.state = transition(w.state, Event.DRAINED)
                del self.workers[wid]
                self._closing.append(w)
                log.info("worker %s gone", wid)
        closing, self._closing = self._closing, []
        for w in closing:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(w.pool.aclose())

    def routable(self) -> Iterable[Worker]:
        return (w for w in self.workers.values() if w.is_routable)

    def any_ready(self) -> bool:
        return any(w.is_routable for w in self.workers.values())

    def known_models(self) -> set[str]:
        names: set[str] = set()
        for w in self.workers.values():
            if w.is_routable:
                names.update(m for m in w.models_ready if "/" not in m)
        return names

    # background loops -------------------------------------------------------------------
    async def run(self) -> None:
        """Run every background loop until :meth:`stop`; supervised in one task group."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop("health", lambda: self.cfg.health.interval_s,
                                      self.probe_all))
            tg.create_task(self._loop("scrape", lambda: self.cfg.scrape.interval_s,
                                      self.scrape_all))
            tg.create_task(self._loop("discovery", self._discovery_interval, self.discover))
            tg.create_task(self._loop("reap", lambda: 0.2, self._reap_async))
            await self._stopping.wait()
            raise _Stop

    def _discovery_interval(self) -> float:
        d = self.cfg.discovery
        return d.interval_s if d is not None else 1.0

    async def _reap_async(self) -> None:
        self._reap()

    async def _loop(self, name: str, interval: Callable[[], float],
                    body: Callable[[], Awaitable[None]]) -> None:
        while not self._stopping.is_set():
            started = self.clock()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s loop iteration failed; retrying next tick", name)
            delay = max(0.0, interval() - (self.clock() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def stop(self) -> None:
        self._stopping.set()

    async def aclose(self) -> None:
        for w in self.workers.values():
            await w.pool.aclose()
            await w.metrics_pool.aclose()

    # health probes ----------------------------------------------------------------------
    async def probe_all(self) -> None:
        self._probe_round += 1
        with_models = self._probe_round % MODEL_PROBE_EVERY == 1
        sem = asyncio.Semaphore(64)

        async def one(w: Worker) -> None:
            async with sem:
                await self.probe(w, with_models=with_models)

        targets = [w for w in self.workers.values() if w.state is not State.GONE]
        await asyncio.gather(*(one(w) for w in targets))

    async def probe(self, w: Worker, *, with_models: bool = False) -> None:
        h = self.cfg.health
        failure = ""  # why the probe failed, for the log when the worker goes down
        try:
            status, _ = await fetch(w.pool, "GET", "/v2/health/ready", timeout_s=h.timeout_s)
            ok = status == 200
            if not ok:
                failure = f"/v2/health/ready answered {status}"
        except UpstreamError as exc:
            ok = False
            failure = str(exc)
        if w.state is State.DRAINING:
            return
        was = w.state
        if ok and (with_models or was is not State.SERVING or not w.models_ready):
            await self.probe_models(w)
        out = after_probe(w.state, ok, w.ok_streak, w.fail_streak, h.rise, h.fall)
        w.ok_streak, w.fail_streak = out.ok_streak, out.fail_streak
        if out.changed:
            w.state = out.state
            if out.state is State.SERVING:
                w.serving_since = self.clock()
            if out.state is State.DOWN:
                log.warning("worker %s %s -> %s: %d failed probes in a row (last: %s)", w.id,
                            was.value, out.state.value, out.fail_streak, failure)
            else:
                log.info("worker %s %s -> %s: %d good probes in a row", w.id, was.value,
                         out.state.value, out.ok_streak)
            self._on_change()

    def learn_model(self, name: str) -> None:
        """Keep probing ``name`` (found on some worker by discovery) on every model poll."""
        self.learned_models[name] = None
        self.learned_models.move_to_end(name)
        while len(self.learned_models) > MAX_LEARNED_MODELS:
            self.learned_models.popitem(last=False)

    async def probe_models(self, w: Worker) -> None:
        """Which models are ready: the repository index, plus configured model names probed
        one by one (PyTriton-bound models are missing from the index)."""
        timeout = self.cfg.health.timeout_s
        ready: set[str] = set()
        try:
            status, body = await fetch(w.pool, "POST", "/v2/repository/index", b"{}",
                                       timeout_s=timeout)
            if status == 200:
                for entry in json.loads(body):
                    if isinstance(entry, dict) and entry.get("state") == "READY":
                        name = str(entry.get("name", ""))
                        ready.add(name)
                        if entry.get("version"):
                            ready.add(f"{name}/{entry['version']}")
        except (UpstreamError, ValueError):
            pass
        for name in [*self.cfg.models, *self.learned_models]:
            if name in ready:
                continue
            try:
                status, _ = await fetch(w.pool, "GET",
                                        f"/v2/models/{urllib.parse.quote(name, safe='')}/ready",
                                        timeout_s=timeout)
            except UpstreamError:
                continue
            if status == 200:
                ready.add(name)
        for name in [n for n in ready if "/" not in n]:
            if not any(m.startswith(name + "/") for m in ready):
                ready.add(name + "/?")
        if ready != w.models_ready:
            w.models_ready = frozenset(ready)
            self._on_change()
        await self._derive_slots(w, [n for n in ready if "/" not in n])

    async def _derive_slots(self, w: Worker, models: list[str]) -> None:
        """What the worker's model configs say. Which models take Triton's ``timeout``
        parameter; which keep sequence state (never sent twice); and, with
        upstream.default_slots: auto (unless the worker's slots are set), its slots —
        enough in flight to keep every model instance busy and one more waiting per
        instance; the rest waits in the gateway's own queue, where priority, deadlines and
        batching apply. A model with Triton's dynamic batcher
        executes up to ``max_batch_size`` requests per instance at once."""
        timeouts: set[str] = set()
        stateful: set[str] = set()
        levels: dict[str, int] = {}
        per_model: dict[str, ModelCapacity] = {}
        for name in sorted(models)[:64]:  # bounded: model names come from the worker
            try:
                status, body = await fetch(w.pool, "GET", f"/v2/models/{name}/config",
                                           timeout_s=self.cfg.health.timeout_s)
                doc = json.loads(body) if status == 200 else None
            except (UpstreamError, ValueError, RecursionError):
                continue
            facts = model_facts(doc)
            if facts is None:
                continue
            if facts.timeout_override:
                timeouts.add(name)
            if facts.sequence_batching:
                stateful.add(name)
            if facts.priority_levels:
                levels[name] = facts.priority_levels
            per_instance = facts.max_batch_size if facts.dynamic_batching else 1
            model_units = facts.instances * max(1, per_instance)
            per_model[name] = ModelCapacity(units=min(MAX_DERIVED_SLOTS, model_units),
                                            static=min(MAX_DERIVED_SLOTS,
                                                       model_units + facts.instances))
        w.passes_timeout = frozenset(timeouts)
        w.stateful_models = frozenset(stateful)
        w.priority_levels = levels
        units = sum(c.units for c in per_model.values())
        slots = sum(c.static for c in per_model.values())
        if not units or self.cfg.upstream.default_slots != "auto" or w.configured_slots is not None:
            if w.model_capacity:
                w.model_capacity = {}
                self._on_change()
            return
        if per_model != w.model_capacity:
            w.model_capacity = per_model
            self._on_change()
        derived = min(MAX_DERIVED_SLOTS, max(2, slots))
        if derived != w.derived_slots or units != w.derived_units:
            w.derived_slots = derived
            w.derived_units = min(MAX_DERIVED_SLOTS, units)
            w.slots = self._slots_for(w)
            log.info("worker %s: %d requests execute at once, %d slots", w.id, units, w.slots)
            self._on_change()

    # metrics scrapes --------------------------------------------------------------------
    async def scrape_all(self) -> None:
        if not self.cfg.scrape.enabled:
            return
        sem = asyncio.Semaphore(self.cfg.scrape.max_concurrency)

        async def one(w: Worker) -> None:
            async with sem:
                await self.scrape(w)

        await asyncio.gather(*(one(w) for w in self.workers.values()
                               if w.state in (State.SERVING, State.JOINING)))

    async def scrape(self, w: Worker) -> None:
        # In-flight around the scrape: the smaller of before and after leaves out requests
        # sent or finished while the page was in transit (conservative for routing's memory
        # estimate, see routing.live_free_bytes).
        in_flight_before = w.in_flight
        try:
            status, body = await fetch(w.metrics_pool, "GET", w.metrics_path,
                                       timeout_s=self.cfg.scrape.timeout_s)
        except UpstreamError:
            w.scrape_errors += 1
            return
        if status != 200:
            w.scrape_errors += 1
            return
        now = self.clock()
        raw = triton_signals.parse_metrics(body.decode("utf-8", "replace"))
        prev = w.raw_metrics if isinstance(w.raw_metrics, triton_signals.RawMetrics) else None
        derived = triton_signals.derive_signals(prev, raw, now, w.raw_metrics_at)
        if derived.gpus and max(in_flight_before, w.in_flight) == 0 and not derived.pending():
            w.idle_free_bytes = derived.free_memory_bytes
        w.signals = dataclasses.replace(
            derived, in_flight_at_scrape=min(in_flight_before, w.in_flight),
            idle_free_bytes=w.idle_free_bytes)
        w.raw_metrics, w.raw_metrics_at = raw, now

    # DNS discovery ----------------------------------------------------------------------
    async def discover(self) -> None:
        d = self.cfg.discovery
        if d is None:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(d.dns_name, d.port, type=socket.SOCK_STREAM), timeout=5.0)
        except (OSError, TimeoutError) as exc:
            log.warning("DNS discovery of %s failed: %s; keeping %d workers", d.dns_name, exc,
                        len(self._discovered))
            return
        found: dict[WorkerId, WorkerConfig] = {}
        for family, _, _, _, sockaddr in infos:
            host = str(sockaddr[0])
            url_host = f"[{host}]" if family == socket.AF_INET6 else host
            wid = f"{host}:{d.port}"
            if wid in found or len(found) >= d.max_workers:
                continue
            found[wid] = WorkerConfig(url=f"http://{url_host}:{d.port}",
                                      metrics_url=f"http://{url_host}:{d.metrics_port}/metrics",
                                      pool=d.pool)
        if found.keys() != self._discovered.keys():
            log.info("DNS %s: %d addresses", d.dns_name, len(found))
            self._discovered = found
            self.apply(self.cfg)


class _Stop(Exception):
    """Raised inside the task group to cancel the loops on stop()."""


async def run_until_stopped(fleet: Fleet) -> None:
    try:
        await fleet.run()
    except* _Stop:
        pass
