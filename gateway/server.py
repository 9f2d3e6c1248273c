"""Running the gateway: uvicorn, signals, reload, and the ``serve`` / ``check-config`` /
``config-reference`` commands.

* SIGHUP (or ``POST /admin/reload``) re-reads the config file; a bad file is refused with
  the reason and the old configuration stays in force.
* SIGTERM / SIGINT: readiness turns false, the listener closes, requests in flight get up to
  ``upstream.drain_timeout_s`` to finish, then background work stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator

import yaml

from gateway.config import GatewayConfig, describe_config, load_config
from gateway.schema import ConfigError, reference
from gateway.service import GatewayService

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
                stop: asyncio.Event | None = None) -> int:
    """Run the gateway in the current event loop until SIGTERM/SIGINT (or ``stop``)."""
    import uvicorn

    from gateway.admin import build_admin_app
    from gateway.proxy import ProxyApp

    class _Server(uvicorn.Server):
        """uvicorn's server without its own signal capture: the gateway owns SIGTERM/SIGINT
        (drain, then clean up) and SIGHUP (reload), and exits 0 after a drain instead of
        re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    svc = GatewayService(cfg)
    svc.config_path = config_path
    app = ProxyApp(svc, build_admin_app(svc, svc.telemetry, lambda: reload_from_file(svc)))
    ucfg = uvicorn.Config(app, host=cfg.listen.host, port=cfg.listen.port, lifespan="off",
                          access_log=False, log_level="warning", http="httptools",
                          timeout_graceful_shutdown=int(max(1, cfg.upstream.drain_timeout_s)),
                          timeout_keep_alive=75, backlog=4096,
                          # The gateway is the origin of its own errors and passes each
                          # worker's headers through: no extra Server header, and no
                          # X-Forwarded-* rewriting layer on the hot path.
                          server_header=False, proxy_headers=False)
    server = _Server(ucfg)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_from_file(svc))

    def on_term(signum: int) -> None:
        # Drain: readiness turns false at once, uvicorn stops accepting and waits for the
        # requests in flight (up to drain_timeout_s); a second SIGINT forces the exit.
        svc.draining = True
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
        if on_ready is not None:
            on_ready(url)

    async def external_stop() -> None:
        if stop is not None:
            await stop.wait()
            svc.draining = True
            server.should_exit = True

    grpc_listener = None
    if cfg.listen.grpc_port is not None:  # grpcio is imported only when the listener is on
        from gateway.grpc_server import start_grpc
        grpc_listener = await start_grpc(svc)
    background = asyncio.create_task(svc.run())
    helpers = [asyncio.create_task(announce()), asyncio.create_task(external_stop())]
    try:
        await server.serve()
    finally:
        svc.draining = True
        for t in helpers:
            t.cancel()
        if grpc_listener is not None:
            await grpc_listener.stop(cfg.upstream.drain_timeout_s)
        svc.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(background, timeout=5)
        await svc.aclose()
    return 0


def run(cfg: GatewayConfig, *, on_ready: Callable[[str], None] | None = None,
        config_path: str | None = None) -> int:
    """Blocking: run the gateway until SIGTERM/SIGINT; returns the exit status."""
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _install_uvloop() == "uvloop":
        import uvloop

        return uvloop.run(serve(cfg, on_ready=on_ready, config_path=config_path))
    return asyncio.run(serve(cfg, on_ready=on_ready, config_path=config_path))


# commands -----------------------------------------------------------------------------------
def main_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway serve", description="Run the gateway.")
    parser.add_argument("--config", "-c", required=True, help="YAML configuration file")
    parser.add_argument("--port", type=int, help="override listen.port")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error in {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.port is not None:
        from dataclasses import replace

        cfg = replace(cfg, listen=replace(cfg.listen, port=args.port))
    return run(cfg, config_path=args.config)


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
