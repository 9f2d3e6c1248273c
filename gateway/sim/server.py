"""Triton simulator: many simulated KServe v2 workers in one process (the fleet).

``python -m gateway sim --workers N --base-port P`` serves N workers on ports P … P+N-1
(``--base-port 0``: free ports, printed at start). Each port speaks the Triton HTTP endpoints
the gateway uses (health, server/model metadata, model ready/config/stats, repository index,
inference in JSON and in the binary tensor extension) **and serves Triton's metrics page at
``GET /metrics`` on the same port** (a real Triton uses a second port, 8002): point a worker's
``metrics_url`` at ``http://host:port/metrics``.

Run-time control, JSON in, JSON out, on every worker port (and on ``--control-port`` if
given, which serves nothing else):

* ``POST /sim/control`` ``{"worker": 3 | [1, 2] | "all", <changes>}`` — without ``worker``
  the worker owning the port. Changes: any :class:`~gateway.sim.core.Faults` field
  (``error_rate``, ``added_latency_ms``, ``hang``, ``ready``, ``metrics`` ok|error|hang),
  ``crash: true`` / ``restart: true`` / ``restart_after_s``, and the worker's capacity
  (``slots``, ``speed_factor``, ``base_ms``, ``per_item_ms``, ``memory_total_bytes``,
  ``memory_base_used_bytes``, ``memory_per_item_bytes``, ``max_queue``).
  A crashed worker's own port is closed: send its restart to another port.
* ``GET /sim/stats`` — :meth:`SimFleet.statistics` as JSON.

In-process API: :class:`SimFleet` (``await start()`` / ``await stop()`` on the caller's
loop) and :class:`SimFleetThread` (its own loop in a background thread; a context manager).
The worker's decisions live in :mod:`gateway.sim.core`, what its models compute in
:mod:`gateway.sim.infer`; :mod:`gateway.sim.worker` is one worker's shell, this module the
fleet's, :mod:`gateway.sim.cli` the command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.sim.connection import Connection, Handler, Request, Respond, error_body, json_body
from gateway.sim.core import Faults, WorkerSpec
from gateway.sim.worker import SimWorker, SimWorkerStats

__all__ = ["FleetStats", "SimFleet", "SimFleetThread", "SimWorkerStats"]

T = TypeVar("T")
_log = logging.getLogger(__name__)

_FAULT_FIELDS = {f.name for f in dataclasses.fields(Faults)} - {"crashed"}
_SPEC_FIELDS = {"slots", "speed_factor", "base_ms", "per_item_ms", "memory_total_bytes",
                "memory_base_used_bytes", "memory_per_item_bytes", "max_queue"}


@dataclass(frozen=True, slots=True)
class FleetStats:
    workers: tuple[SimWorkerStats, ...]

    def asjson_body(self) -> dict[str, Any]:
        return {"workers": [dataclasses.asdict(w) for w in self.workers]}


class _ControlOnly(Handler):
    def __init__(self, fleet: SimFleet) -> None:
        super().__init__()
        self.fleet = fleet

    def handle(self, request: Request, respond: Respond) -> None:
        if request.path.startswith("/sim/"):
            self.fleet.handle_control(request, respond, None)
        else:
            respond(404, error_body("Not Found"), "application/json", ())


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
            SimWorker(self, i, spec, host, base_port + i if base_port else 0, seed * 100_003 + i)
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
                    lambda: Connection(self._control_handler), self.host, self._control_port,
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
            worker.close()
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

    def handle_control(self, request: Request, respond: Respond, own: int | None) -> None:
        if request.path == "/sim/stats" and request.method == "GET":
            respond(200, json_body(self.statistics().asjson_body()), "application/json", ())
            return
        if request.path != "/sim/control":
            respond(404, error_body("Not Found"), "application/json", ())
            return
        if request.method != "POST":
            respond(405, error_body("Method Not Allowed"), "application/json", ())
            return
        try:
            indexes = self._apply_control(json.loads(request.body or b"{}"), own)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            respond(400, error_body(f"bad control request: {exc}"), "application/json", ())
            return
        respond(200, json_body({"ok": True, "workers": indexes}), "application/json", ())

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


def new_loop() -> asyncio.AbstractEventLoop:
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
        loop = new_loop()
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
