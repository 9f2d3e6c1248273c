"""The KServe v2 gRPC listener: Triton's ``inference.GRPCInferenceService`` in front of the
fleet, on the same admission, routing and breakers as the HTTP side.

Generic handlers over raw bytes: no message is deserialized by grpcio; each handler decodes
only what it needs (``gateway.grpc.protocol``) and forwards the bytes it received over a
per-worker channel (``gateway.grpc.channels``), relaying the worker's bytes back.

* ``ServerLive``/``ServerReady``/``ServerMetadata``/``ModelReady`` — the gateway's view, as
  on HTTP (ready = some worker is ready and the gateway is not draining).
* ``ModelMetadata``/``ModelConfig`` — forwarded to one ready worker that has the model.
* ``ModelInfer`` — admitted (rate limits), routed and queued (``Dispatcher.acquire``), sent,
  released; the breaker learns from the worker's status. A request that never reached a
  worker (its channel was not connected and the call failed UNAVAILABLE) is retried on
  another one, by the HTTP side's rule and inside the same retry budget
  (``Dispatcher.may_retry``). Sequence requests stick to their worker (the dispatcher's
  sticky table, shared with HTTP).
* ``ModelStreamInfer`` — ``gateway.grpc.stream``: every request admitted, the stream pinned
  to the worker of its first request.
* ``ModelStatistics`` — summed over every ready worker; ``RepositoryIndex`` — the union;
  ``RepositoryModelLoad``/``Unload`` — broadcast to every ready worker, only with the admin
  token (``authorization: Bearer …``), refused (PERMISSION_DENIED) when none is configured
  (``gateway.grpc.fleet``).
* shared memory, trace and log settings — UNIMPLEMENTED with the reason: regions are
  host-local and the settings are per server.

Models: one catalogue with the HTTP side (``GatewayService.resolve``). A model or version
the fleet has not listed (PyTriton's repository index is empty) is looked up on the workers
on first use, coalesced, cached and bounded exactly as for HTTP; an unknown model or version
gets Triton's own NOT_FOUND and message, ``ModelReady`` answers ``ready: false``.

The client's ``grpc-timeout`` is the request's deadline (else Triton's ``timeout``
parameter, else ``admission.queue.default_deadline_s``). Gateway errors reach the client as
gRPC statuses (``grpc_protocol.code_for_error``), rejections with trailing metadata
``retry-after`` (seconds) — except a deadline the gateway cannot meet, or that ran out while
the request waited, which is DEADLINE_EXCEEDED, as Triton answers (retrying with the same
deadline cannot help); a worker's own error status is relayed unchanged.

Tracing (``tracing.otlp_endpoint``): each ``ModelInfer`` is a span, each stream one span
with its requests' admission, queue and routing inside (``gateway.ops.tracing``); the worker
gets the upstream attempt's ``traceparent`` as metadata. Off, the client's ``traceparent``
and ``tracestate`` metadata reach the worker unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

from gateway import __version__
from gateway.core import batching_grpc as grpc_batching
from gateway.core.batching import NotBatchable
from gateway.core.errors import (
    GatewayError,
    NoHealthyWorker,
    Rejected,
    SharedMemoryUnsupported,
    Unauthorized,
    retry_after_header,
)
from gateway.core.requesthead import read_head
from gateway.core.tensors import encode_infer_request, header_length_of, parse_infer_response
from gateway.core.types import ModelKey, Priority, WorkerId
from gateway.engine.dispatch import Call
from gateway.fleet.discovery import Action
from gateway.fleet.workers import Worker, worker_id
from gateway.grpc import protocol as proto
from gateway.grpc.channels import (
    ChannelCache,
    Metadata,
    UpstreamStatus,
    WorkerChannel,
    forwardable,
    header_pairs,
    metadata_of,
    metadata_value,
)
from gateway.grpc.fleet import FleetRpcs
from gateway.grpc.stream import StreamRelay
from gateway.ops.accesslog import CLIENT_DISCONNECTED

if TYPE_CHECKING:
    from gateway.app.service import GatewayService
    from gateway.ops.tracing import Trace

log = logging.getLogger("gateway.grpc")

DEFAULT_TRITON_GRPC_PORT = 8001
EXTENSIONS = ("classification", "sequence", "parameters", "statistics")
PRUNE_INTERVAL_S = 5.0
# How often channels of routable workers are asked to connect (idle ones reconnect too).
CONNECT_INTERVAL_S = 1.0
CHANNEL_CLOSE_GRACE_S = 5.0

Handler = Callable[[bytes, Any], Awaitable[bytes]]
MODEL_INFER_SPAN = f"{proto.SERVICE}/ModelInfer"
STREAM_INFER_SPAN = f"{proto.SERVICE}/ModelStreamInfer"


class Unimplemented(GatewayError):
    status = 501
    reason = "unimplemented"


class BatchFailed(GatewayError):
    """A batch a ``ModelInfer`` joined failed: its status (the worker's or the gateway's),
    with Triton's error message."""

    status = 502
    reason = "upstream_error"

    @classmethod
    def of(cls, status: int, headers: Iterable[tuple[bytes, bytes]],
           body: bytes) -> BatchFailed:
        try:
            doc = json.loads(body)
            message = str(doc["error"]) if isinstance(doc, dict) else body.decode()
        except (ValueError, KeyError, UnicodeDecodeError):
            message = body[:200].decode("utf-8", "replace")
        retry = next((v for k, v in headers if k.lower() == b"retry-after"), None)
        exc = cls(message, retry_after_s=float(retry) if retry and retry.isdigit() else None)
        exc.status = status
        return exc


