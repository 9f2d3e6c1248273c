"""Concurrency limits per (worker, model), learned: the pure core.

One Triton serves many models, each with its own instances and its own queue, so how many
requests a worker can usefully take at once is a property of each model on it. The gateway
keeps one limit per (worker, model):

* **Start from what Triton says** (``learn``): the model's execution units — its instances
  (``instance_group`` counts), × ``max_batch_size`` where Triton's dynamic batcher merges
  requests — and its *static* limit, the units plus one request waiting per instance. The
  fleet reads these from the model config (``gateway.fleet.monitor``).
* **Adapt online** (``on_sample``): every completed request's round-trip time feeds a
  gradient limiter (:class:`gateway.core.adaptive.AdaptiveLimit`, as Netflix's Gradient2 and
  Envoy's adaptive concurrency): the unloaded latency is measured with at most ``units`` in
  flight (each request alone on an instance), and while the smoothed latency stays within
  ``tolerance`` × that, the limit grows by √limit per interval (if the traffic reaches it);
  beyond, it shrinks. With a model that really runs C requests at once it settles near
  ``tolerance × C + √limit`` — for a model whose config is right, about its static limit.
  A config that understates the model (one instance that really runs several requests at
  once) raises the limit. One that overstates it is trusted down to its units: the unloaded
  latency is measured with the units in flight, so the limit settles near the static one.
* **Bounds**: never below the units (every instance stays busy: the limit never starves
  the GPU to make latency look good, and the gateway's own CPU stalls, which also lengthen
  round trips, cannot talk it down further); never above ``GROWTH`` × the static limit.
  The worker as a whole takes at most the sum of its models' static limits, or the sum of
  their current limits where those grew (``worker_bound``), at most ``GROWTH`` × the sum.

Requests beyond the limit wait in the gateway's queue, where priority, deadlines, fair
share and batching apply, instead of in Triton's, where none do.

Bounded: ``MAX_MODELS_PER_WORKER`` limits per worker (models beyond have the static limit
only), :meth:`ModelLimits.forget` a worker that left. Time is an argument throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gateway.core.adaptive import AdaptiveLimit
from gateway.core.config import AdaptiveConfig
from gateway.core.types import WorkerId

GROWTH: Final = 2                    # a limit may grow to this × the static one
MAX_MODELS_PER_WORKER: Final = 64    # as many as the fleet reads configs of
DEFAULT_TOLERANCE: Final = 1.5       # latency over the unloaded latency before shrinking
DEFAULT_SMOOTHING: Final = 0.2


@dataclass(frozen=True, slots=True)
class ModelCapacity:
    """What a model's config says about one worker: requests it executes at once
    (``units``) and the static limit (units + one waiting per instance)."""

    units: int
    static: int


def worker_bound(static_slots: int, limits: Mapping[str, int]) -> int:
    """In flight a worker takes at once over all its models: its static slots, or the sum
    of its models' ``limits`` where they grew beyond, at most ``GROWTH`` × the slots."""
    return min(GROWTH * static_slots, max(static_slots, sum(limits.values())))


@dataclass(frozen=True, slots=True)
class ModelLimitStatistics:
    worker: WorkerId
    model: str
    limit: int
    units: int
    static: int
    min_rtt_s: float | None
    smoothed_rtt_s: float | None
    adaptive: bool
    probing: bool


class ModelLimits:
    """The per-(worker, model) limits of the fleet (module doc). ``adaptive`` False keeps
    every limit at its static value (``upstream.model_limits: static``)."""

    __slots__ = ("_capacity", "_cfg", "_limits", "adaptive", "update_interval_s")

    def __init__(self, *, adaptive: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                 smoothing: float = DEFAULT_SMOOTHING,
                 update_interval_s: float = 0.1) -> None:
        self.adaptive = adaptive
        self.update_interval_s = update_interval_s
        self._cfg = AdaptiveConfig(enabled=True, min_limit=1, smoothing=smoothing,
                                   tolerance=tolerance)
        self._capacity: dict[WorkerId, dict[str, ModelCapacity]] = {}
        self._limits: dict[tuple[WorkerId, str], AdaptiveLimit] = {}

    def __repr__(self) -> str:
        return (f"<ModelLimits workers={len(self._capacity)} adapting={len(self._limits)} "
                f"adaptive={self.adaptive}>")

    def learn(self, worker: WorkerId, capacity: dict[str, ModelCapacity]) -> None:
        """The worker's models as its configs say (replaces what was known; a model whose
        facts changed starts over from its new static limit)."""
        old = self._capacity.get(worker, {})
        if capacity == old:
            return
        kept = dict(list(capacity.items())[:MAX_MODELS_PER_WORKER])
        for model, facts in old.items():
            if kept.get(model) != facts:
                self._limits.pop((worker, model), None)
        if kept:
            self._capacity[worker] = kept
        else:
            self._capacity.pop(worker, None)

    def forget(self, worker: WorkerId) -> None:
        for model in self._capacity.pop(worker, {}):
            self._limits.pop((worker, model), None)

    def limit(self, worker: WorkerId, model: str) -> int | None:
        """The limit now; None when the model's capacity is not known (no per-model limit)."""
        facts = self._capacity.get(worker, {}).get(model)
        return None if facts is None else self._current(worker, model, facts)

    def limits(self, worker: WorkerId) -> dict[str, int]:
        """Every known model's limit on the worker."""
        return {model: self._current(worker, model, facts)
                for model, facts in self._capacity.get(worker, {}).items()}

    def _current(self, worker: WorkerId, model: str, facts: ModelCapacity) -> int:
        adaptive = self._limits.get((worker, model))
        return adaptive.limit if adaptive is not None else facts.static

    def on_sample(self, worker: WorkerId, model: str, now: float, rtt_s: float,
                  in_flight: int) -> None:
        """A request of ``model`` on ``worker`` completed in ``rtt_s`` (the gateway's own
        stalls already taken out); ``in_flight``: of the model there when it started, itself
        included."""
        if not self.adaptive or not rtt_s > 0.0:
            return
        facts = self._capacity.get(worker, {}).get(model)
        if facts is None:
            return
        limit = self._limits.get((worker, model))
        if limit is None:
            cfg = dataclasses.replace(self._cfg, min_limit=max(1, facts.units))
            limit = self._limits[worker, model] = AdaptiveLimit(
                cfg, max(facts.static, GROWTH * facts.static), initial_limit=facts.static,
                update_interval_s=self.update_interval_s)
        limit.on_sample(now, rtt_s, in_flight)

    def statistics(self) -> list[ModelLimitStatistics]:
        out = []
        for worker, models in self._capacity.items():
            for model, facts in models.items():
                adaptive = self._limits.get((worker, model))
                s = adaptive.statistics() if adaptive is not None else None
                out.append(ModelLimitStatistics(
                    worker=worker, model=model,
                    limit=s.limit if s is not None else facts.static,
                    units=facts.units, static=facts.static,
                    min_rtt_s=s.min_rtt_s if s is not None else None,
                    smoothed_rtt_s=s.smoothed_rtt_s if s is not None else None,
                    adaptive=s is not None, probing=s.probing if s is not None else False))
        return out
