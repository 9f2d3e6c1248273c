"""The ASGI application: the KServe v2 surface of the gateway.

Pure ASGI on the hot path (inference), because every microsecond spent here comes out of
the gateway's throughput budget; the gateway's own pages (``/metrics``, ``/status``,
``/admin/*``) are a Starlette app it delegates to. No per-request state lives on the
instance.

What each endpoint does (see docs/http.md, "Endpoints, as the gateway answers them"):

* ``/v2/health/live`` — the gateway is up. ``/v2/health/ready`` — at least one worker is
  ready. ``/v2/models/{m}/ready`` — some ready worker has the model (and version) ready.
* ``/v2`` — the gateway's own metadata; ``extensions`` lists only what it really supports.
* model metadata/config — proxied to one ready worker that has the model.
* ``infer``/``generate``/``generate_stream`` — admitted, routed, forwarded byte for byte
  (JSON or binary tensors, compressed or not); ``generate_stream`` is streamed.
* ``/v2/models[/{m}]/stats`` — **aggregated**: the sum over every ready worker.
* ``/v2/repository/index`` — the union over ready workers (plus models known by probing).
* ``/v2/repository/models/{m}/load|unload`` — broadcast to every ready worker, only with
  the admin token (``Authorization: Bearer <admin.token>``); 403 when no token is set.
* shared memory (system or CUDA) — 400: regions are host-local and cannot be balanced.
* trace/logging settings — 400: per-server settings, set them on the workers.

Hostile input: header bounds are checked before anything else (431); every error the
gateway makes is Triton's ``{"error": ...}`` JSON with an ``X-Request-Id``; anything that
escapes as a non-gateway exception is a bug, logged once and answered as a JSON 500. Each
answer carries one ``Date`` header: the worker's when it sent one, else the gateway's (the
server layer adds none, see ``gateway.server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.app.service import GatewayService
from gateway.core.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    HeaderFieldsTooLarge,
    MethodNotAllowed,
    NoHealthyWorker,
    NotFound,
    PayloadTooLarge,
    Rejected,
    SharedMemoryUnsupported,
    Unauthorized,
    UpstreamError,
)
from gateway.core.protocol import Endpoint, Kind, classify, model_target
from gateway.core.requesthead import read_head
from gateway.core.tenants import effective_priority, is_admin
from gateway.core.types import ModelKey
from gateway.engine.dispatch import Call, Lease
from gateway.fleet.discovery import Action
from gateway.fleet.upstream import HOP_BY_HOP, Headers, fetch
from gateway.http.turnstile import Turnstile
from gateway.ops.accesslog import CLIENT_DISCONNECTED

if TYPE_CHECKING:
    from gateway.ops.tracing import Trace

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXTENSIONS = ["classification", "sequence", "binary_tensor_data", "parameters", "statistics",
              "generate"]
_JSON = (b"content-type", b"application/json")
_REQUEST_ID = b"x-request-id"
_BOOT = os.urandom(4).hex()
_ids = itertools.count(1)
_MAX_REQUEST_ID = 128
_DATE = b"date"
_MAX_TIMEOUT_MS = 10**12  # ~32 years: longer deadlines mean "no deadline"
# Set in a request's scope by a server that cancels the task answering it when the client
# disconnects (gateway.http.frontend.CANCELS_ON_DISCONNECT).
CANCELS_ON_DISCONNECT = "gateway.cancels_on_disconnect"
# The requests traced when tracing is on, and their spans' names (the route, not the path).
_TRACED_ROUTES = {Kind.INFER: "/v2/models/{model}/infer",
                  Kind.GENERATE: "/v2/models/{model}/generate",
                  Kind.GENERATE_STREAM: "/v2/models/{model}/generate_stream"}
log = logging.getLogger("gateway.http.proxy")


def _header_deadline_s(raw: bytes | None) -> float | None:
    """``X-Request-Timeout-Ms`` in seconds; None when absent; 400 unless a positive integer."""
    if raw is None:
        return None
    try:
        timeout_ms = int(raw)
    except ValueError:
        raise BadRequest("X-Request-Timeout-Ms must be an integer") from None
    if timeout_ms <= 0:
        raise BadRequest("X-Request-Timeout-Ms must be a positive number of milliseconds")
    # Bounded: a 400-digit number of milliseconds is no float (and no deadline).
    return min(timeout_ms, _MAX_TIMEOUT_MS) / 1000.0


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class ProxyApp:
    def __init__(self, service: GatewayService, admin_app: ASGIApp) -> None:
        self.service = service
        self.admin_app = admin_app
        self.turnstile = Turnstile()
        self._passed_this_turn = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        svc = self.service
        started = svc.clock()
        limits = svc.cfg.upstream
        too_large = header_bounds_error(scope["headers"], limits.max_header_bytes,
                                        limits.max_headers)
        if too_large is not None:
            rid = new_request_id()
            svc.telemetry.request_failed("_none", too_large, is_rejection=False, rid=rid,
                                         latency_s=svc.clock() - started)
            await _send_error(send, too_large, rid)
            return
        endpoint = classify(scope["method"], scope["path"])
        if endpoint.kind is Kind.GATEWAY:
            await self.admin_app(scope, receive, _dated(send))
            return
        rid = _request_id(scope)
        trace: Trace | None = None
        if svc.tracing is not None and endpoint.kind in _TRACED_ROUTES:
            trace = svc.tracing.start_http(scope["method"], _TRACED_ROUTES[endpoint.kind],
                                           scope["headers"])
        try:
            await self._handle(endpoint, scope, receive, send, rid, started, trace)
        except GatewayError as exc:
            self._failed(endpoint, scope, exc, rid, started, trace)
            await _send_error(send, exc, rid)
        except asyncio.CancelledError:
            if trace is not None:
                trace.end(CLIENT_DISCONNECTED, reason="client_disconnected")
            raise
        except ClientGone:
            # Gone while its body was arriving, or cut off by the server layer, which has
            # answered it (a malformed chunk: 400; too slow: 408): nothing more to say.
            if trace is not None:
                trace.end(CLIENT_DISCONNECTED, reason="client_disconnected")
        except Exception:
            # A bug, not the client's doing: one log record, and still Triton's JSON shape.
            log.exception("internal error answering %s %.200s", scope["method"], scope["path"])
            internal = GatewayError("internal gateway error")
            self._failed(endpoint, scope, internal, rid, started, trace)
            await _send_error(send, internal, rid)

    def refuse_early(self, method: bytes, path: str,
                     headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The front end's hook (``gateway.http.frontend``), called as soon as a POST's head
        is parsed: an inference request that would be refused whatever its body — no API key
        where one is required, a token bucket that is empty, a queue that cannot meet the
        ``X-Request-Timeout-Ms`` deadline — gets its whole answer here, as bytes, with no
        task and no body read. None: the request goes the ordinary way (which decides the
        same things again, and everything else). Traced requests always go that way."""
        if not path.startswith("/v2/models/"):
            return None
        svc = self.service
        ep = classify("POST", path)
        if ep.kind not in _TRACED_ROUTES or ep.version or svc.tracing is not None \
                or not svc.model_known(ep.model):
            return None
        started = svc.clock()
        limits = svc.cfg.upstream
        if header_bounds_error(headers, limits.max_header_bytes, limits.max_headers):
            return None
        tenant, default_priority = svc.tenants.identify(headers)
        try:
            if tenant is None and svc.cfg.admission.require_api_key:
                raise Unauthorized("missing or unknown API key")
            refusal = svc.dispatcher.limiter.refusal(tenant, ep.model)
            if refusal is not None:
                raise refusal
            priority_h = timeout_h = None
            for k, v in headers:
                if k == b"x-priority":
                    priority_h = v
                elif k == b"x-request-timeout-ms":
                    timeout_h = v
            if timeout_h is not None:
                deadline_s = _header_deadline_s(timeout_h)
                if deadline_s is not None:
                    priority = effective_priority(default_priority, priority_h)
                    arrived = started - svc.loop_lag.lag_s(started)
                    svc.dispatcher.precheck(priority, arrived + deadline_s, started,
                                            arriving=self._arriving())
        except GatewayError as exc:
            rid = _request_id_of(headers)
            svc.telemetry.request_failed(ep.model, exc, is_rejection=isinstance(exc, Rejected),
                                         rid=rid, tenant=tenant,
                                         latency_s=svc.clock() - started)
            return error_answer(exc, rid)
        # Passed: counted as arriving until the loop's next turn (its task runs then, and
        # waits in the turnstile or reaches the queue) — so that the heads of a herd parsed
        # in one turn do not each see an empty queue.
        self._passed_this_turn += 1
        if self._passed_this_turn == 1:
            asyncio.get_running_loop().call_soon(self._new_turn)
        return None

    def _new_turn(self) -> None:
        self._passed_this_turn = 0

    def _arriving(self) -> int:
        """Inference requests this gateway has taken in that are not yet in the queue or at a
        worker: heads passed in this loop turn, and those waiting at the turnstile."""
        return self._passed_this_turn + self.turnstile.waiting

    def _failed(self, endpoint: Endpoint, scope: Scope, exc: GatewayError, rid: bytes,
                started: float, trace: Trace | None) -> None:
        """The access-log line (and the trace's end) of an error the gateway answers."""
        svc = self.service
        svc.telemetry.request_failed(
            endpoint.model or "_none", exc, is_rejection=isinstance(exc, Rejected), rid=rid,
            tenant=svc.tenants.identify(scope["headers"])[0],
            latency_s=svc.clock() - started,
            trace_id=None if trace is None else trace.end(exc.status, reason=exc.reason))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, ep: Endpoint, scope: Scope, receive: Receive, send: Send,
                      rid: bytes, started: float, trace: Trace | None) -> None:
        kind = ep.kind
        svc = self.service
        if kind in (Kind.INFER, Kind.GENERATE, Kind.GENERATE_STREAM):
            await self._infer(ep, scope, receive, send, rid, started, trace)
        elif kind is Kind.HEALTH_LIVE:
            await _send_empty(send, 200, rid)
        elif kind is Kind.HEALTH_READY:
            ready = svc.fleet.any_ready() and not svc.draining
            await _send_empty(send, 200 if ready else 400, rid)
        elif kind is Kind.SERVER_METADATA:
            await _send_json(send, 200, {"name": "triton-gateway", "version": __version__,
                                         "extensions": EXTENSIONS}, rid)
        elif kind is Kind.MODEL_READY:
            await svc.resolve(ModelKey(ep.model, ep.version), Action.READY)
            await _send_empty(send, 200, rid)
        elif kind in (Kind.MODEL_METADATA, Kind.MODEL_CONFIG):
            suffix = "config" if kind is Kind.MODEL_CONFIG else ""
            await self._forward_one(ep, scope, send, rid, model_target(ep.model, ep.version,
                                                                        suffix))
        elif kind is Kind.MODEL_STATS:
            await _send_json(send, *await svc.aggregates.stats(ep.model, ep.version), rid)
        elif kind is Kind.REPOSITORY_INDEX:
            body = await _read_body(receive, svc.cfg.upstream.max_body_bytes, scope)
            _check_json(body)
            await _send_json(send, 200, await svc.aggregates.repository_index(body), rid)
        elif kind is Kind.REPOSITORY_CONTROL:
            # Checked before the body is read: an unauthorised upload never reaches a worker.
            _authorise_repository_control(scope, svc.cfg.admin.token.reveal())
            body = await _read_body(receive, svc.cfg.upstream.max_body_bytes, scope)
            status, payload = await svc.aggregates.broadcast("POST", scope["path"], body)
            await _send_raw(send, status, [_JSON], payload, rid)
        elif kind is Kind.SHARED_MEMORY:
            raise SharedMemoryUnsupported(
                "shared memory is host-local and not supported through the gateway; send "
                "tensors in the request body (binary tensor extension) instead")
        elif kind is Kind.TRACE_LOGGING:
            raise BadRequest("trace and logging settings are per server; set them on each "
                             "worker directly, not through the gateway")
        elif kind is Kind.METHOD_NOT_ALLOWED:
            raise MethodNotAllowed("Method Not Allowed")
        else:
            raise NotFound("Not Found")

    # inference ----------------------------------------------------------------------------
    async def _infer(self, ep: Endpoint, scope: Scope, receive: Receive, send: Send,
                     rid: bytes, now: float, trace: Trace | None) -> None:
        svc = self.service
        # The deadline counts from arrival at the gateway (``now``, read first thing): dated
        # back by the loop's recent lateness (the turns the request's bytes waited before
        # this code could run), and taken before the turnstile, whose wait is the gateway's.
        arrived = now - svc.loop_lag.lag_s(now)
        cfg = svc.cfg
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        tenant, default_priority = svc.tenants.identify(headers)
        if tenant is None and cfg.admission.require_api_key:
            raise Unauthorized("missing or unknown API key")
        fwd: Headers = []
        priority_h = timeout_h = ihcl = encoding = None
        for k, v in headers:
            if k in HOP_BY_HOP or k == _REQUEST_ID:
                continue
            if k == b"x-priority":
                priority_h = v
                continue
            if k == b"x-request-timeout-ms":
                timeout_h = v
                continue
            if k == b"inference-header-content-length":
                ihcl = v
            elif k == b"content-encoding":
                encoding = v
            fwd.append((k, v))
        fwd.append((_REQUEST_ID, rid))
        header_deadline_s = _header_deadline_s(timeout_h)
        priority = effective_priority(default_priority, priority_h)
        # Health, /metrics and /status never queue behind a storm of inference requests.
        await self.turnstile.enter()
        if header_deadline_s is not None:
            # Herds are cheap to refuse: a request the queue cannot serve in time is refused
            # from its headers, before its body is read.
            svc.dispatcher.precheck(priority, arrived + header_deadline_s, svc.clock(),
                                    arriving=self.turnstile.waiting)
        key = ModelKey(ep.model, ep.version)
        if ep.version or not svc.model_known(ep.model):
            await svc.resolve(key, Action.OTHER)
        svc.telemetry.arrival(ep.model)
        body = await _read_body(receive, cfg.upstream.max_body_bytes, scope)
        model_cfg = cfg.model(ep.model)
        head = None
        if ep.kind is Kind.INFER:
            head = read_head(body, ihcl, encoding, max_bytes=cfg.upstream.max_body_bytes,
                             need_peek=model_cfg.cost == "batch_size"
                             or model_cfg.batching.enabled
                             # fair share: a request's GPU cost goes by its batch size
                             or svc.dispatcher.is_fair
                             or svc.dispatcher.limiter.has_any_gpu_quota)
            if head.shared_memory:
                raise SharedMemoryUnsupported(
                    "shared-memory tensors are host-local and not supported through the "
                    "gateway; send tensor data in the request body instead")
        deadline_s = cfg.admission.queue.default_deadline_s
        if header_deadline_s is not None:
            deadline_s = header_deadline_s
        elif head is not None and head.timeout_us is not None:
            deadline_s = head.timeout_us / 1e6
        batch = head.batch_size if head is not None else 1
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        call = Call(
            method="POST", target=target, headers=fwd, body=body, key=key, priority=priority,
            tenant=tenant, deadline=arrived + deadline_s,
            sequence_id=head.sequence_id if head else None,
            sequence_end=head.sequence_end if head else False,
            batch_size=batch, cost=batch if model_cfg.cost == "batch_size" else 1,
            stream=ep.kind is Kind.GENERATE_STREAM, head=head, trace=trace,
        )
        if trace is not None:
            trace.describe(key, tenant=tenant, priority=priority.name.lower())
        if model_cfg.batching.enabled and head is not None and head.sequence_id is None:
            await self._run_batched(call, scope, receive, send, rid, now)
            return
        await self._run_guarded(call, scope, receive, send, rid, now)

    async def _run_guarded(self, call: Call, scope: Scope, receive: Receive, send: Send,
                           rid: bytes, started: float) -> None:
        """Dispatch and relay; a client that disconnects cancels the upstream request."""
        svc = self.service
        watch = _watch(scope, receive)
        lease: Lease | None = None
        try:
            lease = await svc.dispatcher.dispatch(call)
            await _relay(lease, send, rid, call.stream)
            watch.done = True
            svc.dispatcher.finish(lease)
            trace = call.trace
            svc.telemetry.request_done(
                call.key.name, lease.response.status, svc.clock() - started,
                svc.clock() - lease.started, rid=rid, tenant=call.tenant,
                worker=lease.worker.id, queue_s=lease.queued_s,
                trace_id=None if trace is None else trace.end(lease.response.status,
                                                              worker=lease.worker.id))
        except asyncio.CancelledError:
            if lease is not None:
                lease.response.close()
                svc.dispatcher.finish(lease, aborted=True)
            trace = call.trace
            svc.telemetry.request_aborted(
                call.key.name, rid=rid, tenant=call.tenant,
                worker=lease.worker.id if lease else None, latency_s=svc.clock() - started,
                trace_id=None if trace is None else trace.end(
                    CLIENT_DISCONNECTED, reason="client_disconnected"))
            if watch.done:
                raise
            return
        except UpstreamError as exc:
            if lease is not None:
                svc.dispatcher.finish(lease, ok=svc.dispatcher.judge_failure(call, exc))
            raise
        finally:
            watch.close()

    async def _run_batched(self, call: Call, scope: Scope, receive: Receive, send: Send,
                           rid: bytes, started: float) -> None:
        """The batched path; falls back to a plain forward of the same call (its priority,
        tenant and deadline intact) when it cannot join a batch. A client that disconnects
        withdraws its request from the batch."""
        svc = self.service
        watch = _watch(scope, receive)
        try:
            reply = await svc.batching.submit(call)
            if reply is None:
                watch.close()
                await self._run_guarded(call, scope, receive, send, rid, started)
                return
            watch.done = True
            out = [(k, v) for k, v in reply.headers if k not in HOP_BY_HOP]
            out.append((_REQUEST_ID, rid))
            await _send_raw(send, reply.status, out, reply.body, rid=None)
            trace = call.trace
            svc.telemetry.request_done(
                call.key.name, reply.status, svc.clock() - started, 0.0, rid=rid,
                tenant=call.tenant,
                trace_id=None if trace is None else trace.end(reply.status, batched=True))
        except asyncio.CancelledError:
            if watch.done:
                raise
            trace = call.trace
            svc.telemetry.request_aborted(
                call.key.name, rid=rid, tenant=call.tenant, latency_s=svc.clock() - started,
                trace_id=None if trace is None else trace.end(
                    CLIENT_DISCONNECTED, reason="client_disconnected"))
        finally:
            watch.close()

    async def _forward_one(self, ep: Endpoint, scope: Scope, send: Send, rid: bytes,
                           target: str) -> None:
        svc = self.service
        key = ModelKey(ep.model, ep.version)
        await svc.resolve(key, Action.OTHER)
        worker = svc.any_worker_with(key)
        if worker is None:
            raise NoHealthyWorker(f"no ready worker has model '{ep.model}'", retry_after_s=1.0)
        query = scope.get("query_string") or b""
        if query:
            target += "?" + query.decode("latin-1")
        status, body = await fetch(worker.pool, "GET", target,
                                   timeout_s=svc.cfg.upstream.read_timeout_s)
        await _send_raw(send, status, [_JSON], body, rid)


