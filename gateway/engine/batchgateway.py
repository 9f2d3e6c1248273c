"""The batched path: infer requests of a model that batches gather in a per-model
:class:`~gateway.core.batching.Batcher` and go to a worker as one merged request.

A batch waits for an instance, not only a timer: :meth:`BatchingGateway.instance_counts`
tells each batcher how many of its model's instances are free (the gateway's in-flight
count per worker against the instances in the model's config), and the dispatcher's release
hook (:meth:`BatchingGateway.instance_freed`) wakes it when one frees.

Each member keeps its own priority, tenant and deadline: members are charged to the rate
limits one by one, the merged batch is dispatched with the most urgent member's priority and
the latest member deadline, and a member whose own deadline passes stops waiting (504) and
is withdrawn from a batch not sent yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.core.batching import (
    BATCHES_PER_INSTANCE,
    BatchKey,
    BatchMeta,
    BatchRecord,
    FleetCounts,
    HttpReply,
    NotBatchable,
    compatibility_key,
)
from gateway.core.breaker import BreakerState
from gateway.core.config import GatewayConfig
from gateway.core.errors import UpstreamTimeout
from gateway.core.tensors import parse_infer_request
from gateway.core.types import ModelKey, Priority
from gateway.engine.batcher import Batcher
from gateway.engine.dispatch import Call, Dispatcher
from gateway.fleet.discovery import ModelFacts, model_facts
from gateway.fleet.upstream import Headers
from gateway.fleet.workers import Worker

MAX_BATCHERS = 1024  # one per model that batches; model names come from the fleet


class BatchingGateway:
    __slots__ = ("_any_worker_with", "_cfg", "_clock", "_dispatcher", "_get_json",
                 "_on_batch", "batchers", "model_facts")

    def __init__(self, cfg: Callable[[], GatewayConfig], dispatcher: Dispatcher, *,
                 any_worker_with: Callable[[ModelKey], Worker | None],
                 get_json: Callable[[Worker, str], Awaitable[tuple[int, object]]],
                 clock: Callable[[], float],
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        self._cfg = cfg
        self._dispatcher = dispatcher
        self._any_worker_with = any_worker_with
        self._get_json = get_json
        self._clock = clock
        self._on_batch = on_batch
        self.batchers: dict[str, Batcher] = {}
        self.model_facts: dict[str, ModelFacts] = {}

    def __repr__(self) -> str:
        return f"<BatchingGateway batchers={len(self.batchers)}>"

    async def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` from its config on a worker (cached with the rest of
        the config's facts; 0 = the model does not batch, or no worker could tell)."""
        facts = self.model_facts.get(model)
        if facts is not None:
            return 0 if facts.decoupled else facts.max_batch_size
        worker = self._any_worker_with(ModelKey(model))
        if worker is None:
            return 0
        status, doc = await self._get_json(worker, f"/v2/models/{model}/config")
        facts = model_facts(doc) if status == 200 else None
        if facts is None:
            return 0
        if len(self.model_facts) < MAX_BATCHERS:
            self.model_facts[model] = facts
        return 0 if facts.decoupled else facts.max_batch_size

    def instance_counts(self, model: str) -> FleetCounts:
        """The model's instances on its eligible workers (serving, model ready, breaker not
        open), the gateway's requests of the model in flight there and their shortest recent
        service time. Instances per worker come from the model's config
        (``instance_group``; one when unknown)."""
        facts = self.model_facts.get(model)
        # Each instance takes a batch to execute and one more waiting to start the moment
        # it ends (gateway.core.batching.BATCHES_PER_INSTANCE).
        per_worker = (facts.instances if facts is not None else 1) * BATCHES_PER_INSTANCE
        now = self._clock()
        free = busy = total = 0
        service_s = float("inf")
        breakers = self._dispatcher.breakers
        for w in self._dispatcher.fleet.routable():
            if model not in w.models_ready or (
                    w.id in breakers and breakers.state(w.id, now) is BreakerState.OPEN):
                continue
            n = w.in_flight_by_model.get(model, 0)
            total += per_worker
            busy += n
            free += max(0, per_worker - n)
            if w.latency_ewma_s > 0:
                service_s = min(service_s, w.latency_ewma_s)
        return FleetCounts(free, busy, total, service_s if service_s != float("inf") else 0.0)

    def instance_freed(self, model: str) -> None:
        """The dispatcher's release hook: a request of ``model`` ended."""
        batcher = self.batchers.get(model)
        if batcher is not None:
            batcher.instance_freed()

    async def submit(self, call: Call) -> HttpReply | None:
        """Try the batched path; None = not batchable, dispatch ``call`` as it is."""
        head = call.head
        if head is None or head.peek is None or call.sequence_id is not None:
            return None
        key = call.key
        model_max = await self.max_batch_size(key.name)
        if model_max <= 0:
            return None
        bkey = compatibility_key(key, head.peek, model_max_batch_size=model_max)
        if isinstance(bkey, NotBatchable):
            return None
        batcher = self.batchers.get(key.name)
        if batcher is None:
            if len(self.batchers) >= MAX_BATCHERS:
                return None
            cfg = self._cfg().model(key.name).batching
            name = key.name
            batcher = self.batchers[name] = Batcher.from_config(
                cfg, self._send_batch, model_max_batch_size=model_max, clock=self._clock,
                on_batch=self._on_batch, fleet=lambda: self.instance_counts(name))
        request = parse_infer_request(head.body, head.header_length)
        await self._dispatcher.limiter.admit(call.tenant, key.name, call.cost)
        left_s = call.deadline - self._clock()
        try:
            async with asyncio.timeout(left_s if left_s != float("inf") else None):
                return await batcher.submit(request, bkey, priority=int(call.priority),
                                            deadline=call.deadline, tenant=call.tenant)
        except TimeoutError:
            raise UpstreamTimeout("request deadline expired while its batch was pending",
                                  retry_after_s=1.0) from None

    async def _send_batch(self, bkey: BatchKey, body: bytes, headers: Headers,
                          meta: BatchMeta) -> tuple[int, Headers, bytes]:
        """One merged request, routed as one request of ``rows`` rows (members were
        charged to the rate limits one by one already). In fair order it waits in the flow
        of the tenant with the most rows aboard, and its GPU time is charged to the members'
        tenants by their rows."""
        shares = meta.rows_by_tenant()
        call = Call(method="POST", target=bkey.infer_path, headers=list(headers), body=body,
                    key=ModelKey(bkey.model, bkey.version), cost=0,
                    priority=Priority(max(min(meta.priority, Priority.SHEDDABLE),
                                          Priority.CRITICAL)),
                    deadline=meta.deadline, batch_size=max(1, meta.rows),
                    tenant=shares[0][0] if shares else None, shares=shares)
        lease = await self._dispatcher.dispatch(call)
        try:
            data = await lease.response.read()
        except BaseException:
            self._dispatcher.finish(lease, ok=False)
            raise
        self._dispatcher.finish(lease)
        return lease.response.status, lease.response.headers, data

    async def aclose(self) -> None:
        for batcher in self.batchers.values():
            await batcher.aclose(timeout_s=5)
