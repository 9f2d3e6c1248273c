"""Pure model of one simulated Triton worker: admission, memory, service time, faults.

The asyncio shell (:mod:`gateway.sim.worker`) feeds events in and carries decisions out;
nothing here touches a socket or reads a clock (``now`` is monotonic seconds, passed in), and the
only randomness comes from an injected :class:`random.Random`.

How a worker behaves:

* ``slots`` executions run at once. A request arriving with a free slot starts at once;
  otherwise it waits in a FIFO queue (bounded by ``max_queue``; beyond it the request is
  refused with 503, reason ``REJECTED``). Queued requests are Triton's
  ``nv_inference_pending_request_count``.
* Service time = (base_ms + per_item_ms × batch) / speed_factor, every time
  (``service_dist="fixed"``, the default), or drawn per execution from an exponential
  distribution with that mean (``"exponential"``: an M/M/c server, the analytical replay's
  model, :func:`draw_service_s`), from the worker's seeded RNG.
* GPU memory: ``memory_base_used_bytes`` is always used; each executing request holds
  ``memory_per_item_bytes × batch`` more. A request whose memory does not fit when it would
  start fails with 500 "... out of memory ..." (failure reason ``OTHER``; ``sim_oom_total``).
* ``error_rate``: each arriving inference fails with 500 with that probability (reason
  ``BACKEND``), drawn before admission.
* ``nv_gpu_utilization`` = busy slots / slots, instantaneous (real Triton refreshes it every
  ``--metrics-interval-ms``; the simulator has no such lag).
* Counters are cumulative from the worker's (re)start, like a real process.

What a model computes, and how a request is checked against it, is in
:mod:`gateway.sim.infer`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

GIB = 1024**3
MIB = 1024**2

MetricsFault = Literal["ok", "error", "hang"]
ModelOp = Literal["double", "identity"]
ServiceDist = Literal["fixed", "exponential"]
SERVICE_DISTS: tuple[ServiceDist, ...] = ("fixed", "exponential")


class SimError(Exception):
    """An inference error the worker answers as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------ configuration values

@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str = "FP32"
    dims: tuple[int, ...] = (16,)  # without the batch dimension; -1 = any size


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str = "simple"
    version: str = "1"
    inputs: tuple[TensorSpec, ...] = (TensorSpec("INPUT0"),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("OUTPUT0"),)
    op: ModelOp = "double"
    max_batch_size: int = 64
    # what the model config says; the simulator executes every request alone either way
    # (as Triton does for a model without a dynamic batcher), so the default is off
    dynamic_batching: bool = False
    # the dynamic batcher's default queue policy allows a request's own ``timeout``
    # (reported in the config; the simulator records the values it receives)
    timeout_override: bool = False
    # dynamic_batching.priority_levels (reported; the simulator records what it receives)
    priority_levels: int = 0
    # sequence_batching in its config: a stateful model (reported; the simulator keeps no
    # sequence state)
    sequence_batching: bool = False
    # per-model cost overrides; None = the worker's value
    base_ms: float | None = None
    per_item_ms: float | None = None
    memory_per_item_bytes: int | None = None