class _DisconnectWatch:
    """Cancels the current task when the client disconnects before ``done``.

    Watching needs a task blocked in ``receive()``; most requests finish long before a
    client could give up, so the task is only created once the request has taken
    ``ARM_AFTER_S`` — a timer costs far less than a task on the hot path."""

    ARM_AFTER_S = 0.02
    __slots__ = ("_receive", "_task", "_timer", "_watcher", "done")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None
        self.done = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            self.ARM_AFTER_S, self._arm)

    def _arm(self) -> None:
        self._timer = None
        if not self.done:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.done and self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class _Unwatched:
    """In place of a :class:`_DisconnectWatch` where the server cancels the task itself when
    the client goes (``gateway.http.frontend``)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def close(self) -> None:
        self.done = True


def _watch(scope: Scope, receive: Receive) -> _DisconnectWatch | _Unwatched:
    if scope.get(CANCELS_ON_DISCONNECT):
        return _Unwatched()
    return _DisconnectWatch(receive)


async def _relay(lease: Lease, send: Send, rid: bytes, stream: bool) -> None:
    resp = lease.response
    out = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k != _REQUEST_ID]
    out.append((_REQUEST_ID, rid))
    if resp.header(_DATE) is None:
        out.append((_DATE, http_date()))
    if resp.status == 503 and resp.header(b"retry-after") is None:
        # A worker's own "unavailable" (its queue is full): tell the client when to retry,
        # like every rejection the gateway makes itself.
        out.append((b"retry-after", b"1"))
    if not stream:
        body = await resp.read()
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": resp.status, "headers": out})
    async for chunk in resp.stream():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _request_id(scope: Scope) -> bytes:
    return _request_id_of(scope["headers"])


def _request_id_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's ``X-Request-Id`` when it is a sane one (printable, at most 128 bytes),
    else a new one."""
    for k, v in headers:
        if k == _REQUEST_ID:
            if 0 < len(v) <= _MAX_REQUEST_ID and all(32 <= c < 127 for c in v):
                return bytes(v)
            break
    return new_request_id()


