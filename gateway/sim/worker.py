"""The asyncio shell around one simulated worker (:class:`gateway.sim.core.WorkerCore`):
its listening socket, the Triton HTTP endpoints, timers and injected faults."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import random
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.core.errors import GatewayError
from gateway.core.tensors import (
    BINARY_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    decode_content,
    header_length_of,
    parse_infer_request,
)
from gateway.sim.connection import (
    MAX_BODY_BYTES,
    Connection,
    ControlHandler,
    Handler,
    Request,
    Respond,
    error_body,
    json_body,
)
from gateway.sim.core import (
    Fail,
    Faults,
    Queued,
    SimError,
    SimModel,
    Start,
    WorkerCore,
    WorkerSpec,
    WorkerStats,
)
from gateway.sim.infer import answer, model_config, model_metadata, validate

SERVER_VERSION = "2.51.0"
EXTENSIONS = ["classification", "sequence", "model_repository", "schedule_policy",
              "model_configuration", "system_shared_memory", "cuda_shared_memory",
              "binary_tensor_data", "parameters", "statistics"]


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
    # the last request-level ``timeout`` parameter received (microseconds), if any
    last_timeout_us: int | None = None
    # the last request-level ``priority`` parameter received, if any
    last_priority: int | None = None


@dataclass(slots=True)
class _Pending:
    respond: Respond
    body: bytes
    extra: list[tuple[str, str]]
    content_type: str


class SimWorker(Handler):
    """The asyncio shell around one :class:`WorkerCore`: sockets, timers, faults."""

    def __init__(self, fleet: ControlHandler, index: int, spec: WorkerSpec, host: str, port: int,
                 seed: int) -> None:
        super().__init__()
        self.fleet = fleet
        self.index = index
        self.spec = spec
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.server: asyncio.Server | None = None
        # while crashed, the port stays bound (not listening: connections are refused) so
        # that no other socket — an outgoing connection's ephemeral port — can take it
        self._reserved: socket.socket | None = None
        self.core: WorkerCore | None = None
        self.gpu_uuid = ""
        self.http_requests = 0
        self.hung = 0
        self.infer_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_timeout_us: int | None = None
        self.last_priority: int | None = None
        self._pending: dict[int, _Pending] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def is_up(self) -> bool:
        return self.server is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reserved, self._reserved = self._reserved, None
        if reserved is not None:
            try:
                self.server = await loop.create_server(lambda: Connection(self), sock=reserved,
                                                       backlog=1024)
            except OSError:
                reserved.close()
        if self.server is None:
            self.server = await self._bind(loop)
        self.port = self.server.sockets[0].getsockname()[1]
        if not self.gpu_uuid:
            self.gpu_uuid = f"GPU-{self.index:08x}-5349-4d00-8000-{self.port:012x}"
        self.spec = dataclasses.replace(
            self.spec, faults=dataclasses.replace(self.spec.faults, crashed=False))
        # a fresh process: every counter starts again from zero
        self.core = WorkerCore(self.spec, self.rng, time.monotonic(), self.gpu_uuid)

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Server:
        """Listen on the worker's port, bound by number even when the OS picked it (a port
        bound by number stays bound through :func:`_unlisten`). A port still held for a
        moment (a socket closing) is retried for up to 2 s; a picked one that was taken
        meanwhile is picked again."""
        pick = not self.port
        for attempt in range(40):
            port = _pick_port(self.host) if pick else self.port
            try:
                server = await loop.create_server(lambda: Connection(self), self.host, port,
                                                  reuse_address=True, backlog=1024)
            except OSError:
                if attempt == 39:
                    raise
                if not pick:
                    await asyncio.sleep(0.05)
                continue
            self.port = port
            return server
        raise AssertionError("unreachable")

    def crash(self) -> None:
        """Stop listening and drop every connection; in-flight work is lost."""
        if self.server is not None:
            self._reserved = _unlisten(self.server)
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

    def close(self) -> None:
        """Crash and let go of the port for good."""
        self.crash()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

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
                              self.in_flight, self.max_in_flight, self.last_timeout_us,
                              self.last_priority)

    # ----------------------------------------------------------------- request handling

    def handle(self, request: Request, respond: Respond) -> None:
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
                respond(500, error_body("metrics unavailable"), "application/json", ())
            else:
                respond(200, self.core.render_metrics().encode(),
                        "text/plain; charset=utf-8; version=0.0.4", ())
            return
        if path.startswith("/v2/models/") and path != "/v2/models/stats":
            self._handle_model(request, respond)
            return
        expected, answer = self._server_route(path)
        if answer is None:
            respond(404, error_body("Not Found"), "application/json", ())
        elif method != expected:
            respond(405, error_body("Method Not Allowed"), "application/json", ())
        else:
            status, body = answer()
            respond(status, body, "application/json", ())

    def _server_route(self, path: str) -> tuple[str, Callable[[], tuple[int, bytes]] | None]:
        core = self.core
        assert core is not None
        ready = self.spec.faults.ready
        if path == "/v2":
            return "GET", lambda: (200, json_body({"name": "triton", "version": SERVER_VERSION,
                                               "extensions": EXTENSIONS}))
        if path == "/v2/health/live":
            return "GET", lambda: (200, b"")
        if path == "/v2/health/ready":
            return "GET", lambda: (200 if ready else 400, b"")
        if path == "/v2/models/stats":
            return "GET", lambda: (200, json_body(core.model_stats()))
        if path == "/v2/repository/index":
            return "POST", lambda: (200, json_body([
                {"name": m.name, "version": m.version, "state": "READY" if ready else "UNAVAILABLE"}
                for m in self.spec.models]))
        return "", None

    def _handle_model(self, request: Request, respond: Respond) -> None:
        parts = request.path[len("/v2/models/"):].split("/")
        name, version, action = parts[0], "", ""
        rest = parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "config", "stats", "infer")) \
                or (version and not version.isdigit()) or not name:
            respond(404, error_body("Not Found"), "application/json", ())
            return
        action = rest[0] if rest else ""
        if request.method != ("POST" if action == "infer" else "GET"):
            respond(405, error_body("Method Not Allowed"), "application/json", ())
            return
        model = self.spec.find_model(name, version)
        if action == "ready":
            ok = model is not None and self.spec.faults.ready
            respond(200 if ok else 400, b"" if ok else error_body("Model version not ready"),
                    "application/json", ())
            return
        if model is None:
            which = f"'{name}' version {version}" if version else f"'{name}'"
            respond(404, error_body(f"Request for unknown model: {which} is not found"),
                    "application/json", ())
            return
        core = self.core
        assert core is not None
        if action == "":
            respond(200, json_body(model_metadata(model)), "application/json", ())
        elif action == "config":
            respond(200, json_body(model_config(model, self.spec.slots)), "application/json", ())
        elif action == "stats":
            respond(200, json_body(core.model_stats(model.name)), "application/json", ())
        else:
            self._infer(model, request, respond)

    def _infer(self, model: SimModel, request: Request, respond: Respond) -> None:
        core = self.core
        assert core is not None
        respond = self._counted(respond)
        headers = request.headers
        try:
            body = decode_content(request.body, headers.get("content-encoding"),
                                  max_bytes=MAX_BODY_BYTES)
            infer = parse_infer_request(body, header_length_of(headers))
            timeout = infer.parameters.get("timeout")
            if isinstance(timeout, int) and not isinstance(timeout, bool):
                self.last_timeout_us = timeout
            priority = infer.parameters.get("priority")
            if isinstance(priority, int) and not isinstance(priority, bool):
                self.last_priority = priority
            batch = validate(model, infer)
            encoded = answer(model, infer)
        except (SimError, GatewayError) as exc:
            self._respond_later(respond, exc.status, error_body(exc.message), [],
                                JSON_CONTENT_TYPE)
            return
        extra: list[tuple[str, str]] = []
        content_type = JSON_CONTENT_TYPE
        if encoded.header_length is not None:
            content_type = BINARY_CONTENT_TYPE
            extra.append(("Inference-Header-Content-Length", str(encoded.header_length)))
        reply, encoding = _compress(encoded.body, headers.get("accept-encoding", ""))
        if encoding:
            extra.append(("Content-Encoding", encoding))
        event = core.arrive(model.name, batch, time.monotonic())
        if isinstance(event, Fail):
            self._respond_later(respond, event.status, error_body(event.message), [],
                                "application/json")
            return
        self._pending[event.ticket] = _Pending(respond, reply, extra, content_type)
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
                self._respond_later(pending.respond, event.status, error_body(event.message), [],
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


def _compress(body: bytes, accept: str) -> tuple[bytes, str]:
    accept = accept.lower()
    if "gzip" in accept:
        return gzip.compress(body, compresslevel=1, mtime=0), "gzip"
    if "deflate" in accept:
        return zlib.compress(body, 1), "deflate"
    return body, ""


def _unlisten(server: asyncio.Server) -> socket.socket | None:
    """Close ``server`` but keep its port bound and not listening (Linux: ``shutdown`` on a
    listening socket stops it listening, the bind stays), so that a restart can listen on the
    same port again. ``None`` where that is not possible; the restart then binds anew."""
    sockets = server.sockets
    reserved: socket.socket | None = None
    if len(sockets) == 1:
        try:
            reserved = socket.socket(fileno=os.dup(sockets[0].fileno()))
        except OSError:
            reserved = None
    server.close()
    if reserved is not None:
        try:
            reserved.shutdown(socket.SHUT_RDWR)
        except OSError:
            reserved.close()
            return None
    return reserved


def _pick_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
