"""Triton simulator: many simulated KServe v2 workers in one process.

``python -m gateway sim --workers N --base-port P`` serves N workers on ports P … P+N-1
(``--base-port 0``: free ports, printed at start). Each port speaks the Triton HTTP endpoints
the gateway uses (health, server/model metadata, model ready/config/stats, repository index,
inference in JSON and in the binary tensor extension) **and serves Triton's metrics page at
``GET /metrics`` on the same port** (a real Triton uses a second port, 8002): point a worker's
``metrics_url`` at ``http://host:port/metrics``.

Run-time control, JSON in, JSON out, on every worker port (and on ``--control-port`` if
given, which serves nothing else):

* ``POST /sim/control`` ``{"worker": 3 | [1, 2] | "all", <changes>}`` — without ``worker``
  the worker owning the port. Changes: any :class:`~gateway.simcore.Faults` field
  (``error_rate``, ``added_latency_ms``, ``hang``, ``ready``, ``metrics`` ok|error|hang),
  ``crash: true`` / ``restart: true`` / ``restart_after_s``, and the worker's capacity
  (``slots``, ``speed_factor``, ``base_ms``, ``per_item_ms``, ``memory_total_bytes``,
  ``memory_base_used_bytes``, ``memory_per_item_bytes``, ``max_queue``).
  A crashed worker's own port is closed: send its restart to another port.
* ``GET /sim/stats`` — :meth:`SimFleet.statistics` as JSON.

In-process API: :class:`SimFleet` (``await start()`` / ``await stop()`` on the caller's
loop) and :class:`SimFleetThread` (its own loop in a background thread; a context manager).
The worker's decisions live in :mod:`gateway.simcore`; this module only does I/O and timers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import json
import logging
import random
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote

import httptools

from gateway.simcore import (
    GIB,
    MIB,
    Fail,
    Faults,
    ModelOp,
    Queued,
    SimError,
    SimModel,
    Start,
    TensorSpec,
    WorkerCore,
    WorkerSpec,
    WorkerStats,
    compute,
    decode_infer_request,
    encode_infer_response,
    model_config,
    model_metadata,
    validate,
)

__all__ = ["FleetStats", "SimFleet", "SimFleetThread", "SimWorkerStats", "main"]

T = TypeVar("T")
_log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_PIPELINED = 64  # responses owed on one connection before it stops reading
SERVER_VERSION = "2.51.0"
EXTENSIONS = ["classification", "sequence", "model_repository", "schedule_policy",
              "model_configuration", "system_shared_memory", "cuda_shared_memory",
              "binary_tensor_data", "parameters", "statistics"]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}
_FAULT_FIELDS = {f.name for f in dataclasses.fields(Faults)} - {"crashed"}
_SPEC_FIELDS = {"slots", "speed_factor", "base_ms", "per_item_ms", "memory_total_bytes",
                "memory_base_used_bytes", "memory_per_item_bytes", "max_queue"}


@dataclass(frozen=True, slots=True)
class SimWorkerStats:
    index: int
    port: int
    up: bool
    faults: Faults
    http_requests: int
    hung_requests: int
    core: WorkerStats
    # inference requests received (every attempt, across restarts), answered-or-not now, and
    # the most ever in progress at once (received, not yet answered: queued + executing)
    infer_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class FleetStats:
    workers: tuple[SimWorkerStats, ...]

    def as_json(self) -> dict[str, Any]:
        return {"workers": [dataclasses.asdict(w) for w in self.workers]}


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error(message: str) -> bytes:
    return _json({"error": message})


class _Reply:
    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


Respond = Callable[[int, bytes, str, Sequence[tuple[str, str]]], None]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; replies go out in request order."""

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._owed: deque[tuple[_Reply, bool]] = deque()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._handler.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._send_now(400, _error("malformed HTTP request"))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # curl and some clients wait for this before sending a large body
        if self._headers.get("expect", "").lower() == "100-continue" \
                and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes <= MAX_BODY_BYTES:
            self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = bool(self._parser.should_keep_alive())
        if self._body_bytes > MAX_BODY_BYTES:
            self._send_now(400, _error("request body exceeds the maximum size"))
            return
        url = httptools.parse_url(self._url)
        request = _Request(self._parser.get_method().decode(), unquote(url.path.decode()),
                           self._headers, b"".join(self._body))
        reply = _Reply()
        self._owed.append((reply, keep_alive))
        if len(self._owed) >= MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

        def respond(status: int, body: bytes = b"", content_type: str = "application/json",
                    extra: Sequence[tuple[str, str]] = ()) -> None:
            head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"]
            if body or status != 200:
                head.append(f"Content-Type: {content_type}\r\n")
            head.extend(f"{k}: {v}\r\n" for k, v in extra)
            head.append(f"Content-Length: {len(body)}\r\n")
            if not keep_alive:
                head.append("Connection: close\r\n")
            head.append("\r\n")
            reply.data = "".join(head).encode("latin-1") + body
            self._flush()

        self._handler.handle(request, respond)

    def _flush(self) -> None:
        transport = self._transport
        while self._owed and self._owed[0][0].data is not None:
            reply, keep_alive = self._owed.popleft()
            if transport is None:
                continue
            assert reply.data is not None
            transport.write(reply.data)
            if not keep_alive:
                transport.close()
                self._owed.clear()
                return
        if self._paused and len(self._owed) < MAX_PIPELINED // 2 and transport is not None:
            transport.resume_reading()
            self._paused = False

    def _send_now(self, status: int, body: bytes) -> None:
        if self._transport is not None:
            self._transport.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                .encode() + body)
            self._transport.close()


