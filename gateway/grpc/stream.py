"""``ModelStreamInfer``: one client stream relayed to one worker stream.

Rules:

* Every request on the stream is admitted (rate limits) and takes a slot like a
  ``ModelInfer``. The first request is routed; the stream then stays on that worker (its
  requests may belong to a sequence, and a decoupled model answers on the stream that asked),
  so later requests wait only for a slot *there*. A request the gateway refuses gets an
  in-stream error (``error_message``, as Triton sends) and the stream goes on.
* Responses are relayed in the order the worker sends them; a decoupled model may send
  several per request. A request's slot is released by its final response: one carrying
  ``triton_final_response: true``, an error, or any response without that parameter (a
  model that is not decoupled). A decoupled model says its last word only in an empty final
  response, which Triton sends only when asked: so the gateway asks
  (``triton_enable_empty_final_response``, appended to the request's bytes) and swallows
  those markers — unless the client asked for them itself on this stream, then it gets them
  all. Slots still held when the stream ends are released then.
* The worker's stream failing ends the client's stream with the worker's status; its slots
  count as the worker's failures (UNAVAILABLE, INTERNAL…). The client cancelling releases
  them as abandoned, never the worker's fault, and cancels the worker's stream.
* Traced (``tracing.otlp_endpoint``): the stream is one span; each request's admission,
  queue and routing spans sit in it, and the worker's stream is one upstream span whose
  ``traceparent`` the worker gets as metadata. Each request writes its access-log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import TYPE_CHECKING, Any

import grpc

from gateway.core.errors import GatewayError, Rejected
from gateway.core.types import Priority
from gateway.fleet.workers import Worker
from gateway.grpc import protocol as proto
from gateway.grpc.channels import Metadata, UpstreamStatus

if TYPE_CHECKING:
    from gateway.grpc.host import GrpcHost
    from gateway.ops.tracing import Trace


class StreamRelay:
    """The state of one ``ModelStreamInfer`` call; :meth:`run` carries it out."""

    __slots__ = ("_call", "_context", "_gw", "_metadata", "_outstanding", "_pass_empty_finals",
                 "_priority", "_pump", "_reader", "_tenant", "_trace", "_upstream_error",
                 "_worker", "_write_lock")

    def __init__(self, gw: GrpcHost, context: Any, metadata: Metadata,
                 tenant: str | None, priority: Priority, trace: Trace | None = None) -> None:
        self._gw = gw
        self._trace = trace
        self._context = context
        self._metadata = metadata
        self._tenant = tenant
        self._priority = priority
        self._worker: Worker | None = None
        self._call: Any = None
        self._pump: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._upstream_error: UpstreamStatus | None = None
        # (model, sent, arrived, request id) of each request sent and not yet finally
        # answered, oldest first
        self._outstanding: collections.deque[tuple[str, float, float, bytes | None]] = \
            collections.deque()
        self._write_lock = asyncio.Lock()
        self._pass_empty_finals = False

    def __repr__(self) -> str:
        where = self._worker.id if self._worker is not None else "unrouted"
        return f"<StreamRelay {where} outstanding={len(self._outstanding)}>"

    async def run(self, requests: Any) -> None:
        reader = self._reader = asyncio.create_task(self._read_all(requests))
        try:
            try:
                await reader
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._upstream_error is None or (task is not None and task.cancelling()):
                    raise
            if self._call is not None and self._upstream_error is None:
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                    await self._call.done_writing()
                if self._pump is not None:
                    await self._pump
            if self._upstream_error is not None:
                raise self._upstream_error
            self._release_all(ok=True)
        finally:
            reader.cancel()
            if self._pump is not None:
                self._pump.cancel()
            if self._call is not None:
                self._call.cancel()
            self._release_all(ok=None)  # whatever is left was abandoned

    async def _read_all(self, requests: Any) -> None:
        async for raw in requests:
            await self._one(raw)

    async def _one(self, raw: bytes) -> None:
        gw = self._gw
        svc = gw.svc
        facts: proto.GrpcInferFacts | None = None
        started = svc.clock()
        try:
            facts = proto.read_infer_request(raw)
            call = await gw.call_for(facts, self._tenant, self._priority,
                                     gw.deadline(self._context, facts.timeout_us))
            trace = self._trace
            if trace is not None:
                call.trace = trace
                trace.describe(facts.key, tenant=self._tenant,
                               priority=self._priority.name.lower())
            await svc.dispatcher.admit(call)
            if self._worker is None:
                worker = await svc.dispatcher.acquire(call, set())
            else:
                worker = await gw.acquire_on(call, self._worker.id)
        except GatewayError as exc:
            model = facts.key.name if facts is not None else "_none"
            svc.telemetry.request_failed(
                model, exc, is_rejection=isinstance(exc, Rejected), rid=_rid(facts),
                tenant=self._tenant, latency_s=svc.clock() - started, trace_id=self._trace_id)
            await self._write(proto.stream_error(exc.message, facts))
            return
        if self._worker is None:
            self._open(worker)
        elif worker is not self._worker:  # pragma: no cover - acquire was pinned
            svc.dispatcher.release(worker, facts.key.name, svc.clock(), ok=None)
            await self._write(proto.stream_error("the stream's worker changed", facts))
            return
        if call.sequence_id is not None:
            svc.dispatcher.sticky.record(call.sequence_id, worker.id, end=call.sequence_end)
        self._outstanding.append((facts.key.name, svc.clock(), started, _rid(facts)))
        if facts.asks_empty_final:
            self._pass_empty_finals = True
        else:
            raw += proto.ASK_EMPTY_FINAL
        try:
            await self._call.write(raw)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the worker's stream failed: the pump reports it

    def _open(self, worker: Worker) -> None:
        gw = self._gw
        self._worker = worker
        left = self._context.time_remaining()
        timeout = None if left is None or left >= 1e9 else max(0.001, float(left))
        md = self._metadata
        if self._trace is not None:
            md = self._trace.attempt_metadata(worker.id, 1, md)
        self._call = gw.channel(worker).stream("ModelStreamInfer", md, timeout)
        self._pump = asyncio.create_task(self._relay_responses())

    async def _relay_responses(self) -> None:
        call = self._call
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                kind = proto.read_stream_response(raw)
                if kind.final:
                    self._release_one(ok=True)
                if not kind.empty_final or self._pass_empty_finals:
                    await self._write(raw)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED:
                return
            error = self._upstream_error = UpstreamStatus.of(exc)
            worker = self._worker.id if self._worker is not None else "?"
            error.details = f"worker {worker} failed during the stream: {error.details}"
            self._release_all(ok=exc.code().name not in proto.WORKER_FAILURE_CODES)
            if self._reader is not None:
                self._reader.cancel()  # stop reading requests: the stream is over

    async def _write(self, raw: bytes) -> None:
        async with self._write_lock:
            await self._context.write(raw)

    def _release_one(self, *, ok: bool | None) -> None:
        if not self._outstanding or self._worker is None:
            return
        model, sent, arrived, rid = self._outstanding.popleft()
        svc = self._gw.svc
        svc.dispatcher.release(self._worker, model, sent, ok=ok)
        latency_s = svc.clock() - arrived
        if ok is not None:
            svc.telemetry.request_done(model, 200 if ok else 503, latency_s, svc.clock() - sent,
                                       rid=rid, tenant=self._tenant, worker=self._worker.id,
                                       trace_id=self._trace_id)
        else:
            svc.telemetry.request_aborted(model, rid=rid, tenant=self._tenant,
                                          worker=self._worker.id, latency_s=latency_s,
                                          trace_id=self._trace_id)

    def _release_all(self, *, ok: bool | None) -> None:
        while self._outstanding:
            self._release_one(ok=ok)

    @property
    def _trace_id(self) -> str | None:
        return None if self._trace is None else self._trace.trace_id


def _rid(facts: proto.GrpcInferFacts | None) -> bytes | None:
    return facts.request_id.encode() if facts is not None and facts.request_id else None
