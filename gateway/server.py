"""Running the gateway: uvicorn, signals, reload, and the ``serve`` / ``check-config`` /
``config-reference`` commands.

* SIGHUP (or ``POST /admin/reload``) re-reads the config file; a bad file is refused with
  the reason and the old configuration stays in force.
* SIGTERM / SIGINT: readiness turns false, the listener closes, requests in flight get up to
  ``upstream.drain_timeout_s`` to finish, then background work stops. The log says how many
  were in flight, how many are left once a second, and whether the drain finished or timed
  out (and how many requests that cut off).
* ``admin.listen`` set: the gateway's own pages get a second uvicorn server in the same event
  loop, and the inference port answers 404 for them (``gateway.ops.admin.not_here``). It keeps
  answering during a drain and stops last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, cast

import yaml

from gateway.app.service import GatewayService
from gateway.core.config import GatewayConfig, describe_config, load_config
from gateway.core.schema import ConfigError, reference
from gateway.http.guard import (
    ConnectionGuard,
    open_files_limit,
    quiet_accept_errors,
    raise_open_file_limit,
)

log = logging.getLogger("gateway")


def reload_from_file(svc: GatewayService) -> tuple[bool, str]:
    if not svc.config_path:
        return False, "the gateway was not started from a config file; nothing to reload"
    try:
        cfg = load_config(svc.config_path)
    except ConfigError as exc:
        log.error("reload refused, old configuration stays in force: %s", exc)
        return False, f"reload refused, old configuration stays in force: {exc}"
    if (cfg.listen.host, cfg.listen.port) != (svc.cfg.listen.host, svc.cfg.listen.port):
        log.warning("listen address changes need a restart; keeping %s:%d",
                    svc.cfg.listen.host, svc.cfg.listen.port)
    if cfg.admin.listen != svc.cfg.admin.listen:
        log.warning("admin.listen changes need a restart; keeping the admin pages where they "
                    "are")
    svc.reload(cfg)
    return True, f"configuration generation {svc.generation} in force"


class _ClientNoiseFilter(logging.Filter):
    """Bounds what malformed client traffic can write to the log: uvicorn warns once per bad
    request ("Invalid HTTP request received.", "Unsupported upgrade request."); at most one
    such line per ``interval_s`` passes, carrying how many were held back."""

    NOISE = ("Invalid HTTP request", "Unsupported upgrade request")

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last = float("-inf")
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.NOISE):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._held += 1
            return False
        if self._held:
            record.msg = f"{record.getMessage()} ({self._held} more held back)"
            record.args = None
        self._last, self._held = now, 0
        return True


def _install_uvloop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# Bytes of a request line (the URL) a request head may hold beyond its header bounds.
_REQUEST_LINE_ALLOWANCE_BYTES = 64 * 1024
# How long a connection refused for its head size reads and drops what is still coming.
_LINGER_S = 2.0
# Answered as soon as their head is parsed (see JsonErrorProtocol._start_asgi_task).
_EAGER_PATHS = frozenset({"/v2/health/ready", "/v2/health/live"})


async def _resume(coro: Coroutine[Any, Any, None], awaited: object) -> None:
    """Carry on a coroutine that was started by hand and suspended on ``awaited`` (what it
    yielded: an asyncio future, or None for a bare yield), as a task would have."""
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                future = cast("asyncio.Future[Any]", awaited)
                # As a task does with what it is handed: the flag says "yielded by await",
                # and awaiting the future again sets it anew.
                future._asyncio_future_blocking = False
                await future
        except asyncio.CancelledError as exc:
            if not (isinstance(awaited, asyncio.Future) and awaited.done()):
                try:  # this task was cancelled: so is the coroutine
                    awaited = coro.throw(exc)
                except StopIteration:
                    return
                continue
        except BaseException:
            pass  # the future's own outcome: the coroutine reads it when resumed
        try:
            awaited = coro.send(None)
        except StopIteration:
            return


def json_error_protocol(limits: Callable[[], tuple[int, int]],
                        on_error: Callable[[int, bytes, float], None] | None = None,
                        guard: ConnectionGuard | None = None) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, with the gateway's rules at the connection level:

    * its own 400 for a malformed request is Triton's ``{"error": ...}`` JSON with a
      ``Date`` and an ``X-Request-Id``, like every other error of the gateway;
    * a request head that keeps growing past the header bounds (``limits()`` gives
      ``(max_header_bytes, max_headers)``, read live so a reload applies) is answered 431
      and the connection closed, before the whole head is buffered. The exact bounds are
      checked by the proxy once the head is complete; this is the memory bound.

    ``on_error(status, request_id, latency_s)`` hears of each such answer (the access log);
    the latency counts from the start of the request's head.

    With a ``guard`` (``gateway.http.guard``), each connection is counted and its slow
    clients bounded: the guard sees its phase (:meth:`seen`) and may answer it 408 or 503
    and close it (:meth:`answer_and_close`). An error found while a request's body is
    arriving (a malformed chunk, a body too slow) is answered too, and the application
    reading that body hears that the client is gone.
    """
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    from gateway.core.connections import Phase, Seen
    from gateway.core.errors import GatewayError, HeaderFieldsTooLarge
    from gateway.http.proxy import http_date, new_request_id

    class JsonErrorProtocol(HttpToolsProtocol):
        _head_bytes = 0
        _in_head = False
        _began_in_chunk = False
        _discarding = False
        _began_at = 0.0
        _received = 0  # bytes received on the connection (the guard's measure of progress)
        _requests = 0  # requests begun on it

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._in_head = True
            self._began_in_chunk = True
            self._began_at = time.monotonic()
            self._requests += 1

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            self._began_in_chunk = False
            self._received += len(data)
            super().data_received(data)
            # The chunk a head began in may also hold the end of the previous request: only
            # whole chunks after it are counted (an undercount of one read, at most).
            if not self._in_head or self._began_in_chunk or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            max_bytes, max_headers = limits()
            cap = max_bytes + 4 * max_headers + _REQUEST_LINE_ALLOWANCE_BYTES
            if self._head_bytes > cap:
                exc = HeaderFieldsTooLarge(f"request head exceeds {cap} bytes")
                self._write_error(exc.status, exc.body(), linger=True)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            # Health probes run at once, in the callback that parsed them, rather than as a
            # task queued behind every request that arrived in the same instant: when a herd
            # of thousands lands in one poll, the loop's next turn runs all their tasks, and
            # a readiness probe among them would wait for the lot (100+ ms here). Their
            # handlers do not wait for anything, so the answer is written before the next
            # request is parsed; one that does suspend carries on as a task.
            if cycle.scope["path"] not in _EAGER_PATHS or cycle.scope["method"] != "GET":
                super()._start_asgi_task(cycle, app)
                return
            coro = cycle.run_asgi(app)
            try:
                awaited = coro.send(None)
            except StopIteration:
                return
            task = self.loop.create_task(_resume(coro, awaited))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        def send_400_response(self, msg: str) -> None:
            self._write_error(400, json.dumps({"error": "malformed HTTP request"}).encode())

        # the connection guard's side ---------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if guard is not None:
                # (typed int by uvicorn; it only goes to loop.call_later, which takes a float)
                self.timeout_keep_alive = guard.limits().keep_alive_timeout_s  # type: ignore[assignment]
                guard.opened(self)

        def connection_lost(self, exc: Exception | None) -> None:
            if guard is not None:
                guard.closed(self)
            super().connection_lost(exc)

        def seen(self) -> Seen:
            return Seen(self._phase(), self._requests, self._received)

        def _phase(self) -> Phase:
            if self._discarding:
                return Phase.WORKING  # answered 431 and closing: the gateway's own doing
            if self._in_head:
                return Phase.HEAD
            cycle = self.cycle
            if cycle is None:
                return Phase.NEW if not self._requests else Phase.IDLE
            if cycle.more_body and not cycle.disconnected:
                # The gateway not reading (its buffer full, or 100 Continue not yet sent) is
                # its own wait, not the client's slowness.
                if self.flow.read_paused or cycle.waiting_for_100_continue:
                    return Phase.WORKING
                return Phase.BODY
            if not cycle.response_complete:
                return Phase.SENDING if self.flow.write_paused else Phase.WORKING
            return Phase.IDLE

        def answer_and_close(self, error: GatewayError) -> None:
            if self.transport.is_closing():
                return
            extra = b"".join(k + b": " + v + b"\r\n" for k, v in error.headers()
                             if k != b"content-type")
            self._write_error(error.status, error.body(), extra=extra)

        def close(self) -> None:
            self.transport.close()  # a no-op when already closing

        def _write_error(self, status: int, body: bytes, *, linger: bool = False,
                         extra: bytes = b"") -> None:
            cycle = self.cycle
            # A request whose body is still arriving has no answer yet: this is it, and the
            # application reading the body hears that the client is gone.
            body_arriving = cycle is not None and cycle.more_body and \
                not cycle.response_started
            if cycle is None or cycle.response_complete or body_arriving:
                if body_arriving:
                    cycle.disconnected = True
                    cycle.message_event.set()
                rid = new_request_id()
                self.transport.write(b"".join([
                    STATUS_LINE[status], b"content-type: application/json\r\n",
                    b"content-length: ", str(len(body)).encode(), b"\r\n",
                    b"date: ", http_date(), b"\r\n",
                    b"x-request-id: ", rid, b"\r\n", extra,
                    b"connection: close\r\n\r\n", body]))
                if on_error is not None:
                    on_error(status, rid,
                             time.monotonic() - self._began_at if self._in_head else 0.0)
            if not linger:
                self.transport.close()
                return
            # A client still sending its head would get a reset instead of the answer if
            # the connection closed now: read and drop the rest for a moment, then close.
            self._discarding = True
            with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

    return JsonErrorProtocol


