"""What the gRPC stream relay and fleet-wide RPCs need from the listener that owns them
(:class:`gateway.grpc_server.GrpcGateway` implements it), so they depend on this Protocol,
not on the server module: no import cycle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway import grpc_protocol as proto
    from gateway.dispatch import Call
    from gateway.grpc_channels import Metadata, WorkerChannel
    from gateway.service import GatewayService
    from gateway.types import Priority, WorkerId
    from gateway.workers import Worker


class GrpcHost(Protocol):
    @property
    def svc(self) -> GatewayService: ...

    def channel(self, worker: Worker) -> WorkerChannel: ...

    def deadline(self, context: Any, timeout_us: int | None) -> float: ...

    def call_for(self, facts: proto.GrpcInferFacts, tenant: str | None, priority: Priority,
                 deadline: float) -> Call: ...

    async def acquire_on(self, call: Call, worker: WorkerId) -> Worker: ...

    async def send(self, worker: Worker, method: str, request: bytes, md: Metadata,
                   timeout_s: float) -> bytes: ...