def error_trailers(exc: GatewayError) -> Metadata:
    if exc.retry_after_s is None or proto.code_for_error(exc) == "DEADLINE_EXCEEDED":
        return ()
    return (("retry-after", str(retry_after_header(exc.retry_after_s))),)


class GrpcGateway:
    """The gRPC listener of one :class:`~gateway.app.service.GatewayService`."""

    def __init__(self, svc: GatewayService) -> None:
        self.svc = svc
        self.channels = ChannelCache(svc.cfg.upstream.max_body_bytes)
        self.port: int | None = None
        self._server: Any = None
        self._retired: list[WorkerChannel] = []
        self._addresses: dict[WorkerId, str] = {}
        self._addresses_for: object = None
        self._prune_task: asyncio.Task[None] | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"<GrpcGateway port={self.port} {self.channels!r} counters={dict(self.counters)}>"

    def statistics(self) -> dict[str, float]:
        return {"channels": len(self.channels),
                **{k: float(v) for k, v in self.counters.items()}}

    # lifecycle ----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Bind and start serving; returns the bound port (``port`` 0 picks a free one)."""
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.svc.cfg.upstream.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ])
        server.add_generic_rpc_handlers((self._handlers(),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC listener to {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot bind the gRPC listener to {address}")
        await server.start()
        self._server = server
        self.port = int(bound)
        self._prune_task = asyncio.create_task(self._prune_loop(), name="grpc-channel-prune")
        log.info("gRPC listener on %s:%d", host, self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let those in flight finish for ``grace_s``, close channels."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
            self._prune_task = None
        closing = self.channels.drain() + self._retired
        self._retired = []
        await asyncio.gather(*(ch.aclose() for ch in closing), return_exceptions=True)

    def connect_routable(self) -> None:
        """Ask the channel of every routable worker to connect now (non-blocking), so that a
        worker's first requests do not pay for the connection: their latency is a sample
        the router learns the worker's service time from."""
        for worker in self.svc.fleet.routable():
            self.channel(worker).connect()

    async def _prune_loop(self) -> None:
        pruned_at = self.svc.clock()
        while True:
            self.connect_routable()
            await asyncio.sleep(CONNECT_INTERVAL_S)
            if self.svc.clock() - pruned_at < PRUNE_INTERVAL_S:
                continue
            pruned_at = self.svc.clock()
            closing = self.channels.stale(self.svc.fleet.workers) + self._retired
            self._retired = []
            if closing:
                await asyncio.gather(*(ch.channel.close(grace=CHANNEL_CLOSE_GRACE_S)
                                       for ch in closing), return_exceptions=True)

    # channels ---------------------------------------------------------------------------
    def grpc_address(self, worker: Worker) -> str:
        cfg = self.svc.cfg
        if self._addresses_for is not cfg:
            self._addresses = {worker_id(wc.url): wc.resolved_grpc_url() for wc in cfg.workers}
            self._addresses_for = cfg
        found = self._addresses.get(worker.id)
        if found is not None:
            return found
        host = f"[{worker.host}]" if ":" in worker.host else worker.host
        return f"{host}:{DEFAULT_TRITON_GRPC_PORT}"

    def channel(self, worker: Worker) -> WorkerChannel:
        ch, replaced = self.channels.get(worker.id, self.grpc_address(worker))
        if replaced is not None:
            self._retired.append(replaced)
        return ch

    # fleet questions (the same catalogue and answers as the HTTP side) ------------------
    async def resolve(self, key: ModelKey, action: Action = Action.OTHER) -> None:
        """Some ready worker serves ``key``, looked up on the workers on first use (the HTTP
        side's discovery, ``GatewayService.resolve``); else Triton's own error is raised."""
        await self.svc.resolve(key, action)

    def workers_with(self, key: ModelKey) -> list[Worker]:
        return [w for w in self.svc.fleet.routable()
                if w.snapshot(key, 0.0, 0.0).has_model(key)]

    def identify(self, md: Metadata) -> tuple[str | None, Priority]:
        tenant, default = self.svc.tenants.identify(header_pairs(md))
        if tenant is None and self.svc.cfg.admission.require_api_key:
            raise Unauthorized("missing or unknown API key")
        return tenant, Priority.parse(metadata_value(md, "x-priority"), default)

    def deadline(self, context: Any, timeout_us: int | None) -> float:
        """Monotonic deadline: the client's grpc-timeout, else Triton's timeout parameter,
        else the configured default."""
        now = self.svc.clock()
        left = context.time_remaining()
        if left is not None and left < 1e9:
            return now + max(0.0, float(left))
        if timeout_us is not None:
            return now + timeout_us / 1e6
        return now + self.svc.cfg.admission.queue.default_deadline_s

    async def call_for(self, facts: proto.GrpcInferFacts, tenant: str | None,
                       priority: Priority, deadline: float) -> Call:
        """The dispatcher's ``Call`` for one ``ModelInferRequest``, once its model (and
        version) is known to be served — looked up as on HTTP when it is not listed."""
        svc = self.svc
        if facts.key.version or not svc.model_known(facts.key.name):
            await svc.resolve(facts.key, Action.OTHER)
        if facts.shared_memory:
            raise SharedMemoryUnsupported(
                "shared-memory tensors are host-local and not supported through the gateway; "
                "send tensor data in the request (raw_input_contents) instead")
        cost = facts.batch_size if self.svc.cfg.model(facts.key.name).cost == "batch_size" \
            else 1
        return Call(method="POST", target="ModelInfer", headers=[], body=b"", key=facts.key,
                    priority=priority, tenant=tenant, deadline=deadline,
                    sequence_id=facts.sequence_id, sequence_end=facts.sequence_end,
                    batch_size=facts.batch_size, cost=cost)

    async def acquire_on(self, call: Call, worker: WorkerId) -> Worker:
        """Take a slot on ``worker`` only (waiting in the dispatcher's queue while it is
        full): the router may pick no other, as every other worker counts as tried."""
        others = {wid for wid in self.svc.fleet.workers if wid != worker}
        try:
            return await self.svc.dispatcher.acquire(call, others)
        except NoHealthyWorker:
            raise NoHealthyWorker(f"worker {worker} of this stream can no longer serve model "
                                  f"'{call.key}'", retry_after_s=1.0) from None

    def upstream_timeout_s(self, deadline: float) -> float:
        left = deadline - self.svc.clock()
        return max(0.001, min(self.svc.cfg.upstream.read_timeout_s, left))

    # handlers ---------------------------------------------------------------------------
    def _handlers(self) -> Any:
        fleet = FleetRpcs(self)
        unary: dict[str, Handler] = {
            "ServerLive": self._server_live, "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata, "ModelReady": self._model_ready,
            "ModelMetadata": self._model_metadata, "ModelConfig": self._model_config,
            "ModelInfer": self._model_infer, "ModelStatistics": fleet.model_statistics,
            "RepositoryIndex": fleet.repository_index,
            "RepositoryModelLoad": fleet.repository_load,
            "RepositoryModelUnload": fleet.repository_unload,
        }
        for name in ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                     "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                     "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"):
            unary[name] = self._shared_memory
        unary["TraceSetting"] = unary["LogSettings"] = self._trace_log
        methods = {name: grpc.unary_unary_rpc_method_handler(self._guard(fn))
                   for name, fn in unary.items()}
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self._stream_infer)
        return grpc.method_handlers_generic_handler(proto.SERVICE, methods)

    def _guard(self, fn: Handler) -> Handler:
        async def handler(request: bytes, context: Any) -> bytes:
            try:
                return await fn(request, context)
            except GatewayError as exc:
                await context.abort(grpc.StatusCode[proto.code_for_error(exc)],
                                    exc.message, error_trailers(exc))
            except UpstreamStatus as exc:
                await context.abort(exc.code, exc.details, exc.trailers)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover
        return handler

    async def _server_live(self, request: bytes, context: Any) -> bytes:
        return proto.server_live(True)

    async def _server_ready(self, request: bytes, context: Any) -> bytes:
        svc = self.svc
        return proto.server_ready(any(True for _ in svc.fleet.routable()) and not svc.draining)

    async def _server_metadata(self, request: bytes, context: Any) -> bytes:
        return proto.server_metadata("triton-gateway", __version__, EXTENSIONS)

    async def _model_ready(self, request: bytes, context: Any) -> bytes:
        key = proto.read_model_key(request, "ModelReadyRequest")
        try:
            await self.resolve(key, Action.READY)
        except GatewayError:
            return proto.model_ready(False)  # Triton: not ready, not an error
        return proto.model_ready(bool(self.workers_with(key)))

    async def _model_metadata(self, request: bytes, context: Any) -> bytes:
        key = proto.read_model_key(request, "ModelMetadataRequest")
        return await self._forward_one(key, "ModelMetadata", request, context)

    async def _model_config(self, request: bytes, context: Any) -> bytes:
        key = proto.read_model_key(request, "ModelConfigRequest")
        return await self._forward_one(key, "ModelConfig", request, context)

    async def _forward_one(self, key: ModelKey, method: str, request: bytes,
                           context: Any) -> bytes:
        await self.resolve(key)
        workers = self.workers_with(key)
        if not workers:
            raise NoHealthyWorker(f"no ready worker has model '{key}'", retry_after_s=1.0)
        worker = self.svc.rng.choice(workers)
        return await self.send(worker, method, request, forwardable(metadata_of(context)),
                                self.svc.cfg.upstream.read_timeout_s)

    async def send(self, worker: Worker, method: str, request: bytes, md: Metadata,
                   timeout_s: float) -> bytes:
        """One unary call to ``worker``, bytes both ways; a worker's error status raises
        :class:`UpstreamStatus`."""
        try:
            reply: bytes = await self.channel(worker).unary(method)(
                request, timeout=timeout_s, metadata=md)
        except grpc.aio.AioRpcError as exc:
            raise UpstreamStatus.of(exc) from None
        return reply

    async def _shared_memory(self, request: bytes, context: Any) -> bytes:
        raise Unimplemented("shared memory is host-local and not supported through the "
                            "gateway; send tensor data in the request instead")

    async def _trace_log(self, request: bytes, context: Any) -> bytes:
        raise Unimplemented("trace and logging settings are per server; set them on each "
                            "worker directly, not through the gateway")

    # inference ----------------------------------------------------------------------------
    async def _model_infer(self, request: bytes, context: Any) -> bytes:
        svc = self.svc
        started = svc.clock()
        md = metadata_of(context)
        trace = None if svc.tracing is None else svc.tracing.start_grpc(MODEL_INFER_SPAN, md)
        model = "_none"
        rid: bytes | None = None
        tenant: str | None = None
        try:
            facts = proto.read_infer_request(request)
            model = facts.key.name
            rid = facts.request_id.encode() if facts.request_id else None
            tenant, priority = self.identify(md)
            call = await self.call_for(facts, tenant, priority,
                                       self.deadline(context, facts.timeout_us))
            if trace is not None:
                call.trace = trace
                trace.describe(facts.key, tenant=tenant, priority=priority.name.lower())
            if svc.cfg.model(facts.key.name).batching.enabled and call.sequence_id is None:
                batched = await self._infer_batched(call, request)
                if batched is not None:
                    svc.telemetry.request_done(
                        model, 200, svc.clock() - started, 0.0, rid=rid, tenant=tenant,
                        trace_id=None if trace is None else trace.end(200, grpc_code="OK",
                                                                      batched=True))
                    return batched
            await svc.dispatcher.admit(call)
            reply, upstream_s, worker = await self._infer_routed(call, request,
                                                                 forwardable(md), trace)
        except GatewayError as exc:
            code = proto.code_for_error(exc)
            svc.telemetry.request_failed(
                model, exc, is_rejection=isinstance(exc, Rejected), rid=rid, tenant=tenant,
                latency_s=svc.clock() - started,
                trace_id=None if trace is None else trace.end(exc.status, reason=exc.reason,
                                                              grpc_code=code))
            raise
        except UpstreamStatus as exc:
            status = proto.status_for_code(exc.code.name)
            svc.telemetry.request_done(
                model, status, svc.clock() - started, 0.0, rid=rid, tenant=tenant,
                trace_id=None if trace is None else trace.end(status,
                                                              grpc_code=exc.code.name))
            raise
        except asyncio.CancelledError:
            svc.telemetry.request_aborted(
                model, rid=rid, tenant=tenant, latency_s=svc.clock() - started,
                trace_id=None if trace is None else trace.end(
                    CLIENT_DISCONNECTED, reason="client_disconnected", grpc_code="CANCELLED"))
            raise
        svc.telemetry.request_done(
            model, 200, svc.clock() - started, upstream_s, rid=rid, tenant=tenant,
            worker=worker,
            trace_id=None if trace is None else trace.end(200, worker=worker, grpc_code="OK"))
        return reply

    async def _infer_batched(self, call: Call, request: bytes) -> bytes | None:
        """The HTTP side's batched path (``batching.enabled``): the request joins its model's
        batcher, shared with HTTP infer requests (``gateway.core.batching_grpc`` translates); None
        when it cannot join a batch — it is then sent alone, as received."""
        infer = grpc_batching.read_request(request)
        if isinstance(infer, NotBatchable):
            return None
        encoded = encode_infer_request(infer, binary=True)
        hl = encoded.header_length
        call.head = read_head(encoded.body, None if hl is None else str(hl).encode(), None,
                              max_bytes=self.svc.cfg.upstream.max_body_bytes, need_peek=True)
        reply = await self.svc.batching.submit(call)
        if reply is None:
            return None
        if reply.status != 200:
            raise BatchFailed.of(reply.status, reply.headers, reply.body)
        try:
            response = parse_infer_response(reply.body, header_length_of(reply.headers))
        except GatewayError as exc:
            raise BatchFailed(f"bad batched response: {exc.message}") from None
        self.counters["batched"] += 1
        return grpc_batching.response_bytes(response)

    async def _infer_routed(self, call: Call, request: bytes, md: Metadata,
                            trace: Trace | None = None) -> tuple[bytes, float, WorkerId]:
        """Route and send ``request``, retrying where safe; (reply, upstream seconds, the
        worker that answered)."""
        svc = self.svc
        dispatcher = svc.dispatcher
        tried: set[WorkerId] = set()
        attempts = 0
        while True:
            worker = await dispatcher.acquire(call, tried)
            ahead = worker.in_flight - 1
            attempts += 1
            started = svc.clock()
            channel = self.channel(worker)
            connected = channel.is_connected()
            sent_md = md if trace is None else trace.attempt_metadata(worker.id, attempts, md)
            try:
                reply: bytes = await channel.unary("ModelInfer")(
                    request, timeout=self.upstream_timeout_s(call.deadline), metadata=sent_md)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if trace is not None:
                    trace.attempt_failed(proto.status_for_code(code),
                                         f"{code}: {exc.details() or ''}")
                if code == "DEADLINE_EXCEEDED" and call.deadline <= svc.clock() + 0.001:
                    ok: bool | None = None  # the client's own deadline, not the worker's fault
                else:
                    ok = code not in proto.WORKER_FAILURE_CODES and code != "DEADLINE_EXCEEDED"
                dispatcher.release(worker, call.key.name, started, ok=ok)
                # The HTTP side's rule and retry budget (one per dispatcher).
                stage, status = proto.failed_attempt(code, connected=connected)
                if ok is False and dispatcher.may_retry(stage, status, attempts, tried,
                                                        worker, call=call):
                    continue
                raise UpstreamStatus.of(exc) from None
            except asyncio.CancelledError:
                dispatcher.release(worker, call.key.name, started, ok=None)
                self.counters["cancelled"] += 1
                raise
            except BaseException:
                dispatcher.release(worker, call.key.name, started, ok=False)
                raise
            dispatcher.release(worker, call.key.name, started, ok=True, ahead=ahead)
            if call.sequence_id is not None:
                dispatcher.sticky.record(call.sequence_id, worker.id, end=call.sequence_end)
            return reply, svc.clock() - started, worker.id

    async def _stream_infer(self, request_iterator: Any, context: Any) -> None:
        svc = self.svc
        md = metadata_of(context)
        trace = None if svc.tracing is None else svc.tracing.start_grpc(STREAM_INFER_SPAN, md)
        status, code, reason = 200, "OK", None
        try:
            tenant, priority = self.identify(md)
            relay = StreamRelay(self, context, forwardable(md), tenant, priority, trace)
            await relay.run(request_iterator)
        except GatewayError as exc:
            status, code, reason = exc.status, proto.code_for_error(exc), exc.reason
            await context.abort(grpc.StatusCode[code], exc.message, error_trailers(exc))
        except UpstreamStatus as exc:
            status, code = proto.status_for_code(exc.code.name), exc.code.name
            await context.abort(exc.code, exc.details, exc.trailers)
        except asyncio.CancelledError:
            status, code, reason = CLIENT_DISCONNECTED, "CANCELLED", "client_disconnected"
            raise
        finally:
            if trace is not None:
                trace.end(status, reason=reason, grpc_code=code)


async def start_grpc(svc: GatewayService) -> GrpcGateway:
    """Start the gRPC listener on ``listen.host``:``listen.grpc_port``."""
    gw = GrpcGateway(svc)
    port = svc.cfg.listen.grpc_port
    assert port is not None
    await gw.start(svc.cfg.listen.host, port)
    return gw
