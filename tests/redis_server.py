"""A real ``redis-server`` for tests: free port on 127.0.0.1, temp dir, no persistence.

``pause()`` (SIGSTOP) makes it hang — the kernel still accepts connections, nothing answers —
``resume()`` (SIGCONT) brings it back, ``stop()`` takes it down for good (SIGCONT first so a
stopped process can die, then SIGTERM, then SIGKILL). Use as a context manager or call
``stop()`` in a fixture's teardown; ``stop()`` is idempotent.

Also runnable as a script: ``python tests/redis_server.py hammer URL KEY RATE BURST SECONDS
CONCURRENCY`` is the load client of the multi-process limit test (prints ``ready``, waits for a
line on stdin, hammers the bucket, prints one JSON line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from gateway.tools import procs
from gateway.tools.procs import free_port
from tests.tools import require_tool

START_TIMEOUT_S = 10.0




def _pong(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def command(port: int, *args: str, password: str | None = None,
            timeout_s: float = 2.0) -> bytes:
    """Send one command (RESP) and return the raw reply bytes — enough for test checks
    (SCRIPT FLUSH, HGET, PTTL) without a second Redis client library in the tests."""
    def encode(parts: tuple[str, ...]) -> bytes:
        out = [f"*{len(parts)}\r\n".encode()]
        for part in parts:
            data = part.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        if password:
            sock.sendall(encode(("AUTH", password)))
            sock.recv(64)
        sock.sendall(encode(args))
        reply = sock.recv(65536)
    return reply


class RedisServer:
    def __init__(self, *, password: str | None = None) -> None:
        self.password = password
        self.port = 0
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> RedisServer:
        redis_server = require_tool("redis-server")
        self._dir = tempfile.mkdtemp(prefix="redis-test-")
        for _attempt in range(3):          # the free port may be taken before redis binds it
            self.port = free_port()
            args = [redis_server, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self._dir,
                    "--daemonize", "no", "--loglevel", "warning"]
            if self.password:
                args += ["--requirepass", self.password]
            self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _pong(self.port):
                    return self
                time.sleep(0.02)
            self._kill()
        self.stop()
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        """Hang: SIGSTOP. Connections are still accepted by the kernel; nothing answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        procs.stop(proc, 5)

    def stop(self) -> None:
        """Take it down (also when paused). Idempotent."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer port={self.port} pid={self.pid}>"


async def _hammer(url: str, key: str, rate_per_s: float, burst: float, duration_s: float,
                  concurrency: int) -> dict[str, float]:
    from gateway.core.config import RedisConfig
    from gateway.core.schema import Secret
    from gateway.engine.redis_store import RedisStore, StoreUnavailable

    store = RedisStore(RedisConfig(url=Secret(url), timeout_s=1.0, breaker_failures=1000))
    await store.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    admitted = rejected = errors = 0
    first = float("inf")
    last = 0.0
    end = time.monotonic() + duration_s

    async def client() -> None:
        nonlocal admitted, rejected, errors, first, last
        while time.monotonic() < end:
            try:
                result = await store.take(key, rate_per_s=rate_per_s, burst=burst, cost=1)
            except StoreUnavailable:
                errors += 1
                continue
            first = min(first, result.server_time_s)
            last = max(last, result.server_time_s)
            if result.admitted:
                admitted += 1
            else:
                rejected += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    await store.aclose()
    return {"admitted": admitted, "rejected": rejected, "errors": errors,
            "first_server_s": first, "last_server_s": last}


def main(argv: list[str]) -> int:
    if len(argv) != 7 or argv[0] != "hammer":
        print(__doc__, file=sys.stderr)
        return 2
    _, url, key, rate, burst, seconds, concurrency = argv
    result = asyncio.run(_hammer(url, key, float(rate), float(burst), float(seconds),
                                 int(concurrency)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main(sys.argv[1:]))
