"""Embedded cluster: a fleet of real Triton servers, one ``gateway.tools.triton_worker`` each.

:class:`TritonFleet` starts ``n`` worker processes concurrently, each in its own session
(so a terminal's Ctrl-C reaches only us, and one ``killpg`` reaches a worker's whole tree:
the Python process, ``tritonserver`` and its backend stubs), and waits until every worker
answers ``GET /v2/health/ready`` and ``GET /v2/models/{m}/ready`` for each model.

No orphans, however the fleet ends:

* :meth:`TritonFleet.stop` sends SIGTERM to each group, waits, then SIGKILLs the groups;
* it runs from ``__exit__``, from an ``atexit`` hook, and on SIGTERM (while a fleet runs and
  nobody else handles SIGTERM, it is turned into ``SystemExit``; SIGINT already raises
  ``KeyboardInterrupt``);
* each worker also watches its parent and stops itself if the parent dies (even by SIGKILL).

After a worker is gone its scratch directory, the ``/tmp/folder*`` model directories
Triton made for it and the Python backend's ``/dev/shm`` regions are removed, so SIGKILL
(:meth:`TritonFleet.kill`) leaves nothing behind either. Worker logs go to one file per
worker (:attr:`WorkerInfo.log_path`), never to the terminal.

``python -m gateway local --workers 3 [--service-times 5,10,20] [--port 8000]
[--config FILE]`` starts a fleet and runs the gateway in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from gateway.tools.procs import HOST, free_ports, is_http_ok
from gateway.tools.triton_worker import (
    DEFAULT_PER_ITEM_MS,
    MODEL_NAMES,
    env_with_libpython_first,
)

DEFAULT_SERVICE_TIME_MS = 5.0
DEFAULT_STARTUP_TIMEOUT_S = 60.0
DEFAULT_STOP_TIMEOUT_S = 15.0
DEFAULT_CLI_SERVICE_TIMES_MS = (5.0, 10.0, 20.0)
PORTS_PER_WORKER = 3  # http, grpc, metrics
POLL_INTERVAL_S = 0.2
START_ATTEMPTS = 3  # with free ports only: another process may take a port first
LOG_TAIL_BYTES = 4000

_TRITON_TMP_DIR = re.compile(r"^/tmp/folder[A-Za-z0-9]{6}$")
_PR_SET_CHILD_SUBREAPER = 36


class FleetError(RuntimeError):
    """A worker failed to start or to become ready in time."""


@dataclass(frozen=True, slots=True)
class WorkerPorts:
    http: int
    grpc: int
    metrics: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Snapshot of one worker of a fleet."""

    index: int
    name: str
    ports: WorkerPorts
    service_time_ms: float
    pid: int | None
    log_path: Path
    is_running: bool
    starts: int

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports.metrics}/metrics"

    @property
    def client_url(self) -> str:
        """``host:port`` as ``tritonclient`` wants it (no scheme)."""
        return f"{HOST}:{self.ports.http}"


@dataclass(slots=True)
class _Worker:
    info: WorkerInfo
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    log_file: IO[bytes] | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None