# The start of each error answer, by (status, its headers), up to a bound: the rest is the
# date, the request id and the body.
_ANSWER_HEADS: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], bytes] = {}
_ANSWER_HEADS_MAX = 256
# ... and their bodies, by message (a refusal's message names its bucket or its reason).
_ANSWER_BODIES: dict[str, bytes] = {}


def error_answer(exc: GatewayError, rid: bytes) -> bytes:
    """The whole HTTP/1.1 answer for ``exc`` (Triton's JSON, a ``Date``, the request id and,
    for a refusal, ``Retry-After``), from a head made once per kind of error."""
    headers = tuple(exc.headers())
    key = (exc.status, headers)
    head = _ANSWER_HEADS.get(key)
    if head is None:
        if len(_ANSWER_HEADS) >= _ANSWER_HEADS_MAX:
            _ANSWER_HEADS.clear()
        head = b"".join([b"HTTP/1.1 %d %s\r\n" % (exc.status, _phrase(exc.status)),
                         *(k + b": " + v + b"\r\n" for k, v in headers),
                         b"content-length: "])
        _ANSWER_HEADS[key] = head
    body = _ANSWER_BODIES.get(exc.message)
    if body is None or type(exc).body is not GatewayError.body:
        body = exc.body()
        if type(exc).body is GatewayError.body:
            if len(_ANSWER_BODIES) >= _ANSWER_HEADS_MAX:
                _ANSWER_BODIES.clear()
            _ANSWER_BODIES[exc.message] = body
    return b"".join([head, str(len(body)).encode(), b"\r\ndate: ", http_date(),
                     b"\r\nx-request-id: ", rid, b"\r\n\r\n", body])


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def new_request_id() -> bytes:
    return f"{_BOOT}-{next(_ids):x}".encode()