class _Handler:
    """Something that answers requests on a listening socket."""

    def __init__(self) -> None:
        self.connections: set[_Connection] = set()

    def handle(self, request: _Request, respond: Respond) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class _Pending:
    respond: Respond
    body: bytes
    extra: list[tuple[str, str]]
    content_type: str


class _Worker(_Handler):
    """The asyncio shell around one :class:`WorkerCore`: sockets, timers, faults."""

    def __init__(self, fleet: SimFleet, index: int, spec: WorkerSpec, host: str, port: int,
                 seed: int) -> None:
        super().__init__()
        self.fleet = fleet
        self.index = index
        self.spec = spec
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.server: asyncio.Server | None = None
        self.core: WorkerCore | None = None
        self.gpu_uuid = ""
        self.http_requests = 0
        self.hung = 0
        self.infer_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._pending: dict[int, _Pending] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def is_up(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), self.host, self.port,
                                               reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        if not self.gpu_uuid:
            self.gpu_uuid = f"GPU-{self.index:08x}-5349-4d00-8000-{self.port:012x}"
        self.spec = dataclasses.replace(
            self.spec, faults=dataclasses.replace(self.spec.faults, crashed=False))
        # a fresh process: every counter starts again from zero
        self.core = WorkerCore(self.spec, self.rng, time.monotonic(), self.gpu_uuid)

    def crash(self) -> None:
        """Stop listening and drop every connection; in-flight work is lost."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._pending.clear()
        self.in_flight = 0
        self.core = None
        self.spec = dataclasses.replace(self.spec,
                                        faults=dataclasses.replace(self.spec.faults, crashed=True))

    def update(self, faults: dict[str, Any], spec: dict[str, Any]) -> None:
        new_faults = dataclasses.replace(self.spec.faults, **faults)
        self.spec = dataclasses.replace(self.spec, faults=new_faults, **spec)
        if self.core is not None:
            self._carry_out(self.core.reconfigure(self.spec, time.monotonic()))

    def statistics(self) -> SimWorkerStats:
        core = self.core.statistics() if self.core is not None else WorkerStats(
            0, self.spec.slots, 0, 0, 0, 0, 0, 0)
        return SimWorkerStats(self.index, self.port, self.is_up, self.spec.faults,
                              self.http_requests, self.hung, core, self.infer_requests,
                              self.in_flight, self.max_in_flight)

    # ----------------------------------------------------------------- request handling

    def handle(self, request: _Request, respond: Respond) -> None:
        self.http_requests += 1
        path = request.path
        if path.startswith("/sim/"):
            self.fleet.handle_control(request, respond, self.index)
            return
        faults = self.spec.faults
        if faults.hang or self.core is None:
            self.hung += 1
            return
        method = request.method
        if path == "/metrics":
            if faults.metrics == "hang":
                self.hung += 1
            elif faults.metrics == "error":
                respond(500, _error("metrics unavailable"), "application/json", ())
            else:
                respond(200, self.core.render_metrics().encode(),
                        "text/plain; charset=utf-8; version=0.0.4", ())
            return
        if path.startswith("/v2/models/") and path != "/v2/models/stats":
            self._handle_model(request, respond)
            return
        expected, answer = self._server_route(path)
        if answer is None:
            respond(404, _error("Not Found"), "application/json", ())
        elif method != expected:
            respond(405, _error("Method Not Allowed"), "application/json", ())
        else:
            status, body = answer()
            respond(status, body, "application/json", ())

    def _server_route(self, path: str) -> tuple[str, Callable[[], tuple[int, bytes]] | None]:
        core = self.core
        assert core is not None
        ready = self.spec.faults.ready
        if path == "/v2":
            return "GET", lambda: (200, _json({"name": "triton", "version": SERVER_VERSION,
                                               "extensions": EXTENSIONS}))
        if path == "/v2/health/live":
            return "GET", lambda: (200, b"")
        if path == "/v2/health/ready":
            return "GET", lambda: (200 if ready else 400, b"")
        if path == "/v2/models/stats":
            return "GET", lambda: (200, _json(core.model_stats()))
        if path == "/v2/repository/index":
            return "POST", lambda: (200, _json([
                {"name": m.name, "version": m.version, "state": "READY" if ready else "UNAVAILABLE"}
                for m in self.spec.models]))
        return "", None

    def _handle_model(self, request: _Request, respond: Respond) -> None:
        parts = request.path[len("/v2/models/"):].split("/")
        name, version, action = parts[0], "", ""
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "config", "stats", "infer")) \
                or (version and not version.isdigit()) or not name:
            respond(404, _error("Not Found"), "application/json", ())
            return
        action = rest[0] if rest else ""
        if request.method != ("POST" if action == "infer" else "GET"):
            respond(405, _error("Method Not Allowed"), "application/json", ())
            return
        model = self.spec.find_model(name, version)
        if action == "ready":
            ok = model is not None and self.spec.faults.ready
            respond(200 if ok else 400, b"" if ok else _error("Model version not ready"),
                    "application/json", ())
            return
        if model is None:
            which = f"'{name}' version {version}" if version else f"'{name}'"
            respond(404, _error(f"Request for unknown model: {which} is not found"),
                    "application/json", ())
            return
        core = self.core
        assert core is not None
        if action == "":
            respond(200, _json(model_metadata(model)), "application/json", ())
        elif action == "config":
            respond(200, _json(model_config(model)), "application/json", ())
        elif action == "stats":
            respond(200, _json(core.model_stats(model.name)), "application/json", ())
        else:
            self._infer(model, request, respond)

    def _infer(self, model: SimModel, request: _Request, respond: Respond) -> None:
        core = self.core
        assert core is not None
        respond = self._counted(respond)
        headers = request.headers
        try:
            body = _decompress(request.body, headers.get("content-encoding", ""))
            header_text = headers.get("inference-header-content-length")
            header_length = int(header_text) if header_text is not None else None
            infer = decode_infer_request(body, header_length)
            batch = validate(model, infer)
            answer, answer_header_length = encode_infer_response(model, infer,
                                                                 compute(model, infer))
        except SimError as exc:
            self._respond_later(respond, exc.status, _error(exc.message), [], "application/json")
            return
        except ValueError as exc:
            self._respond_later(respond, 400, _error(str(exc)), [], "application/json")
            return
        extra: list[tuple[str, str]] = []
        content_type = "application/json"
        if answer_header_length is not None:
            content_type = "application/octet-stream"
            extra.append(("Inference-Header-Content-Length", str(answer_header_length)))
        answer, encoding = _compress(answer, headers.get("accept-encoding", ""))
        if encoding:
            extra.append(("Content-Encoding", encoding))
        event = core.arrive(model.name, batch, time.monotonic())
        if isinstance(event, Fail):
            self._respond_later(respond, event.status, _error(event.message), [],
                                "application/json")
            return
        self._pending[event.ticket] = _Pending(respond, answer, extra, content_type)
        if isinstance(event, Start):
            self._schedule(event)
        else:
            assert isinstance(event, Queued)

    def _counted(self, respond: Respond) -> Respond:
        """Count the inference as in progress until its answer goes out (once)."""
        self.infer_requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        core = self.core
        answered = False

        def counted(status: int, body: bytes = b"", content_type: str = "application/json",
                    extra: Sequence[tuple[str, str]] = ()) -> None:
            nonlocal answered
            if not answered and self.core is core:   # a crash already reset the count
                self.in_flight -= 1
            answered = True
            respond(status, body, content_type, extra)

        return counted

    def _schedule(self, event: Start) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def done() -> None:
            if timer is not None:
                self._timers.discard(timer)
            self._complete(event.ticket)

        timer = loop.call_later(event.service_s, done)
        self._timers.add(timer)

    def _complete(self, ticket: int) -> None:
        core = self.core
        if core is None:
            return
        events = core.complete(ticket, time.monotonic())
        pending = self._pending.pop(ticket, None)
        if pending is not None:
            self._respond_later(pending.respond, 200, pending.body, pending.extra,
                                pending.content_type)
        self._carry_out(events)

    def _carry_out(self, events: Iterable[Start | Fail]) -> None:
        for event in events:
            if isinstance(event, Start):
                self._schedule(event)
                continue
            pending = self._pending.pop(event.ticket, None)
            if pending is not None:
                self._respond_later(pending.respond, event.status, _error(event.message), [],
                                    "application/json")

    def _respond_later(self, respond: Respond, status: int, body: bytes,
                       extra: list[tuple[str, str]], content_type: str) -> None:
        delay_s = self.spec.faults.added_latency_ms / 1000.0
        if delay_s <= 0:
            respond(status, body, content_type, extra)
            return
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            respond(status, body, content_type, extra)

        timer = asyncio.get_running_loop().call_later(delay_s, fire)
        self._timers.add(timer)


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError) as exc:
        raise SimError(400, f"failed to decompress the request body: {exc}") from exc
    return body


def _compress(body: bytes, accept: str) -> tuple[bytes, str]:
    accept = accept.lower()
    if "gzip" in accept:
        return gzip.compress(body, compresslevel=1, mtime=0), "gzip"
    if "deflate" in accept:
        return zlib.compress(body, 1), "deflate"
    return body, ""


class _ControlOnly(_Handler):
    def __init__(self, fleet: SimFleet) -> None:
        super().__init__()
        self.fleet = fleet

    def handle(self, request: _Request, respond: Respond) -> None:
        if request.path.startswith("/sim/"):
            self.fleet.handle_control(request, respond, None)
        else:
            respond(404, _error("Not Found"), "application/json", ())


class SimFleet:
    """Simulated workers on the running event loop: one per spec in ``specs``, else
    ``workers`` default ones. Ports are consecutive from ``base_port`` (0: each worker gets a
    free port); worker *i* draws its faults from ``random.Random`` seeded by ``seed`` and *i*.
    """

    def __init__(self, specs: Sequence[WorkerSpec] | None = None, *, workers: int = 1,
                 host: str = "127.0.0.1", base_port: int = 0, control_port: int | None = None,
                 seed: int = 0) -> None:
        specs = list(specs) if specs is not None else [WorkerSpec()] * workers
        self.host = host
        self._workers = [
            _Worker(self, i, spec, host, base_port + i if base_port else 0, seed * 100_003 + i)
            for i, spec in enumerate(specs)]
        self._control_port = control_port
        self._control_server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._control_handler = _ControlOnly(self)

    def __repr__(self) -> str:
        up = sum(w.is_up for w in self._workers)
        return f"<SimFleet workers={len(self._workers)} up={up} host={self.host}>"

    @property
    def ports(self) -> list[int]:
        return [w.port for w in self._workers]

    @property
    def urls(self) -> list[str]:
        """``host:port`` of each worker, the form tritonclient takes."""
        return [f"{self.host}:{w.port}" for w in self._workers]

    @property
    def control_port(self) -> int | None:
        if self._control_server is None:
            return None
        port: int = self._control_server.sockets[0].getsockname()[1]
        return port

    def __len__(self) -> int:
        return len(self._workers)

    async def start(self) -> None:
        """Listen on every port; if one cannot be bound, close the others and raise."""
        try:
            for worker in self._workers:
                if worker.spec.faults.crashed:
                    worker.crash()
                else:
                    await worker.start()
            if self._control_port is not None:
                loop = asyncio.get_running_loop()
                self._control_server = await loop.create_server(
                    lambda: _Connection(self._control_handler), self.host, self._control_port,
                    reuse_address=True)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        servers = [w.server for w in self._workers if w.server is not None]
        for worker in self._workers:
            worker.crash()
        if self._control_server is not None:
            self._control_server.close()
            for conn in list(self._control_handler.connections):
                conn.abort()
            servers.append(self._control_server)
            self._control_server = None
        for server in servers:
            await server.wait_closed()

    def is_up(self, index: int) -> bool:
        return self._workers[index].is_up

    def crash(self, index: int) -> None:
        self._workers[index].crash()

    async def restart(self, index: int) -> None:
        worker = self._workers[index]
        if worker.is_up:
            worker.crash()
        await worker.start()

    def set_fault(self, index: int, **fault: Any) -> None:
        """Change faults (:class:`Faults` fields) and capacity (``slots``, ``speed_factor``…)
        of one worker now. ``crashed=True`` crashes it; ``crashed=False`` restarts it in a
        background task (``await restart(i)`` to wait for it)."""
        crashed = fault.pop("crashed", None)
        faults = {k: v for k, v in fault.items() if k in _FAULT_FIELDS}
        spec = {k: v for k, v in fault.items() if k in _SPEC_FIELDS}
        unknown = set(fault) - set(faults) - set(spec)
        if unknown:
            raise TypeError(f"unknown fault or spec field(s): {sorted(unknown)}")
        worker = self._workers[index]
        worker.update(faults, spec)
        if crashed is True and worker.is_up:
            worker.crash()
        elif crashed is False and not worker.is_up:
            self._spawn(self.restart(index))

    def restart_after(self, index: int, delay_s: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay_s)
            await self.restart(index)
        self._spawn(later())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("simulator task failed: %r", task.exception())

    def statistics(self) -> FleetStats:
        return FleetStats(tuple(w.statistics() for w in self._workers))

    def handle_control(self, request: _Request, respond: Respond, own: int | None) -> None:
        if request.path == "/sim/stats" and request.method == "GET":
            respond(200, _json(self.statistics().as_json()), "application/json", ())
            return
        if request.path != "/sim/control":
            respond(404, _error("Not Found"), "application/json", ())
            return
        if request.method != "POST":
            respond(405, _error("Method Not Allowed"), "application/json", ())
            return
        try:
            indexes = self._apply_control(json.loads(request.body or b"{}"), own)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            respond(400, _error(f"bad control request: {exc}"), "application/json", ())
            return
        respond(200, _json({"ok": True, "workers": indexes}), "application/json", ())

    def _apply_control(self, payload: Any, own: int | None) -> list[int]:
        if not isinstance(payload, dict):
            raise TypeError("expected a JSON object")
        target = payload.pop("worker", own)
        if target == "all":
            indexes = list(range(len(self._workers)))
        elif isinstance(target, int):
            indexes = [target]
        elif isinstance(target, list) and all(isinstance(i, int) for i in target):
            indexes = list(target)
        else:
            raise TypeError("'worker' must be an index, a list of indexes or \"all\"")
        for i in indexes:
            if not 0 <= i < len(self._workers):
                raise IndexError(f"no worker {i}")
        crash = bool(payload.pop("crash", False))
        restart = bool(payload.pop("restart", False))
        restart_after_s = payload.pop("restart_after_s", None)
        metrics = payload.get("metrics")
        if metrics is not None and metrics not in ("ok", "error", "hang"):
            raise ValueError("'metrics' must be ok, error or hang")
        for i in indexes:
            self.set_fault(i, **payload)
            if crash:
                self.crash(i)
            if restart:
                self._spawn(self.restart(i))
            if restart_after_s is not None:
                self.restart_after(i, float(restart_after_s))
        return indexes


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class SimFleetThread:
    """A :class:`SimFleet` on its own event loop in a daemon thread, for sync tests and
    benchmarks that must not share the gateway's loop. Use as a context manager."""

    def __init__(self, specs: Sequence[WorkerSpec] | None = None, *, start_timeout_s: float = 60.0,
                 **kwargs: Any) -> None:
        self._specs = specs
        self._kwargs = kwargs
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._fleet: SimFleet | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> SimFleetThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SimFleetThread:
        self._thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout_s):
            raise TimeoutError("simulator did not start in time")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("simulator failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = _new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._fleet = SimFleet(self._specs, **self._kwargs)
            loop.run_until_complete(self._fleet.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._fleet.stop())
            loop.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    def _call(self, fn: Callable[[SimFleet], T], timeout_s: float = 30.0) -> T:
        fleet, loop = self._fleet, self._loop
        assert fleet is not None and loop is not None, "not started"

        async def run() -> T:
            return fn(fleet)
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout_s)

    @property
    def fleet(self) -> SimFleet:
        """The fleet itself; touch it only from its own loop (see :meth:`call`)."""
        assert self._fleet is not None
        return self._fleet

    @property
    def ports(self) -> list[int]:
        return self._call(lambda f: f.ports)

    @property
    def urls(self) -> list[str]:
        return self._call(lambda f: f.urls)

    def set_fault(self, index: int, **fault: Any) -> None:
        """As :meth:`SimFleet.set_fault`, but a restart is complete when this returns."""
        crashed = fault.get("crashed")
        self._call(lambda f: f.set_fault(index, **{k: v for k, v in fault.items()
                                                   if k != "crashed" or v}))
        if crashed is False and not self._call(lambda f: f.is_up(index)):
            self.restart(index)

    def crash(self, index: int) -> None:
        self._call(lambda f: f.crash(index))

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        assert self._fleet is not None and self._loop is not None
        asyncio.run_coroutine_threadsafe(self._fleet.restart(index), self._loop).result(timeout_s)

    def statistics(self) -> FleetStats:
        return self._call(lambda f: f.statistics())