# ------------------------------------------------------------------ process groups


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _leftovers(pgid: int) -> list[Path]:
    """Files a worker group leaves behind when killed: Triton's model dirs, shm regions."""
    paths: set[Path] = set()
    for pid in group_members(pgid):
        for arg in _cmdline(pid):
            # Backend stubs run /tmp/folderXXXXXX/1/model.py (Triton's copy of the model).
            head = "/".join(arg.split("/")[:3])
            if _TRITON_TMP_DIR.match(head):
                paths.add(Path(head))
        # Shared memory: the Python backend's pytrtion<pid>-* and PyTriton's psm_* regions.
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                where = line.find(" /dev/shm/")
                if where >= 0:
                    paths.add(Path(line[where + 1:].removesuffix(" (deleted)")))
    with contextlib.suppress(OSError):
        paths.update(Path("/dev/shm").glob(f"pytrtion{pgid}-*"))
    return sorted(paths)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux PR_SET_CHILD_SUBREAPER).

    When a worker's group is killed, ``tritonserver`` and its stubs lose their parents; they
    would be re-parented to PID 1, which in containers often never reaps them, leaving
    zombies. As subreaper this process adopts them and :func:`_reap` collects them.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: Sequence[int]) -> None:
    # Only the given pids: waitpid(-1) would steal other code's children.
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _wait_group_gone(pgid: int, pids: Sequence[int], timeout_s: float) -> bool:
    """Wait until no live process of the group is left, reaping ``pids`` as they die."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pids)
        if not group_members(pgid):
            time.sleep(0.01)  # re-parenting of the last orphans to us is asynchronous
            _reap(pids)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------ exit handling

_LIVE: set[TritonFleet] = set()
_LIVE_LOCK = threading.Lock()
_SIGTERM_INSTALLED = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        fleets = list(_LIVE)
    for fleet in fleets:
        fleet.stop()


def _sigterm_to_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _register(fleet: TritonFleet) -> None:
    global _SIGTERM_INSTALLED
    with _LIVE_LOCK:
        _LIVE.add(fleet)
    if (not _SIGTERM_INSTALLED and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        # Default SIGTERM would end us without unwinding: turn it into SystemExit so that
        # `finally`, __exit__ and atexit stop the workers.
        signal.signal(signal.SIGTERM, _sigterm_to_exit)
        _SIGTERM_INSTALLED = True


def _unregister(fleet: TritonFleet) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(fleet)


atexit.register(_stop_all)


# ------------------------------------------------------------------ the fleet


class TritonFleet:
    """``n`` real Triton servers on loopback, started together, stopped without orphans.

    Usable as a context manager (``with TritonFleet(2) as fleet: …``), from async code
    (``async with`` / :meth:`astart` / :meth:`astop`, which run the blocking calls in a
    thread), or with explicit :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        n: int,
        base_port: int | None = None,
        service_times_ms: Sequence[float] | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        *,
        per_item_ms: float = DEFAULT_PER_ITEM_MS,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
        log_dir: str | Path | None = None,
        models: Sequence[str] = MODEL_NAMES,
    ) -> None:
        if n < 1:
            raise ValueError("a fleet needs at least one worker")
        times = list(service_times_ms or [DEFAULT_SERVICE_TIME_MS])
        if not times or any(t < 0 for t in times):
            raise ValueError("service times must be non-negative")
        self._base_port = base_port
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._per_item_ms = per_item_ms
        self._models = tuple(models)
        self._root = Path(tempfile.mkdtemp(prefix="triton-fleet-"))
        self._log_dir = Path(log_dir) if log_dir is not None else self._root / "logs"
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        if base_port is None:
            picked = free_ports(PORTS_PER_WORKER * n)  # all at once: no two workers share
            ports = [WorkerPorts(*picked[k:k + PORTS_PER_WORKER])
                     for k in range(0, len(picked), PORTS_PER_WORKER)]
        else:
            ports = [WorkerPorts(*(base_port + PORTS_PER_WORKER * i + k for k in range(3)))
                     for i in range(n)]
        self._workers = [
            _Worker(WorkerInfo(index=i, name=f"triton-{i}", ports=ports[i],
                               service_time_ms=float(t), pid=None,
                               log_path=self._log_dir / f"triton-{i}.log",
                               is_running=False, starts=0))
            for i, t in zip(range(n), itertools.cycle(times), strict=False)
        ]

    # ---------------------------------------------------------------- snapshots

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        return tuple(self.worker(i) for i in range(len(self._workers)))

    def worker(self, i: int) -> WorkerInfo:
        with self._lock:
            w = self._workers[i]
            running = w.process is not None and w.process.poll() is None
            return replace(w.info, pid=w.process.pid if w.process else None, is_running=running)

    @property
    def http_urls(self) -> list[str]:
        return [w.http_url for w in self.workers]

    @property
    def metrics_urls(self) -> list[str]:
        return [w.metrics_url for w in self.workers]

    @property
    def log_dir(self) -> Path:
        return self._log_dir

    @property
    def scratch_dir(self) -> Path:
        """Where the workers' files live (removed by :meth:`stop`)."""
        return self._root

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    def startup_times_s(self) -> list[float | None]:
        """Seconds from spawn to ready, per worker (last start)."""
        with self._lock:
            return [w.ready_after_s for w in self._workers]

    def gateway_config_dict(self, port: int = 0) -> dict[str, Any]:
        """Plain config data for ``gateway.core.config.parse_config``: listen, workers, models.

        The models are listed because PyTriton's servers leave them out of the repository
        index: the gateway learns them by probing ``/v2/models/{m}/ready`` by name.
        """
        return {
            "listen": {"host": HOST, "port": port},
            "workers": [{"url": w.http_url, "metrics_url": w.metrics_url, "name": w.name}
                        for w in self.workers],
            "models": {name: {} for name in self._models},
        }

    def __repr__(self) -> str:
        running = sum(w.is_running for w in self.workers)
        return f"<TritonFleet workers={len(self)} running={running} logs={self._log_dir}>"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> TritonFleet:
        """Spawn every worker at once and wait until all are ready (or raise FleetError)."""
        _register(self)
        become_subreaper()
        try:
            self._start_indices(list(range(len(self._workers))), may_move=True)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, i: int) -> WorkerInfo:
        """Stop worker ``i`` (gracefully, SIGKILL after the stop timeout) and start it again."""
        self._terminate([i], graceful=True)
        self._start_indices([i], may_move=False)  # its URL is in the gateway's config
        return self.worker(i)

    def kill(self, i: int) -> None:
        """SIGKILL worker ``i``'s whole process group: a worker dying without warning."""
        self._terminate([i], graceful=False)

    def stop(self) -> None:
        """SIGTERM every worker group, wait, SIGKILL what is left; remove scratch files."""
        self._terminate(list(range(len(self._workers))), graceful=True)
        _unregister(self)
        with self._lock:
            # Logs live under it too unless the caller chose log_dir.
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> TritonFleet:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def astart(self) -> TritonFleet:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> TritonFleet:
        return await self.astart()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.astop()

    # ---------------------------------------------------------------- internals

    def _fresh_ports(self, i: int) -> WorkerPorts:
        taken = {p for k, w in enumerate(self._workers) if k != i
                 for p in (w.info.ports.http, w.info.ports.grpc, w.info.ports.metrics)}
        while True:
            ports = WorkerPorts(*free_ports(PORTS_PER_WORKER))
            if taken.isdisjoint((ports.http, ports.grpc, ports.metrics)):
                return ports

    def _spawn(self, i: int) -> None:
        with self._lock:
            w = self._workers[i]
            info = w.info
            workdir = self._root / "run" / f"{info.name}-{info.starts}"
            workdir.mkdir(parents=True)
            env = env_with_libpython_first(os.environ)
            env["PYTHONUNBUFFERED"] = "1"
            env["PYTRITON_HOME"] = str(workdir / "home")
            package_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH", "")) if p)
            cmd = [sys.executable, "-m", "gateway.tools.triton_worker",
                   "--http-port", str(info.ports.http), "--grpc-port", str(info.ports.grpc),
                   "--metrics-port", str(info.ports.metrics),
                   "--service-time-ms", str(info.service_time_ms),
                   "--per-item-ms", str(self._per_item_ms), "--name", info.name,
                   "--workdir", str(workdir / "triton"), "--parent-pid", str(os.getpid())]
            log_file = info.log_path.open("ab")
            log_file.write(f"=== start {info.starts}: {' '.join(cmd)}\n".encode())
            log_file.flush()
            w.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, cwd=workdir, env=env,
                                         start_new_session=True)
            w.log_file, w.workdir = log_file, workdir
            w.started_at, w.ready_after_s = time.monotonic(), None
            w.info = replace(info, starts=info.starts + 1)

    def _is_ready(self, info: WorkerInfo) -> bool:
        base = info.http_url
        return is_http_ok(f"{base}/v2/health/ready") and all(
            is_http_ok(f"{base}/v2/models/{m}/ready") for m in self._models)

    def _start_indices(self, indices: list[int], *, may_move: bool) -> None:
        """Spawn ``indices`` and wait for them; ``may_move``: on early exit, try new ports."""
        attempts = {i: 1 for i in indices}
        for i in indices:
            self._spawn(i)
        pending = set(indices)
        deadline = time.monotonic() + self._startup_timeout_s
        while pending:
            for i in sorted(pending):
                w = self._workers[i]
                assert w.process is not None
                status = w.process.poll()
                if status is not None:
                    self._terminate([i], graceful=False)
                    if may_move and self._base_port is None and attempts[i] < START_ATTEMPTS:
                        # Most likely a port taken since we picked it: new ports, again.
                        attempts[i] += 1
                        with self._lock:
                            w.info = replace(w.info, ports=self._fresh_ports(i))
                        self._spawn(i)
                        continue
                    raise FleetError(f"{w.info.name} exited with status {status}"
                                     f"; log {w.info.log_path}:\n{_tail(w.info.log_path)}")
                if self._is_ready(w.info):
                    w.ready_after_s = time.monotonic() - w.started_at
                    pending.discard(i)
            if pending and time.monotonic() > deadline:
                names = ", ".join(self._workers[i].info.name for i in sorted(pending))
                raise FleetError(f"not ready after {self._startup_timeout_s:.0f} s: {names}; "
                                 f"logs in {self._log_dir}")
            if pending:
                time.sleep(POLL_INTERVAL_S)

    def _terminate(self, indices: list[int], *, graceful: bool) -> None:
        # The lock guards the bookkeeping only, so snapshots stay cheap while workers stop.
        with self._lock:
            live = [(w, w.process) for w in (self._workers[i] for i in indices)
                    if w.process is not None]
            doomed = [(proc, group_members(proc.pid), _leftovers(proc.pid))
                      for _, proc in live]
        if graceful:
            for proc, _, _ in doomed:
                if proc.poll() is None:
                    _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout_s
            for proc, _, _ in doomed:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc, members, leftovers in doomed:
            # SIGKILL the group even after a clean exit: catches anything left behind.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_group_gone(proc.pid, members, timeout_s=5.0)
            _remove(leftovers)
        with self._lock:
            for w, proc in live:
                if w.process is not proc:
                    continue  # restarted meanwhile
                if w.log_file is not None:
                    w.log_file.close()
                if w.workdir is not None:
                    shutil.rmtree(w.workdir, ignore_errors=True)
                w.process, w.log_file, w.workdir = None, None, None