def header_bounds_error(headers: list[tuple[bytes, bytes]], max_bytes: int,
                        max_count: int) -> HeaderFieldsTooLarge | None:
    """431 when the request has more than ``max_count`` header fields or more than
    ``max_bytes`` of names and values together; None when it is within bounds."""
    if len(headers) > max_count:
        return HeaderFieldsTooLarge(
            f"request has {len(headers)} header fields; at most {max_count} are accepted")
    size = 0
    for k, v in headers:
        size += len(k) + len(v)
    if size > max_bytes:
        return HeaderFieldsTooLarge(
            f"request headers are {size} bytes; at most {max_bytes} are accepted")
    return None


_date_second = 0
_date_value = b""


def http_date() -> bytes:
    """The ``Date`` header value for now, formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_value = now, formatdate(now, usegmt=True).encode()
    return _date_value


def _dated(send: Send) -> Send:
    """``send`` that adds a ``Date`` header to the response start (the gateway's own pages)."""
    async def dated(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (_DATE, http_date())]
        await send(message)
    return dated


def _authorise_repository_control(scope: Scope, token: str) -> None:
    """Repository load/unload changes every worker: the admin token or nothing."""
    if not token:
        raise Forbidden("repository control is disabled: set admin.token in the configuration "
                        "and send it as 'Authorization: Bearer <admin.token>'")
    if not is_admin(scope["headers"], token):
        raise Unauthorized("repository control needs the admin token "
                           "('Authorization: Bearer <admin.token>'); an API key is not enough")


def _check_json(body: bytes) -> None:
    """An optional JSON body the gateway reads itself: malformed or too deep is a 400."""
    if body.strip():
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest("failed to parse the request JSON buffer") from None


class ClientGone(Exception):
    """The connection closed before the request body was whole."""


async def _read_body(receive: Receive, max_bytes: int, scope: Scope) -> bytes:
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                if int(v) > max_bytes:
                    raise PayloadTooLarge(
                        f"request body of {int(v)} bytes exceeds the limit of {max_bytes}")
            except ValueError:
                raise BadRequest("invalid Content-Length") from None
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_raw(send: Send, status: int, headers: Headers, body: bytes,
                    rid: bytes | None) -> None:
    out = [*headers, (b"content-length", str(len(body)).encode())]
    if not any(k == _DATE for k, _ in headers):
        out.append((_DATE, http_date()))
    if rid is not None:
        out.append((_REQUEST_ID, rid))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _send_empty(send: Send, status: int, rid: bytes) -> None:
    await _send_raw(send, status, [], b"", rid)


async def _send_json(send: Send, status: int, payload: object, rid: bytes) -> None:
    await _send_raw(send, status, [_JSON], json.dumps(payload).encode(), rid)


async def _send_error(send: Send, exc: GatewayError, rid: bytes) -> None:
    with contextlib.suppress(RuntimeError, OSError):
        await _send_raw(send, exc.status, exc.headers(), exc.body(), rid)