# ---------------------------------------------------------------------------- command line

def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _parse_model(text: str) -> SimModel:
    """``NAME[:DATATYPE[:DIMS[:OP[:MAX_BATCH]]]]``, DIMS like ``16`` or ``3x224x224``."""
    parts = text.split(":")
    name = parts[0]
    datatype = parts[1].upper() if len(parts) > 1 and parts[1] else "FP32"
    dims = tuple(int(d) for d in parts[2].split("x")) if len(parts) > 2 and parts[2] else (16,)
    op = parts[3] if len(parts) > 3 and parts[3] else ("double" if datatype != "BYTES"
                                                     else "identity")
    if op not in ("double", "identity"):
        raise argparse.ArgumentTypeError(f"model op must be double or identity, not {op!r}")
    max_batch = int(parts[4]) if len(parts) > 4 and parts[4] else 64
    return SimModel(name=name, inputs=(TensorSpec("INPUT0", datatype, dims),),
                    outputs=(TensorSpec("OUTPUT0", datatype, dims),), op=cast(ModelOp, op),
                    max_batch_size=max_batch)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway sim", description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Comma-separated lists are cycled over the workers (e.g. --speeds 1,2: "
               "workers 0,2,4… at speed 1, 1,3,5… at speed 2). Metrics are served at "
               "GET /metrics on each worker's own port; control with POST /sim/control.")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--base-port", type=int, default=8000, help="0: free ports")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--control-port", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slots", default="4", help="concurrent executions per worker (list)")
    p.add_argument("--speeds", default="1", help="speed factors (list)")
    p.add_argument("--memory-gib", default="16", help="GPU memory total, GiB (list)")
    p.add_argument("--base-used-gib", default="2", help="GPU memory always used, GiB (list)")
    p.add_argument("--memory-per-item-mib", type=float, default=16.0)
    p.add_argument("--base-ms", type=float, default=2.0)
    p.add_argument("--per-item-ms", type=float, default=0.05)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--cpu-only", action="store_true", help="no GPU: no nv_gpu_* series")
    p.add_argument("--model", action="append", type=_parse_model, default=None,
                   metavar="NAME[:DTYPE[:DIMS[:OP[:MAX_BATCH]]]]",
                   help="model to serve (repeatable); default simple:FP32:16:double:64")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--added-latency-ms", type=float, default=0.0)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--not-ready", action="store_true")
    p.add_argument("--metrics-fault", choices=("ok", "error", "hang"), default="ok")
    p.add_argument("--faulty", default=None, metavar="I,J,…",
                   help="indexes of the workers the fault options apply to (default: all)")
    p.add_argument("--duration-s", type=float, default=None, help="exit after this long")
    return p


