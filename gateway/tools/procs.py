"""Child processes on loopback, for tests, benchmarks and tools: free ports, start, wait until
an HTTP endpoint answers, stop.

Stopping is always the same escalation — a polite signal (SIGTERM unless told otherwise),
a bounded wait, then SIGKILL — so no caller writes its own terminate/wait/kill block and no
child outlives a failed test. ``group=True`` acts on the child's whole process group (a child
started with ``new_session=True`` leads one), which reaches what the child itself started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DEFAULT_STOP_TIMEOUT_S = 10.0
DEFAULT_READY_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.1

Process = subprocess.Popen[Any]


# ------------------------------------------------------------------ ports


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound together, then closed);
    another process may take one before the caller binds it."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def free_port(host: str = HOST) -> int:
    return free_ports(1, host)[0]


# ------------------------------------------------------------------ HTTP probes


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Status and body of ``GET url`` (an HTTP error status is an answer, not an exception;
    a refused or dropped connection raises :class:`OSError`)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def is_http_ok(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``GET url`` answers 200 now."""
    try:
        return http_get(url, timeout_s)[0] == 200
    except (OSError, ValueError):
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, *,
               proc: Process | None = None, what: str = "the condition",
               poll_s: float = POLL_INTERVAL_S) -> None:
    """Poll ``predicate`` until it holds; :class:`RuntimeError` after ``timeout_s`` or as soon
    as ``proc`` (the process expected to make it hold) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before {what}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"no {what} within {timeout_s:g} s")
        time.sleep(poll_s)


def wait_http_ready(url: str, timeout_s: float = DEFAULT_READY_TIMEOUT_S, *,
                    proc: Process | None = None, poll_s: float = POLL_INTERVAL_S) -> None:
    """Until ``GET url`` answers 200 (see :func:`wait_until` for the failures)."""
    wait_until(lambda: is_http_ok(url), timeout_s, proc=proc, what=f"200 from {url}",
               poll_s=poll_s)


# ------------------------------------------------------------------ start and stop


def start(cmd: Sequence[str], *, log_path: Path | None = None,
          env: Mapping[str, str] | None = None, cwd: Path | str | None = None,
          new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdin closed and stdout+stderr to ``log_path`` (else discarded).
    ``env`` is added to this process's environment. ``new_session``: the child leads its own
    process group (a terminal's Ctrl-C does not reach it; stop it with ``group=True``)."""
    full_env = {**os.environ, **env} if env is not None else None
    if log_path is None:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                start_new_session=new_session)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                start_new_session=new_session)


def _send(proc: Process, signum: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, signum)
        elif proc.poll() is None:
            proc.send_signal(signum)


def stop(proc: Process | None, timeout_s: float = DEFAULT_STOP_TIMEOUT_S, *,
         signum: int = signal.SIGTERM, group: bool = False) -> int | None:
    """``signum`` → wait up to ``timeout_s`` → SIGKILL → wait; returns the exit status (None
    for no process). Idempotent. With ``group``, the signals go to the child's process group
    and, once the child is gone, SIGKILL takes whatever is left of the group."""
    if proc is None:
        return None
    if proc.poll() is None:
        _send(proc, signum, group)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _send(proc, signal.SIGKILL, group)
    if group:
        _send(proc, signal.SIGKILL, group)
    return proc.wait()


def stop_all(procs: Sequence[Process], timeout_s: float = DEFAULT_STOP_TIMEOUT_S, *,
             signum: int = signal.SIGTERM) -> None:
    """:func:`stop` for several processes at once: all are signalled first, then each gets
    what is left of one shared ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            _send(proc, signum, group=False)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        stop(proc, max(0.0, deadline - time.monotonic()), signum=signum)