# ------------------------------------------------------------------ command line


def _parse_service_times(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected non-negative numbers")
    return values


def build_config_data(fleet: TritonFleet, port: int | None,
                      base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a config file's data) with its workers replaced by the fleet's."""
    data = dict(base or {})
    data.pop("discovery", None)
    fleet_data = fleet.gateway_config_dict(port if port is not None else 0)
    data["workers"] = fleet_data["workers"]
    data["models"] = {**fleet_data["models"], **(data.get("models") or {})}
    listen = dict(data.get("listen") or {})
    listen.setdefault("host", HOST)
    if port is not None or "port" not in listen:
        from gateway.core.config import DEFAULT_PORT

        listen["port"] = port if port is not None else DEFAULT_PORT
    data["listen"] = listen
    return data


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from gateway.core.schema import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", "expected a mapping at the top level")
    return data


def _print_urls(fleet: TritonFleet, gateway_url: str | None) -> None:
    if gateway_url:
        print(f"gateway        {gateway_url}")
    for w, ready_s in zip(fleet.workers, fleet.startup_times_s(), strict=True):
        took = f"ready in {ready_s:.1f} s" if ready_s is not None else ""
        print(f"{w.name:<14} {w.http_url}  metrics {w.metrics_url}  "
              f"service {w.service_time_ms:g} ms  {took}")
    print(f"worker logs    {fleet.log_dir}")
    print(f"models         {', '.join(fleet.models)}", flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gateway local",
                                description="Real Triton servers (pytriton) + the gateway.")
    p.add_argument("--workers", type=int, default=3, help="number of Triton servers")
    p.add_argument("--service-times", type=_parse_service_times,
                   default=list(DEFAULT_CLI_SERVICE_TIMES_MS),
                   help="add_sub ms per execution, per worker, cycled (default 5,10,20)")
    p.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    p.add_argument("--config", default=None,
                   help="gateway YAML whose sections are used; its workers are replaced")
    p.add_argument("--base-port", type=int, default=None,
                   help="first worker port (3 per worker); default free ports")
    p.add_argument("--log-dir", default=None, help="keep worker logs here")
    p.add_argument("--no-gateway", action="store_true",
                   help="only run the Triton servers, until Ctrl-C")
    p.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S)
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")

    from gateway.core.config import parse_config
    from gateway.core.schema import ConfigError

    run: Callable[..., int] | None = None
    if not args.no_gateway:
        try:
            from gateway.server import run
        except ImportError as exc:
            print(f"gateway local: the gateway is not available ({exc}); "
                  "use --no-gateway to run only the Triton servers", file=sys.stderr)
            return 1
    try:
        base = _load_yaml(args.config) if args.config else None
        # Check the other sections now rather than after the servers took seconds to start.
        parse_config({**(base or {}), "discovery": None,
                      "workers": [{"url": f"http://{HOST}:1"}],
                      "listen": {**((base or {}).get("listen") or {}),
                                 **({"port": args.port} if args.port is not None else {})}})
    except ConfigError as exc:
        print(f"gateway local: {exc}", file=sys.stderr)
        return 2

    fleet = TritonFleet(args.workers, base_port=args.base_port,
                        service_times_ms=args.service_times,
                        startup_timeout_s=args.startup_timeout, log_dir=args.log_dir)
    print(f"starting {args.workers} Triton servers (logs in {fleet.log_dir}) …", flush=True)
    try:
        try:
            fleet.start()
        except FleetError as exc:
            print(f"gateway local: {exc}", file=sys.stderr)
            return 1
        try:
            cfg = parse_config(build_config_data(fleet, args.port, base))
        except ConfigError as exc:
            print(f"gateway local: {exc}", file=sys.stderr)
            return 2
        if run is None:
            _print_urls(fleet, None)
            print("Triton servers running; Ctrl-C stops them.", flush=True)
            _wait_for_signal()
            return 0
        _print_urls(fleet, None)

        def on_ready(url: str) -> None:
            print(f"gateway        {url}   metrics {url}/metrics  status {url}/status\n"
                  "Ctrl-C stops everything.", flush=True)

        return run(cfg, on_ready=on_ready)
    except KeyboardInterrupt:
        return 130
    finally:
        print("stopping Triton servers …", flush=True)
        fleet.stop()


def iter_fleet_pids(fleet: TritonFleet) -> Iterator[int]:
    """Every live process of every worker group (the workers, tritonserver, stubs)."""
    for w in fleet.workers:
        if w.pid is not None:
            yield from group_members(w.pid)