def specs_from_args(args: argparse.Namespace) -> list[WorkerSpec]:
    slots, speeds = _floats(args.slots), _floats(args.speeds)
    memory, base_used = _floats(args.memory_gib), _floats(args.base_used_gib)
    faults = Faults(error_rate=args.error_rate, added_latency_ms=args.added_latency_ms,
                    hang=args.hang, ready=not args.not_ready, metrics=args.metrics_fault)
    models = tuple(args.model) if args.model else (SimModel(),)
    faulty = (set(range(args.workers)) if args.faulty is None
              else {int(i) for i in args.faulty.split(",") if i.strip()})
    return [WorkerSpec(
        slots=int(slots[i % len(slots)]), speed_factor=speeds[i % len(speeds)],
        base_ms=args.base_ms, per_item_ms=args.per_item_ms, has_gpu=not args.cpu_only,
        memory_total_bytes=int(memory[i % len(memory)] * GIB),
        memory_base_used_bytes=int(base_used[i % len(base_used)] * GIB),
        memory_per_item_bytes=int(args.memory_per_item_mib * MIB), max_queue=args.max_queue,
        models=models, faults=faults if i in faulty else Faults())
        for i in range(args.workers)]


async def _serve(args: argparse.Namespace) -> None:
    fleet = SimFleet(specs_from_args(args), host=args.host, base_port=args.base_port,
                     control_port=args.control_port, seed=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await fleet.start()
    ports = fleet.ports
    control = f", control port {fleet.control_port}" if fleet.control_port else ""
    print(f"sim: {len(ports)} workers on {args.host} ports {ports[0]}..{ports[-1]} "
          f"(metrics: GET /metrics on the same port; control: POST /sim/control{control})",
          flush=True)
    print(json.dumps({"ports": ports}), flush=True)
    try:
        if args.duration_s is not None:
            try:
                await asyncio.wait_for(stop.wait(), args.duration_s)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        await fleet.stop()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("gateway sim: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(_serve(args))
    except OSError as exc:
        print(f"gateway sim: {exc}", file=sys.stderr)
        return 1
    return 0