async def serve(cfg: GatewayConfig, *, config_path: str | None = None,
                on_ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, reuse_port: bool = False) -> int:
    """Run the gateway in the current event loop until SIGTERM/SIGINT (or ``stop``)."""
    import uvicorn

    from gateway.http.proxy import ProxyApp
    from gateway.ops.admin import build_admin_app, not_here

    class _Server(uvicorn.Server):
        """uvicorn's server without its own signal capture: the gateway owns SIGTERM/SIGINT
        (drain, then clean up) and SIGHUP (reload), and exits 0 after a drain instead of
        re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    noise = _ClientNoiseFilter()
    logging.getLogger("uvicorn.error").addFilter(noise)
    if cfg.clients.raise_open_file_limit:
        before, after = raise_open_file_limit()
        if after != before:
            log.info("open-file limit raised from %d to %d", before, after)
    svc = GatewayService(cfg)
    svc.config_path = config_path
    # One guard for every HTTP listener: they share the process's file descriptors.
    guard = ConnectionGuard(lambda: svc.cfg.clients, open_files=open_files_limit())
    admin_app = build_admin_app(svc, svc.telemetry, lambda: reload_from_file(svc))
    http_protocol = json_error_protocol(
        lambda: (svc.cfg.upstream.max_header_bytes, svc.cfg.upstream.max_headers),
        on_error=svc.telemetry.connection_refused, guard=guard)
    admin_server: _Server | None = None
    if cfg.admin.listen is not None:
        admin_server = _Server(uvicorn.Config(
            admin_app, host=cfg.admin.listen.host, port=cfg.admin.listen.port,
            lifespan="off", access_log=False, log_level="warning", http=http_protocol,
            ws="none", timeout_graceful_shutdown=5, server_header=False,
            proxy_headers=False))
    app = ProxyApp(svc, not_here if admin_server is not None else admin_app)
    ucfg = uvicorn.Config(app, host=cfg.listen.host, port=cfg.listen.port, lifespan="off",
                          access_log=False, log_level="warning", http=http_protocol,
                          # One Date per answer: the worker's when it sent one, else the
                          # gateway's own (gateway.http.proxy adds it), never uvicorn's as well.
                          date_header=False,
                          # No WebSocket endpoint: an Upgrade request is plain HTTP to the
                          # gateway, never a handshake answered in text/plain.
                          ws="none",
                          timeout_graceful_shutdown=int(max(1, cfg.upstream.drain_timeout_s)),
                          # (the keep-alive timeout: clients.keep_alive_timeout_s, set by
                          # the protocol per connection, so that a reload applies)
                          backlog=4096,
                          # The gateway is the origin of its own errors and passes each
                          # worker's headers through: no extra Server header, and no
                          # X-Forwarded-* rewriting layer on the hot path.
                          server_header=False, proxy_headers=False)
    server = _Server(ucfg)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_from_file(svc))

    drain_began: float | None = None
    helpers: list[asyncio.Task[None]] = []

    def requests_in_flight() -> str:
        return (f"{len(server.server_state.tasks)} requests in flight ({svc.in_flight()} at "
                f"workers, {svc.queue_length} queued)")

    async def report_drain(began: float) -> None:
        while True:
            await asyncio.sleep(1.0)
            log.info("draining: %s, %.0f s of %g s", requests_in_flight(),
                     time.monotonic() - began, cfg.upstream.drain_timeout_s)

    def begin_drain(why: str) -> None:
        # Drain: readiness turns false at once, uvicorn stops accepting and waits for the
        # requests in flight (up to drain_timeout_s).
        nonlocal drain_began
        svc.draining = True
        if drain_began is not None:
            return
        drain_began = time.monotonic()
        log.info("%s: draining %s; waiting up to %g s", why, requests_in_flight(),
                 cfg.upstream.drain_timeout_s)
        helpers.append(asyncio.create_task(report_drain(drain_began)))

    def end_drain() -> None:
        if drain_began is None:
            return
        took = time.monotonic() - drain_began
        left = len(server.server_state.tasks)
        if left:
            log.warning("drain timed out after %.1f s: %d requests still in flight were cut "
                        "off", took, left)
        else:
            log.info("drain done in %.1f s: every request in flight finished", took)

    def on_term(signum: int) -> None:
        # A second SIGINT forces the exit.
        begin_drain(signal.Signals(signum).name)
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_term, signum)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        sock = server.servers[0].sockets[0].getsockname() if server.servers else None
        port = sock[1] if sock else cfg.listen.port
        url = f"http://{cfg.listen.host}:{port}"
        log.info("gateway listening on %s (%d workers configured)", url,
                 len(svc.fleet.workers))
        if admin_server is not None and cfg.admin.listen is not None:
            while not admin_server.started and not admin_server.should_exit:
                await asyncio.sleep(0.02)
            sockets = admin_server.servers[0].sockets if admin_server.servers else []
            admin_port = sockets[0].getsockname()[1] if sockets else cfg.admin.listen.port
            log.info("admin pages (/metrics, /status, /admin) on http://%s:%d only",
                     cfg.admin.listen.host, admin_port)
        if on_ready is not None:
            on_ready(url)

    async def external_stop() -> None:
        if stop is not None:
            await stop.wait()
            begin_drain("stop requested")
            server.should_exit = True

    grpc_listener = None
    if cfg.listen.grpc_port is not None:  # grpcio is imported only when the listener is on
        from gateway.grpc.server import start_grpc
        grpc_listener = await start_grpc(svc)
    background = asyncio.create_task(svc.run())
    # serve --processes N: every process binds the same ports with SO_REUSEPORT
    from gateway.app.processes import reuse_port_socket
    admin_sockets = None
    if reuse_port and admin_server is not None and cfg.admin.listen is not None:
        admin_sockets = [reuse_port_socket(cfg.admin.listen.host, cfg.admin.listen.port)]
    admin_task = asyncio.create_task(admin_server.serve(sockets=admin_sockets)) \
        if admin_server else None
    helpers += [asyncio.create_task(announce()), asyncio.create_task(external_stop()),
                asyncio.create_task(guard.run())]
    quiet_accept_errors(loop)
    # What start-up built lives as long as the process: out of the collector's sight, so that
    # a full collection scans only what serving makes. Connections opened and closed by the
    # thousand (a reconnecting flood) otherwise bring a full collection every few seconds,
    # each a pause of 50–150 ms over the whole heap.
    gc.collect()
    gc.freeze()
    try:
        await server.serve(sockets=[reuse_port_socket(cfg.listen.host, cfg.listen.port)]
                           if reuse_port else None)
    finally:
        svc.draining = True
        end_drain()
        for t in helpers:
            t.cancel()
        if admin_server is not None and admin_task is not None:
            admin_server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await admin_task
        if grpc_listener is not None:
            await grpc_listener.stop(cfg.upstream.drain_timeout_s)
        svc.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(background, timeout=5)
        await svc.aclose()
        svc.telemetry.close()
    return 0


def run(cfg: GatewayConfig, *, on_ready: Callable[[str], None] | None = None,
        config_path: str | None = None, reuse_port: bool = False) -> int:
    """Blocking: run the gateway until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main = serve(cfg, on_ready=on_ready, config_path=config_path, reuse_port=reuse_port)
    if _install_uvloop() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


