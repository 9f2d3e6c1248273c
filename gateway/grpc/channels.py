"""One ``grpc.aio`` channel per worker, cached and bounded by the fleet.

A channel multiplexes every call to its worker over one HTTP/2 connection, so the gateway
keeps one per worker (keyed by worker id and gRPC address: a changed ``grpc_url`` gets a
new channel) and closes those whose worker has left the fleet. Calls carry raw bytes both
ways (no serializers): the gateway forwards what the client sent and relays what the worker
answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from gateway.core.types import WorkerId
from gateway.grpc.protocol import SERVICE

# Triton accepts messages up to 2 GiB; the gateway's own limit is upstream.max_body_bytes,
# enforced on the listener. Answers may be larger than requests (outputs).
MAX_RESPONSE_BYTES = 2**31 - 1


Metadata = tuple[tuple[str, str | bytes], ...]


class UpstreamStatus(Exception):
    """A worker answered with a non-OK gRPC status: relayed to the client unchanged."""

    def __init__(self, code: Any, details: str, trailers: Metadata) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError) -> UpstreamStatus:
        trailers = tuple((str(k), v) for k, v in (exc.trailing_metadata() or ()))
        return cls(exc.code(), exc.details() or "", trailers)


# Metadata that belongs to this hop, never forwarded to a worker.
_HOP_METADATA = frozenset({"user-agent", "content-type", "te", "host", "x-priority",
                           "x-request-timeout-ms"})


def metadata_of(context: Any) -> Metadata:
    return tuple((str(k).lower(), v) for k, v in (context.invocation_metadata() or ()))


def header_pairs(md: Metadata) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v if isinstance(v, bytes) else v.encode("latin-1"))
            for k, v in md]


def forwardable(md: Metadata, *, drop: frozenset[str] = frozenset()) -> Metadata:
    return tuple((k, v) for k, v in md
                 if k not in _HOP_METADATA and k not in drop and not k.startswith(("grpc-", ":")))


def metadata_value(md: Metadata, key: str) -> str | None:
    for k, v in md:
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


class WorkerChannel:
    """A channel to one worker's gRPC endpoint, with its raw-bytes callables."""

    __slots__ = ("_unary", "address", "channel", "worker")

    def __init__(self, worker: WorkerId, address: str, max_send_bytes: int) -> None:
        self.worker = worker
        self.address = address
        self.channel: Any = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            # No DNS-driven balancing inside a channel: one channel is one worker.
            ("grpc.lb_policy_name", "pick_first"),
            ("grpc.enable_retries", 0),
        ])
        self._unary: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"<WorkerChannel {self.worker} → {self.address}>"

    def is_connected(self) -> bool:
        """Connected now: a call that fails with UNAVAILABLE may have reached the worker.
        Not connected: such a failure means the request never left (safe to retry)."""
        return bool(self.channel.get_state(try_to_connect=False)
                    is grpc.ChannelConnectivity.READY)

    def connect(self) -> None:
        """Start connecting if idle (non-blocking; a no-op when connected or connecting)."""
        self.channel.get_state(try_to_connect=True)

    def unary(self, method: str) -> Callable[..., Any]:
        call = self._unary.get(method)
        if call is None:
            call = self._unary[method] = self.channel.unary_unary(method_path(method))
        return call

    def stream(self, method: str, metadata: Metadata, timeout_s: float | None) -> Any:
        return self.channel.stream_stream(method_path(method))(metadata=metadata,
                                                               timeout=timeout_s)

    async def aclose(self) -> None:
        await self.channel.close(grace=None)


class ChannelCache:
    """Channels by worker; :meth:`prune` closes those of workers no longer in the fleet."""

    __slots__ = ("_channels", "max_send_bytes")

    def __init__(self, max_send_bytes: int) -> None:
        self.max_send_bytes = max_send_bytes
        self._channels: dict[WorkerId, WorkerChannel] = {}

    def __repr__(self) -> str:
        return f"<ChannelCache {len(self._channels)} channels>"

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, worker: WorkerId, address: str) -> tuple[WorkerChannel, WorkerChannel | None]:
        """The worker's channel, and a replaced one the caller must close (address
        changed), or None."""
        ch = self._channels.get(worker)
        if ch is not None and ch.address == address:
            return ch, None
        fresh = self._channels[worker] = WorkerChannel(worker, address, self.max_send_bytes)
        return fresh, ch

    def stale(self, present: Iterable[WorkerId]) -> list[WorkerChannel]:
        """Remove and return the channels of workers not in ``present`` (to be closed)."""
        keep = set(present)
        gone = [wid for wid in self._channels if wid not in keep]
        return [self._channels.pop(wid) for wid in gone]

    def drain(self) -> list[WorkerChannel]:
        out = list(self._channels.values())
        self._channels.clear()
        return out
