"""``gateway serve --processes N``: N gateway processes on one port, one gateway.

One Python process is one core. The parent starts N children, each a whole gateway that
binds the listen port with ``SO_REUSEPORT`` (the kernel spreads new connections over them),
and keeps the membership hub (``gateway.engine.hub``) the children exchange their reports
through — so they share each worker's budget, fair share and the capacity signals as
replicas do through Redis, with nothing to install. Where ``admission.redis.url`` is set the
children use Redis instead, as members of the wider fleet of replicas.

The parent forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) to every child, restarts a
child that died (at most :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW_S`, then it stops the
rest and exits 1), and its children die with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from gateway.engine import hub

log = logging.getLogger("gateway.app.processes")

MAX_RESTARTS: Final = 10
RESTART_WINDOW_S: Final = 60.0
RESTART_DELAY_S: Final = 0.5
CHILD_FLAG: Final = "--reuse-port"   # the children's serve flag: bind with SO_REUSEPORT
PR_SET_PDEATHSIG: Final = 1


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(config_path: str, processes: int, host: str, port: int) -> int:
    """Blocking: supervise ``processes`` children serving ``config_path`` on one port."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    holder = None
    if port == 0:  # one port for all: pick it here, and hold it while the children bind
        holder = reuse_port_socket(host, 0)
        port = holder.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="gateway-hub-")
    try:
        return asyncio.run(_supervise(config_path, processes, port,
                                      str(Path(workdir) / "hub.sock")))
    finally:
        if holder is not None:
            holder.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _supervise(config_path: str, processes: int, port: int, hub_path: str) -> int:
    membership = hub.Hub()
    await membership.start(hub_path)
    env = {**os.environ, hub.ENV_VAR: hub_path, hub.PROCESSES_ENV_VAR: str(processes)}
    argv = [sys.executable, "-m", "gateway", "serve", "--config", config_path,
            "--port", str(port), CHILD_FLAG]
    children: dict[int, asyncio.subprocess.Process] = {}
    stopping = asyncio.Event()
    restarts: collections.deque[float] = collections.deque()
    failed = False

    async def spawn(slot: int) -> None:
        children[slot] = await asyncio.create_subprocess_exec(
            *argv, env=env, preexec_fn=_die_with_parent)
        log.info("process %d of %d started (pid %d)", slot + 1, processes, children[slot].pid)

    def forward(signum: int) -> None:
        if signum != signal.SIGHUP:
            stopping.set()
        for child in children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, forward, signum)

    async def watch(slot: int) -> None:
        nonlocal failed
        while True:
            code = await children[slot].wait()
            if stopping.is_set():
                return
            now = time.monotonic()
            while restarts and now - restarts[0] > RESTART_WINDOW_S:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS:
                log.error("process %d exited (%s); %d restarts in %.0f s: stopping", slot + 1,
                          code, len(restarts), RESTART_WINDOW_S)
                failed = True
                forward(signal.SIGTERM)
                return
            restarts.append(now)
            log.warning("process %d exited (%s): restarting it", slot + 1, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if stopping.is_set():
                return
            await spawn(slot)

    try:
        for slot in range(processes):
            await spawn(slot)
        await asyncio.gather(*(watch(slot) for slot in range(processes)))
        codes = [c.returncode for c in children.values()]
    finally:
        await membership.close()
    return 1 if failed or any(c not in (0, None, -signal.SIGTERM, -signal.SIGINT)
                              for c in codes) else 0