# commands -----------------------------------------------------------------------------------
def main_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway serve", description="Run the gateway.")
    parser.add_argument("--config", "-c", required=True, help="YAML configuration file")
    parser.add_argument("--port", type=int, help="override listen.port")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="N gateway processes on one port (SO_REUSEPORT), one per core; "
                             "they share the fleet as replicas do (default 1)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes: expected at least 1")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error in {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.port is not None:
        from dataclasses import replace

        cfg = replace(cfg, listen=replace(cfg.listen, port=args.port))
    if args.processes > 1:
        from gateway.app import processes

        return processes.run(args.config, args.processes, cfg.listen.host, cfg.listen.port)
    return run(cfg, config_path=args.config, reuse_port=args.reuse_port)


def main_check_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway check-config",
                                     description="Validate a configuration file.")
    parser.add_argument("file")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.file}: OK")
        print(yaml.safe_dump(describe_config(cfg), sort_keys=False), end="")
    return 0


def config_reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, typ, default, doc in reference(GatewayConfig):
        lines.append(f"| `{key}` | {typ} | {default.replace('|', '/')} | "
                     f"{doc.replace('|', '/')} |")
    return "\n".join(lines)


def main_config_reference(argv: list[str]) -> int:
    print(config_reference_markdown())
    return 0


def main(argv: list[str]) -> int:
    return main_serve(argv)
