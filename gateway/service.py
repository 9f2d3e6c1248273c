"""The gateway as one object: configuration, fleet, dispatcher, telemetry, admin pages.

Built once from a :class:`~gateway.config.GatewayConfig`; :meth:`GatewayService.reload`
swaps in a new configuration without dropping a request (in-flight requests keep the
objects they hold; new requests see the new ones). Answers the pool-level questions the
proxy asks (is a model ready anywhere, aggregated statistics, the union of repository
indexes) and keeps the routing table in step with the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from gateway import routing
from gateway.batching import Batcher, BatchKey, BatchRecord, HttpReply, NotBatchable, prepare
from gateway.config import GatewayConfig
from gateway.dispatch import Call, Dispatcher
from gateway.errors import GatewayError, Rejected, UpstreamError
from gateway.fleet import Fleet, run_until_stopped
from gateway.protocol import peek_infer
from gateway.redis_store import RedisStore
from gateway.tensors import decode_content
from gateway.types import ModelKey, Priority, WorkerId
from gateway.upstream import fetch
from gateway.workers import Worker

log = logging.getLogger("gateway")

STATS_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                "cache_hit", "cache_miss")


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


class GatewayService:
    def __init__(self, cfg: GatewayConfig, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        from gateway.admin import build_admin_app
        from gateway.telemetry import Telemetry

        self.cfg = cfg
        self.clock = clock
        self.started_at = time.time()
        self._started_mono = clock()
        self.generation = 1
        self.config_path: str | None = None
        self.rng = rng or random.Random()
        self._serving_seen: dict[WorkerId, float] = {}
        self.fleet = Fleet(cfg, clock=clock, on_change=self._fleet_changed)
        self.table = routing.RoutingTable()
        self.load = FleetLoad(self.fleet.workers)
        self.redis_store = self._make_redis(cfg)
        self.dispatcher = Dispatcher(cfg, self.fleet, clock=clock, rng=self.rng,
                                     redis_store=self.redis_store)
        self.dispatcher.attach(self.table, self.load)
        self.telemetry = Telemetry(self)
        self.admin_app = build_admin_app(self)
        self._keys = self._tenant_keys(cfg)
        self._known: frozenset[str] = frozenset()
        self.draining = False
        self.batchers: dict[str, Batcher] = {}
        self.model_max_batch: dict[str, int] = {}
        self._fleet_changed()

    def __repr__(self) -> str:
        return f"<GatewayService gen={self.generation} {self.fleet!r}>"

    # configuration ------------------------------------------------------------------------
    @staticmethod
    def _tenant_keys(cfg: GatewayConfig) -> dict[str, tuple[str, Priority]]:
        keys: dict[str, tuple[str, Priority]] = {}
        for name, tenant in cfg.admission.tenants.items():
            prio = Priority[tenant.priority.upper()]
            for key in tenant.keys:
                keys[key.reveal()] = (name, prio)
        return keys

    @staticmethod
    def _make_redis(cfg: GatewayConfig) -> RedisStore | None:
        buckets = [cfg.admission.global_limit]
        buckets += [t.rate_limit for t in cfg.admission.tenants.values()]
        buckets += [m.rate_limit for m in cfg.models.values()]
        if not any(b is not None and b.scope == "global" for b in buckets):
            return None
        from gateway.redis_store import RedisStore

        return RedisStore(cfg.admission.redis)

    def reload(self, cfg: GatewayConfig) -> None:
        """Swap in a validated configuration. Workers are added, drained or updated; limits,
        breakers' settings, routing weights take effect for new requests."""
        old_store = self.redis_store
        self.redis_store = self._make_redis(cfg) if cfg.admission.redis != \
            self.cfg.admission.redis or old_store is None else old_store
        self.cfg = cfg
        self._keys = self._tenant_keys(cfg)
        self.fleet.apply(cfg)
        self.dispatcher.reconfigure(cfg, redis_store=self.redis_store)
        self.generation += 1
        self._fleet_changed()
        log.info("configuration generation %d in force", self.generation)

    # fleet → routing table --------------------------------------------------------------
    def _fleet_changed(self) -> None:
        if not hasattr(self, "_serving_seen") or "fleet" not in self.__dict__:
            return  # during construction; __init__ calls this once at the end
        known: set[str] = set(self.cfg.models)
        for w in self.fleet.workers.values():
            known.update(m for m in w.models_ready if "/" not in m)
        self._known = frozenset(known)
        if hasattr(self, "dispatcher"):
            self.refresh_table()
            self.dispatcher.wake_waiters(len(self.fleet.workers) or 1)

    def refresh_table(self) -> None:
        """Re-snapshot every worker into the routing table (signals, readiness, breaker state,
        slow-start share). Called on fleet changes and on every scrape tick — not per request."""
        now = self.clock()
        table = self.table
        board = self.dispatcher.breakers
        present = set()
        for w in self.fleet.workers.values():
            present.add(w.id)
            if w.id not in board:
                board.add_worker(w.id, now, slow_start=False)
            if w.serving_since is not None and self._serving_seen.get(w.id) != w.serving_since:
                # Joined or came back after start-up: a fresh breaker that ramps up.
                if w.id in self._serving_seen or w.serving_since - self._started_mono > \
                        self.cfg.health.interval_s * (self.cfg.health.rise + 2):
                    board.remove_worker(w.id)
                    board.add_worker(w.id, now, slow_start=True)
                self._serving_seen[w.id] = w.serving_since
            snap = w.snapshot(ModelKey(""), now, self.cfg.scrape.stale_after_s,
                              breaker_allows=board.state(w.id, now).gauge != 2,
                              traffic_share=board.traffic_share(w.id, now))
            if self.cfg.admission.adaptive.enabled:
                slots = self.dispatcher.effective_slots(w)
                if slots != snap.slots:
                    snap = dataclasses.replace(snap, slots=slots)
            table.update(snap)
        for wid in [wid for wid in board.workers() if wid not in present]:
            board.remove_worker(wid)
            table.remove(wid)
            self._serving_seen.pop(wid, None)
            self.dispatcher.adaptive.pop(wid, None)

    async def _table_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.cfg.scrape.interval_s))
            try:
                self.refresh_table()
            except Exception:
                log.exception("routing table refresh failed")

    # questions the proxy asks -------------------------------------------------------------
    def model_known(self, name: str) -> bool:
        return name in self._known

    def model_ready(self, key: ModelKey) -> bool:
        return self.any_worker_with(key) is not None

    def any_worker_with(self, key: ModelKey) -> Worker | None:
        ready = [w for w in self.fleet.routable() if w.snapshot(
            key, 0.0, 0.0).has_model(key)]
        return self.rng.choice(ready) if ready else None

    def identify(self, headers: list[tuple[bytes, bytes]]) -> tuple[str | None, Priority]:
        if not self._keys:
            return None, Priority.STANDARD
        for k, v in headers:
            key: bytes | None = None
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                key = v[7:].strip()
            elif k == b"x-api-key":
                key = v.strip()
            if key is not None:
                found = self._keys.get(key.decode("latin-1"))
                if found is not None:
                    return found
        return None, Priority.STANDARD

    async def aggregate_stats(self, model: str, version: str) -> tuple[int, object]:
        """Triton's statistics extension, summed over every ready worker."""
        target = "/v2/models/stats"
        if model:
            target = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + \
                "/stats"
        workers = list(self.fleet.routable())
        if not workers:
            return 503, {"error": "no ready worker"}
        results = await asyncio.gather(*(self._get_json(w, "GET", target) for w in workers))
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        first_error: tuple[int, object] | None = None
        for status, doc in results:
            if status != 200 or not isinstance(doc, dict):
                first_error = first_error or (status, doc)
                continue
            for entry in doc.get("model_stats", []):
                if isinstance(entry, dict):
                    _merge_stats(merged, entry)
        if not merged and first_error is not None:
            return first_error
        return 200, {"model_stats": list(merged.values())}

    async def repository_index(self, body: bytes) -> list[dict[str, Any]]:
        ready_only = False
        if body.strip():
            try:
                doc = json.loads(body)
            except ValueError:
                raise GatewayError("failed to parse the request JSON buffer") from None
            ready_only = isinstance(doc, dict) and bool(doc.get("ready", False))
        workers = list(self.fleet.routable())
        results = await asyncio.gather(*(self._get_json(w, "POST", "/v2/repository/index",
                                                        body or b"{}") for w in workers))
        union: dict[tuple[str, str], dict[str, Any]] = {}
        for status, doc in results:
            if status != 200 or not isinstance(doc, list):
                continue
            for e in doc:
                if not isinstance(e, dict) or "name" not in e:
                    continue
                k = (str(e["name"]), str(e.get("version", "")))
                if k not in union or e.get("state") == "READY":
                    union[k] = e
        listed = {n for n, _ in union}
        for w in workers:
            for m in w.models_ready:
                if "/" not in m and m not in listed:
                    union[(m, "")] = {"name": m, "version": "", "state": "READY"}
                    listed.add(m)
        out = sorted(union.values(), key=lambda e: (e["name"], str(e.get("version", ""))))
        return [e for e in out if e.get("state") == "READY"] if ready_only else out

    async def broadcast(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        workers = list(self.fleet.routable())
        if not workers:
            return 503, b'{"error":"no ready worker"}'
        results = await asyncio.gather(*(self._raw(w, method, target, body) for w in workers))
        for status, payload in results:
            if status != 200:
                return status, payload
        asyncio.get_running_loop().create_task(self._reprobe(workers))
        return 200, results[0][1] or b"{}"

    async def _reprobe(self, workers: list[Worker]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(*(self.fleet.probe_models(w) for w in workers))

    async def _raw(self, w: Worker, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await fetch(w.pool, method, target, body,
                               timeout_s=self.cfg.upstream.read_timeout_s)
        except UpstreamError as exc:
            return exc.status, exc.body()

    async def _get_json(self, w: Worker, method: str, target: str,
                        body: bytes = b"") -> tuple[int, object]:
        status, payload = await self._raw(w, method, target, body)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return 502, {"error": "worker sent invalid JSON"}

    # gateway-side batching ---------------------------------------------------------------
    async def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` from its config on a worker (cached; 0 = the model
        does not batch, or no worker could tell)."""
        cached = self.model_max_batch.get(model)
        if cached is not None:
            return cached
        worker = self.any_worker_with(ModelKey(model))
        if worker is None:
            return 0
        status, doc = await self._get_json(worker, "GET", f"/v2/models/{model}/config")
        size = 0
        if status == 200 and isinstance(doc, dict):
            raw = doc.get("max_batch_size", 0)
            decoupled = isinstance(doc.get("model_transaction_policy"), dict) and bool(
                doc["model_transaction_policy"].get("decoupled"))
            size = 0 if decoupled or not isinstance(raw, int) else raw
            self.model_max_batch[model] = size
        return size

    async def batch_infer(self, key: ModelKey, body: bytes, header_length: bytes | None,
                          encoding: bytes | None, tenant: str | None,
                          cost: int) -> HttpReply | None:
        """Try the batched path; None = not batchable, forward the request as it is."""
        model_max = await self.max_batch_size(key.name)
        if model_max <= 0:
            return None
        cfg = self.cfg.model(key.name).batching
        if encoding:
            body = decode_content(body, encoding.decode("latin-1"),
                                  max_bytes=self.cfg.upstream.max_body_bytes)
        try:
            hl = int(header_length) if header_length is not None else None
        except ValueError:
            return None
        prepared = prepare(key, body, hl, model_max_batch_size=model_max)
        if isinstance(prepared, NotBatchable):
            return None
        request, bkey = prepared
        await self.dispatcher.limiter.admit(tenant, key.name, cost)
        batcher = self.batchers.get(key.name)
        if batcher is None:
            batcher = self.batchers[key.name] = Batcher.from_config(
                cfg, self._send_batch, model_max_batch_size=model_max,
                on_batch=self._on_batch)
        return await batcher.submit(request, bkey)

    def _on_batch(self, record: BatchRecord) -> None:
        self.telemetry.observe_batch(record.key.model, record.members, record.fill_ratio)

    async def _send_batch(self, bkey: BatchKey, body: bytes,
                          headers: list[tuple[bytes, bytes]]) -> tuple[
                              int, list[tuple[bytes, bytes]], bytes]:
        """One merged request, routed as one request of ``rows`` rows (members were
        charged to the rate limits one by one already)."""
        hl = next((v for k, v in headers if k == b"inference-header-content-length"), None)
        rows = peek_infer(body[:int(hl)] if hl else body, need_batch=True).batch_size
        call = Call(method="POST", target=bkey.infer_path, headers=list(headers), body=body,
                    key=ModelKey(bkey.model, bkey.version), cost=0, batch_size=rows,
                    deadline=self.clock() + self.cfg.admission.queue.default_deadline_s)
        lease = await self.dispatcher.dispatch(call)
        try:
            data = await lease.response.read()
        except BaseException:
            self.dispatcher.finish(lease, ok=False)
            raise
        self.dispatcher.finish(lease)
        return lease.response.status, lease.response.headers, data

    # recording ---------------------------------------------------------------------------
    def record_result(self, model: str, status: int, total_s: float, upstream_s: float) -> None:
        self.telemetry.request_done(model, status, total_s, upstream_s)

    def record_error(self, model: str, exc: GatewayError) -> None:
        self.telemetry.request_failed(model, exc, is_rejection=isinstance(exc, Rejected))

    def record_abort(self, model: str) -> None:
        self.telemetry.request_aborted(model)

    # running ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Background work, supervised: fleet loops, routing-table refresh, telemetry."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_until_stopped(self.fleet))
            table = tg.create_task(self._table_loop())
            tele = tg.create_task(self.telemetry.run())
            await self.fleet._stopping.wait()
            table.cancel()
            tele.cancel()

    def stop(self) -> None:
        self.fleet.stop()

    async def aclose(self) -> None:
        for batcher in self.batchers.values():
            await batcher.aclose(timeout_s=5)
        await self.fleet.aclose()
        store = self.redis_store
        if store is not None and hasattr(store, "aclose"):
            await store.aclose()

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.fleet.workers.values())


def _merge_stats(merged: dict[tuple[str, str], dict[str, Any]], entry: dict[str, Any]) -> None:
    k = (str(entry.get("name", "")), str(entry.get("version", "")))
    cur = merged.get(k)
    if cur is None:
        merged[k] = json.loads(json.dumps(entry))
        return
    for f in ("inference_count", "execution_count"):
        cur[f] = int(cur.get(f, 0)) + int(entry.get(f, 0))
    cur["last_inference"] = max(int(cur.get("last_inference", 0)),
                                int(entry.get("last_inference", 0)))
    ci, ei = cur.setdefault("inference_stats", {}), entry.get("inference_stats", {})
    for f in STATS_FIELDS:
        a, b = ci.setdefault(f, {"count": 0, "ns": 0}), ei.get(f, {})
        a["count"] = int(a.get("count", 0)) + int(b.get("count", 0))
        a["ns"] = int(a.get("ns", 0)) + int(b.get("ns", 0))
    by_size = {int(b.get("batch_size", 0)): b for b in cur.get("batch_stats", [])}
    for b in entry.get("batch_stats", []):
        size = int(b.get("batch_size", 0))
        if size not in by_size:
            by_size[size] = json.loads(json.dumps(b))
            continue
        for f in ("compute_input", "compute_infer", "compute_output"):
            a, c = by_size[size].setdefault(f, {"count": 0, "ns": 0}), b.get(f, {})
            a["count"] = int(a.get("count", 0)) + int(c.get("count", 0))
            a["ns"] = int(a.get("ns", 0)) + int(c.get("ns", 0))
    cur["batch_stats"] = [by_size[s] for s in sorted(by_size)]
