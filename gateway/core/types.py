"""The vocabulary shared by the decision core: immutable snapshots in, decisions out.

Nothing here does I/O or reads a clock; times are monotonic seconds passed in by the shell.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

WorkerId = str  # "host:port" of the worker's Triton HTTP endpoint


class Priority(enum.IntEnum):
    """Lower value = more important. Sheddable traffic is refused first."""

    CRITICAL = 0
    STANDARD = 1
    SHEDDABLE = 2

    @classmethod
    def parse(cls, text: str | None, default: Priority) -> Priority:
        if not text:
            return default
        try:
            return cls[text.strip().upper()]
        except KeyError:
            return default


@dataclass(frozen=True, slots=True)
class ModelKey:
    name: str
    version: str = ""  # "" = the server's default version policy

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else self.name


@dataclass(frozen=True, slots=True)
class GpuSignal:
    uuid: str
    total_bytes: float
    used_bytes: float
    utilisation: float  # 0..1

    @property
    def free_bytes(self) -> float:
        return max(0.0, self.total_bytes - self.used_bytes)


@dataclass(frozen=True, slots=True)
class ModelSignal:
    """Per-model signals from one scrape of a worker's Triton metrics."""

    pending: float = 0.0            # nv_inference_pending_request_count
    queue_time_s: float = 0.0        # mean queue time per request over the last interval
    request_time_s: float = 0.0      # mean request duration over the last interval
    success_per_s: float = 0.0
    failure_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerSignals:
    """What the last successful scrape of a worker said, and when."""

    scraped_at: float
    gpus: tuple[GpuSignal, ...] = ()
    models: dict[str, ModelSignal] = field(default_factory=dict)
    # The gateway's own in-flight count on the worker when the scrape was taken (None:
    # unknown). With it the router estimates free memory *now* (routing.live_free_bytes).
    in_flight_at_scrape: int | None = None
    # Free GPU memory at the last scrape taken while the gateway had nothing in flight on
    # the worker and it queued nothing (None: not seen yet): an upper bound the router
    # subtracts every in-flight request from, robust to in-flight counted at a bad moment.
    idle_free_bytes: float | None = None

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def free_memory_bytes(self) -> float:
        return max((g.free_bytes for g in self.gpus), default=0.0)

    @property
    def total_memory_bytes(self) -> float:
        return max((g.total_bytes for g in self.gpus), default=0.0)

    @property
    def gpu_utilisation(self) -> float:
        if not self.gpus:
            return 0.0
        return sum(g.utilisation for g in self.gpus) / len(self.gpus)

    def pending(self, model: str | None = None) -> float:
        if model is None:
            return sum(m.pending for m in self.models.values())
        sig = self.models.get(model)
        return sig.pending if sig else 0.0


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """Everything the router needs to know about one worker at decision time."""

    id: WorkerId
    pool_priority: int
    ready: bool
    models_ready: frozenset[str]  # "name" and "name/version" entries
    slots: int
    in_flight: int                 # the gateway's own live count (all models)
    in_flight_model: int           # ... for the model being routed
    signals: WorkerSignals | None  # None: never scraped, or stale
    breaker_allows: bool = True
    traffic_share: float = 1.0     # slow start: 0..1
    stalled: bool = False          # silent while others answer (gateway.core.stall)
    latency_ewma_s: float = 0.0
    capacity_units: int = 0        # requests it executes at once, learned (0: use slots)
    # in-flight limit per model (gateway.core.concurrency); a model not listed has none
    model_limits: Mapping[str, int] = field(default_factory=dict)

    def has_model(self, key: ModelKey) -> bool:
        """``models_ready`` holds ``name``, ``name/<version>`` for versions a worker listed,
        and ``name/?`` when its versions are unknown (probed by name only: any version may
        exist, and Triton itself answers for a missing one)."""
        if not key.version:
            return key.name in self.models_ready
        return f"{key.name}/{key.version}" in self.models_ready or (
            f"{key.name}/?" in self.models_ready
        )


@dataclass(frozen=True, slots=True)
class Route:
    worker: WorkerId
    reason: str
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class NoRoute:
    """No worker could take the request now. ``saturated`` = some exist but are full."""

    reason: str
    saturated: bool = False
    # saturated only by choice: a worker is free, but waiting for a faster one is expected
    # to be quicker (routing.Router._defer); the shell may send it there after all
    deferred: bool = False


Decision = Route | NoRoute
