"""The batched path: infer requests of a model that batches gather in a per-model
:class:`~gateway.batching.Batcher` and go to a worker as one merged request.

Each member keeps its own priority, tenant and deadline: members are charged to the rate
limits one by one, the merged batch is dispatched with the most urgent member's priority and
the latest member deadline, and a member whose own deadline passes stops waiting (504) and
is withdrawn from a batch not sent yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.batcher import Batcher
from gateway.batching import (
    BatchKey,
    BatchMeta,
    BatchRecord,
    HttpReply,
    NotBatchable,
    compatibility_key,
)
from gateway.config import GatewayConfig
from gateway.dispatch import Call, Dispatcher
from gateway.errors import UpstreamTimeout
from gateway.tensors import parse_infer_request
from gateway.types import ModelKey, Priority
from gateway.upstream import Headers
from gateway.workers import Worker

MAX_BATCHERS = 1024  # one per model that batches; model names come from the fleet


class BatchingGateway:
    __slots__ = ("_any_worker_with", "_cfg", "_clock", "_dispatcher", "_get_json",
                 "_on_batch", "batchers", "model_max_batch")

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
        self.model_max_batch: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<BatchingGateway batchers={len(self.batchers)}>"

    async def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` from its config on a worker (cached; 0 = the model
        does not batch, or no worker could tell)."""
        cached = self.model_max_batch.get(model)
        if cached is not None:
            return cached
        worker = self._any_worker_with(ModelKey(model))
        if worker is None:
            return 0
        status, doc = await self._get_json(worker, f"/v2/models/{model}/config")
        size = 0
        if status == 200 and isinstance(doc, dict):
            raw = doc.get("max_batch_size", 0)
            decoupled = isinstance(doc.get("model_transaction_policy"), dict) and bool(
                doc["model_transaction_policy"].get("decoupled"))
            size = 0 if decoupled or not isinstance(raw, int) else raw
            if len(self.model_max_batch) < MAX_BATCHERS:
                self.model_max_batch[model] = size
        return size

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
            batcher = self.batchers[key.name] = Batcher.from_config(
                cfg, self._send_batch, model_max_batch_size=model_max, on_batch=self._on_batch)
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
        charged to the rate limits one by one already)."""
        call = Call(method="POST", target=bkey.infer_path, headers=list(headers), body=body,
                    key=ModelKey(bkey.model, bkey.version), cost=0,
                    priority=Priority(max(min(meta.priority, Priority.SHEDDABLE),
                                          Priority.CRITICAL)),
                    deadline=meta.deadline, batch_size=max(1, meta.rows))
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
