"""What the gRPC stream relay and fleet-wide RPCs need from the listener that owns them
(:class:`gateway.grpc.server.GrpcGateway` implements it), so they depend on this Protocol,
not on the server module: no import cycle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.app.service import GatewayService
    from gateway.core.types import Priority, WorkerId
    from gateway.engine.dispatch import Call
    from gateway.fleet.workers import Worker
    from gateway.grpc import protocol as proto
    from gateway.grpc.channels import Metadata, WorkerChannel


class GrpcHost(Protocol):
    @property
    def svc(self) -> GatewayService: ...

    def channel(self, worker: Worker) -> WorkerChannel: ...

    def deadline(self, context: Any, timeout_us: int | None) -> float: ...

    async def call_for(self, facts: proto.GrpcInferFacts, tenant: str | None,
                       priority: Priority, deadline: float) -> Call: ...

    async def acquire_on(self, call: Call, worker: WorkerId) -> Worker: ...

    async def send(self, worker: Worker, method: str, request: bytes, md: Metadata,
                   timeout_s: float) -> bytes: ...
