"""What the gateway's pages and metrics read: a small, read-only view of the running gateway.

``telemetry`` and ``admin`` depend on this Protocol, not on the service that implements it,
so the composition root (``gateway.app.service``) can build them without an import cycle, and a
test can hand them any object of this shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.core.breaker import BreakerBoard
    from gateway.core.concurrency import ModelLimitStatistics
    from gateway.core.config import GatewayConfig
    from gateway.core.fairshare import FairShareStatistics
    from gateway.fleet.workers import Worker


class GatewayState(Protocol):
    @property
    def cfg(self) -> GatewayConfig: ...

    @property
    def generation(self) -> int: ...

    @property
    def started_at(self) -> float: ...

    @property
    def breakers(self) -> BreakerBoard: ...

    @property
    def queue_length(self) -> int: ...

    def clock(self) -> float: ...

    def workers(self) -> Iterable[Worker]: ...

    def model_known(self, name: str) -> bool: ...

    def saturation_seconds(self) -> float: ...

    def dispatch_statistics(self) -> dict[str, float]: ...

    def fair_share(self) -> FairShareStatistics: ...

    def limits_description(self) -> list[dict[str, object]]: ...

    def loop_lag_s(self) -> float: ...

    def loop_lag_worst_s(self) -> float: ...

    def model_limits(self) -> list[ModelLimitStatistics]: ...

    def stall_state(self, worker: str) -> str: ...

    def cluster(self) -> dict[str, object] | None: ...
