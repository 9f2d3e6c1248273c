"""gRPC calls answered for the whole fleet: statistics summed over every ready worker, the
union of their repository indexes, and model load/unload broadcast to all of them (only with
the admin token; refused with PERMISSION_DENIED when the gateway has none configured).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from gateway.core.errors import GatewayError, NoHealthyWorker, Unauthorized
from gateway.fleet.workers import Worker
from gateway.grpc import protocol as proto
from gateway.grpc.channels import (
    Metadata,
    UpstreamStatus,
    forwardable,
    metadata_of,
    metadata_value,
)

if TYPE_CHECKING:
    from gateway.grpc.host import GrpcHost


class Forbidden(GatewayError):
    status = 403
    reason = "forbidden"


class FleetRpcs:
    """Handlers of the fleet-wide RPCs of one :class:`~gateway.grpc.server.GrpcGateway`."""

    __slots__ = ("_gw",)

    def __init__(self, gw: GrpcHost) -> None:
        self._gw = gw

    def __repr__(self) -> str:
        return f"<FleetRpcs of {self._gw!r}>"

    async def fan_out(self, method: str, request: bytes,
                      md: Metadata) -> list[bytes | UpstreamStatus]:
        """``request`` to every ready worker at once; each answer or error status."""
        gw = self._gw
        workers = list(gw.svc.fleet.routable())
        if not workers:
            raise NoHealthyWorker("no ready worker")
        timeout = gw.svc.cfg.upstream.read_timeout_s

        async def one(w: Worker) -> bytes | UpstreamStatus:
            try:
                return await gw.send(w, method, request, md, timeout)
            except UpstreamStatus as exc:
                return exc

        return list(await asyncio.gather(*(one(w) for w in workers)))

    async def model_statistics(self, request: bytes, context: Any) -> bytes:
        proto.read_model_key(request, "ModelStatisticsRequest")  # malformed → 400
        results = await self.fan_out("ModelStatistics", request,
                                     forwardable(metadata_of(context)))
        answers = [r for r in results if isinstance(r, bytes)]
        if not answers:
            raise next(r for r in results if isinstance(r, UpstreamStatus))
        return proto.merge_statistics(answers)

    async def repository_index(self, request: bytes, context: Any) -> bytes:
        ready_only = proto.read_index_ready_only(request)
        results = await self.fan_out("RepositoryIndex", request,
                                     forwardable(metadata_of(context)))
        probed = {m for w in self._gw.svc.fleet.routable() for m in w.models_ready
                  if "/" not in m}
        return proto.merge_repository_index([r for r in results if isinstance(r, bytes)],
                                            sorted(probed), ready_only=ready_only)

    async def repository_load(self, request: bytes, context: Any) -> bytes:
        proto.read_repository_model(request, "RepositoryModelLoadRequest")
        return await self._repository_control("RepositoryModelLoad", request, context)

    async def repository_unload(self, request: bytes, context: Any) -> bytes:
        proto.read_repository_model(request, "RepositoryModelUnloadRequest")
        return await self._repository_control("RepositoryModelUnload", request, context)

    async def _repository_control(self, method: str, request: bytes, context: Any) -> bytes:
        svc = self._gw.svc
        md = metadata_of(context)
        token = svc.cfg.admin.token.reveal()
        if not token:
            raise Forbidden("model load/unload through the gateway is disabled: set "
                            "admin.token and send 'authorization: Bearer <token>'")
        got = (metadata_value(md, "authorization") or "").encode("latin-1")
        if not hmac.compare_digest(got, f"Bearer {token}".encode("latin-1")):
            raise Unauthorized("missing or wrong admin token")
        results = await self.fan_out(method, request,
                                     forwardable(md, drop=frozenset({"authorization"})))
        # The fleet's view of which models are ready changes now, not at the next probe.
        fleet = svc.fleet
        await asyncio.gather(*(fleet.probe_models(w) for w in list(fleet.routable())),
                             return_exceptions=True)
        for r in results:
            if isinstance(r, UpstreamStatus):
                raise r
        return next(r for r in results if isinstance(r, bytes))