DEFAULT_MODEL = SimModel()


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected misbehaviour; every field can change at run time."""

    error_rate: float = 0.0        # probability that an inference answers 500
    added_latency_ms: float = 0.0  # added before each inference response (not in metrics)
    hang: bool = False             # accept requests but never answer (all but /sim/*)
    ready: bool = True             # False: /v2/health/ready and model ready answer 400
    metrics: MetricsFault = "ok"   # /metrics: ok, 500, or never answer
    crashed: bool = False          # not listening; connections dropped (shell state)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    slots: int = 4
    speed_factor: float = 1.0
    base_ms: float = 2.0
    per_item_ms: float = 0.05
    has_gpu: bool = True
    memory_total_bytes: int = 16 * GIB
    memory_base_used_bytes: int = 2 * GIB
    memory_per_item_bytes: int = 16 * MIB
    max_queue: int = 4096
    models: tuple[SimModel, ...] = (DEFAULT_MODEL,)
    faults: Faults = field(default_factory=Faults)
    service_dist: ServiceDist = "fixed"

    def find_model(self, name: str, version: str) -> SimModel | None:
        for model in self.models:
            if model.name == name and (not version or version == model.version):
                return model
        return None

    def service_s(self, model: SimModel, batch: int) -> float:
        base = self.base_ms if model.base_ms is None else model.base_ms
        per_item = self.per_item_ms if model.per_item_ms is None else model.per_item_ms
        return (base + per_item * batch) / max(self.speed_factor, 1e-9) / 1000.0

    def memory_bytes(self, model: SimModel, batch: int) -> int:
        per_item = (self.memory_per_item_bytes if model.memory_per_item_bytes is None
                    else model.memory_per_item_bytes)
        return per_item * batch if self.has_gpu else 0


def draw_service_s(mean_s: float, dist: ServiceDist, rng: random.Random) -> float:
    """One execution's service time: ``mean_s`` itself (``fixed``; the RNG is not touched),
    or an exponential draw with mean ``mean_s`` (``exponential``)."""
    if dist == "fixed" or mean_s <= 0:
        return mean_s
    if dist == "exponential":
        return rng.expovariate(1.0 / mean_s)
    raise ValueError(f"unknown service distribution {dist!r}")


# ------------------------------------------------------------------ decisions

@dataclass(frozen=True, slots=True)
class Start:
    ticket: int
    service_s: float


@dataclass(frozen=True, slots=True)
class Fail:
    ticket: int
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Queued:
    ticket: int


Event = Start | Fail | Queued


@dataclass(slots=True)
class _Request:
    ticket: int
    model: str
    batch: int
    arrived_at: float
    started_at: float = 0.0
    memory_bytes: int = 0


@dataclass(slots=True)
class _ModelCounters:
    success: int = 0
    failure: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("OTHER", "BACKEND", "CANCELED", "REJECTED"), 0))
    inference_count: int = 0
    exec_count: int = 0
    request_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    pending: int = 0
    last_inference_ms: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStats:
    busy_slots: int
    slots: int
    queued: int
    memory_used_bytes: int
    memory_total_bytes: int
    success: int
    failure: int
    oom_total: int


class WorkerCore:
    """State of one simulated Triton process from its (re)start."""

    __slots__ = ("_counters", "_executing", "_next_ticket", "_queue", "_rng", "busy",
                 "gpu_uuid", "memory_used_bytes", "oom_total", "spec", "started_at")

    def __init__(self, spec: WorkerSpec, rng: random.Random, now: float, gpu_uuid: str) -> None:
        self.spec = spec
        self.gpu_uuid = gpu_uuid
        self.started_at = now
        self._rng = rng
        self._queue: deque[_Request] = deque()
        self._executing: dict[int, _Request] = {}
        self._next_ticket = 1
        self._counters = {m.name: _ModelCounters() for m in spec.models}
        self.busy = 0
        self.memory_used_bytes = spec.memory_base_used_bytes if spec.has_gpu else 0
        self.oom_total = 0

    def __repr__(self) -> str:
        return (f"<WorkerCore busy={self.busy}/{self.spec.slots} queued={len(self._queue)} "
                f"memory_used={self.memory_used_bytes}>")

    def _model(self, name: str) -> SimModel:
        model = self.spec.find_model(name, "")
        if model is None:
            raise KeyError(name)
        return model

    def _fail(self, req: _Request, status: int, reason: str, message: str) -> Fail:
        self._counters[req.model].failure[reason] += 1
        return Fail(req.ticket, status, message)

    def _try_start(self, req: _Request, now: float) -> Start | Fail:
        model = self._model(req.model)
        need = self.spec.memory_bytes(model, req.batch)
        free = self.spec.memory_total_bytes - self.memory_used_bytes
        if self.spec.has_gpu and need > free:
            self.oom_total += 1
            return self._fail(req, 500, "OTHER",
                              f"CUDA out of memory: tried to allocate {need} bytes, "
                              f"{max(free, 0)} bytes free on {self.gpu_uuid}")
        req.started_at = now
        req.memory_bytes = need
        self.memory_used_bytes += need
        self.busy += 1
        self._executing[req.ticket] = req
        return Start(req.ticket, draw_service_s(self.spec.service_s(model, req.batch),
                                                self.spec.service_dist, self._rng))

    def arrive(self, model: str, batch: int, now: float) -> Event:
        """A valid inference of ``batch`` items for ``model`` (a served model) arrives."""
        ticket = self._next_ticket
        self._next_ticket += 1
        req = _Request(ticket, model, batch, now)
        if self.spec.faults.error_rate > 0 and self._rng.random() < self.spec.faults.error_rate:
            return self._fail(req, 500, "BACKEND", "simulated backend error")
        if self.busy < self.spec.slots and not self._queue:
            return self._try_start(req, now)
        if len(self._queue) >= self.spec.max_queue:
            return self._fail(req, 503, "REJECTED", "Exceeds maximum queue size")
        self._queue.append(req)
        self._counters[model].pending += 1
        return Queued(ticket)

    def complete(self, ticket: int, now: float) -> list[Start | Fail]:
        """An execution finished; returns what the freed slot(s) start (or fail) next."""
        req = self._executing.pop(ticket)
        self.busy -= 1
        self.memory_used_bytes -= req.memory_bytes
        c = self._counters[req.model]
        c.success += 1
        c.inference_count += req.batch
        c.exec_count += 1
        c.request_ns += round((now - req.arrived_at) * 1e9)
        c.queue_ns += round((req.started_at - req.arrived_at) * 1e9)
        c.compute_ns += round((now - req.started_at) * 1e9)
        c.last_inference_ms = round(now * 1000)
        return self._drain(now)

    def _drain(self, now: float) -> list[Start | Fail]:
        events: list[Start | Fail] = []
        while self._queue and self.busy < self.spec.slots:
            req = self._queue.popleft()
            self._counters[req.model].pending -= 1
            events.append(self._try_start(req, now))
        return events

    def reconfigure(self, spec: WorkerSpec, now: float) -> list[Start | Fail]:
        """Apply a new spec (same models) at run time; more slots may start queued work."""
        self.spec = spec
        return self._drain(now)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def statistics(self) -> WorkerStats:
        return WorkerStats(
            busy_slots=self.busy, slots=self.spec.slots, queued=len(self._queue),
            memory_used_bytes=self.memory_used_bytes,
            memory_total_bytes=self.spec.memory_total_bytes if self.spec.has_gpu else 0,
            success=sum(c.success for c in self._counters.values()),
            failure=sum(sum(c.failure.values()) for c in self._counters.values()),
            oom_total=self.oom_total)

    # -------------------------------------------------------------- observability pages

    def render_metrics(self) -> str:
        """The page Triton serves on /metrics, same names, types and label shapes."""
        spec = self.spec
        gpu = f'gpu_uuid="{self.gpu_uuid}",' if spec.has_gpu else ""
        out: list[str] = []

        def family(name: str, kind: str, help_: str, rows: list[tuple[str, float | int]]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{{{labels}}} {value}\n" if labels else f"{name} {value}\n"
                       for labels, value in rows)

        items = [(m, self._counters[m.name]) for m in spec.models]

        def per_model(attr: str, scale: int = 1) -> list[tuple[str, float | int]]:
            return [(f'{gpu}model="{m.name}",version="{m.version}"',
                     getattr(c, attr) // scale) for m, c in items]

        family("nv_inference_request_success", "counter",
               "Number of successful inference requests, all batch sizes", per_model("success"))
        family("nv_inference_request_failure", "counter",
               "Number of failed inference requests, all batch sizes",
               [(f'{gpu}model="{m.name}",reason="{reason}",version="{m.version}"', n)
                for m, c in items for reason, n in c.failure.items()])
        family("nv_inference_count", "counter",
               "Number of inferences performed (does not include cached requests)",
               per_model("inference_count"))
        family("nv_inference_exec_count", "counter",
               "Number of model executions performed (does not include cached requests)",
               per_model("exec_count"))
        family("nv_inference_request_duration_us", "counter",
               "Cumulative inference request duration in microseconds "
               "(includes cached requests)", per_model("request_ns", 1000))
        family("nv_inference_queue_duration_us", "counter",
               "Cumulative inference queuing duration in microseconds "
               "(includes cached requests)", per_model("queue_ns", 1000))
        family("nv_inference_compute_infer_duration_us", "counter",
               "Cumulative compute inference duration in microseconds "
               "(does not include cached requests)", per_model("compute_ns", 1000))
        family("nv_inference_pending_request_count", "gauge",
               "Instantaneous number of pending requests awaiting execution per-model.",
               [(f'model="{m.name}",version="{m.version}"', c.pending) for m, c in items])
        utilisation = self.busy / spec.slots if spec.slots > 0 else 0.0
        if spec.has_gpu:
            uuid = f'gpu_uuid="{self.gpu_uuid}"'
            family("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)",
                   [(uuid, utilisation)])
            family("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes",
                   [(uuid, spec.memory_total_bytes)])
            family("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes",
                   [(uuid, self.memory_used_bytes)])
            family("nv_gpu_power_usage", "gauge", "GPU power usage in watts",
                   [(uuid, 100.0 + 300.0 * utilisation)])
            family("nv_gpu_power_limit", "gauge", "GPU power management limit in watts",
                   [(uuid, 700.0)])
        family("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]",
               [("", 0.05 if spec.has_gpu else utilisation)])
        family("sim_oom_total", "counter",
               "Simulator: inferences refused because GPU memory was exhausted",
               [("", self.oom_total)])
        family("sim_busy_slots", "gauge", "Simulator: executions in progress",
               [("", self.busy)])
        return "".join(out)

    def model_stats(self, name: str | None = None) -> dict[str, Any]:
        """``GET /v2/models[/{m}]/stats`` (the statistics extension)."""
        stats: list[dict[str, Any]] = []
        for m in self.spec.models:
            if name is not None and m.name != name:
                continue
            c = self._counters[m.name]
            failed = sum(c.failure.values())
            stats.append({
                "name": m.name, "version": m.version, "last_inference": c.last_inference_ms,
                "inference_count": c.inference_count, "execution_count": c.exec_count,
                "inference_stats": {
                    "success": {"count": c.success, "ns": c.request_ns},
                    "fail": {"count": failed, "ns": 0},
                    "queue": {"count": c.success, "ns": c.queue_ns},
                    "compute_input": {"count": c.success, "ns": 0},
                    "compute_infer": {"count": c.success, "ns": c.compute_ns},
                    "compute_output": {"count": c.success, "ns": 0},
                    "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0}},
                "response_stats": {}, "batch_stats": [], "memory_usage": []})
        return {"model_stats": stats}
