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
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator

import yaml

from gateway.app.service import GatewayService
from gateway.core.config import GatewayConfig, describe_config, load_config
from gateway.core.schema import ConfigError, reference
from gateway.http.frontend import front_end
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


def _install_uvloop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
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

    if cfg.clients.raise_open_file_limit:
        before, after = raise_open_file_limit()
        if after != before:
            log.info("open-file limit raised from %d to %d", before, after)
    svc = GatewayService(cfg)
    svc.config_path = config_path
    # One guard for every HTTP listener: they share the process's file descriptors.
    guard = ConnectionGuard(lambda: svc.cfg.clients, open_files=open_files_limit())
    admin_app = build_admin_app(svc, svc.telemetry, lambda: reload_from_file(svc))
    header_limits = lambda: (svc.cfg.upstream.max_header_bytes,  # noqa: E731
                             svc.cfg.upstream.max_headers)
    admin_protocol = front_end(header_limits, on_error=svc.telemetry.connection_refused,
                               guard=guard)
    admin_server: _Server | None = None
    if cfg.admin.listen is not None:
        admin_server = _Server(uvicorn.Config(
            admin_app, host=cfg.admin.listen.host, port=cfg.admin.listen.port,
            lifespan="off", access_log=False, log_level="warning", http=admin_protocol,
            ws="none", timeout_graceful_shutdown=5, server_header=False,
            proxy_headers=False))
    app = ProxyApp(svc, not_here if admin_server is not None else admin_app)
    # The gateway's own HTTP/1.1 front end (gateway.http.frontend) on uvicorn's listeners.
    http_protocol = front_end(header_limits, on_error=svc.telemetry.connection_refused,
                              guard=guard, refuse_early=app.refuse_early)
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
