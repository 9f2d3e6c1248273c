"""What the dispatcher tells a request's trace: the seam between the engine and tracing.

Tracing lives in the operations layer (``gateway.ops.tracing``, the one module importing
OpenTelemetry); the engine may not import it. So a traced request carries an object with
this shape (``Call.trace``), and the dispatcher reports the moments only it sees:

* :meth:`RequestTrace.admitting` — the rate limits are being asked (the admission span
  begins);
* :meth:`RequestTrace.acquiring` — a worker is being sought: routing, and waiting in the
  queue when every worker is busy (the admission span ends, the queue span begins);
* :meth:`RequestTrace.routed` — the routing decision: the worker, the router's reason and
  score (the queue span ends);
* :meth:`RequestTrace.attempt` — one upstream attempt begins (each retry is one more); it
  returns the request headers to send, carrying the attempt's own ``traceparent`` so that
  the worker's spans nest under it;
* :meth:`RequestTrace.attempt_failed` — an attempt failed (a retry may follow); name its
  ``worker`` where a hedge may be open beside it.

The request's end (:meth:`RequestTrace.end`: status, worker) is told by the transport that
answered the client. With tracing off ``Call.trace`` is None and each hook costs the
dispatcher one ``is None`` test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Headers = list[tuple[bytes, bytes]]
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SAMPLED = 0x01
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C ``traceparent``: the trace, the parent span, the flags (bit 0: sampled)."""

    trace_id: int
    span_id: int
    flags: int = 0

    @property
    def is_sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and set(text) <= _HEX


def parse_traceparent(value: str) -> TraceParent | None:
    """W3C Trace Context: ``version-trace_id-parent_id-flags``, lowercase hex; None when it
    is not one (the request then starts a trace of its own, as the spec says). Version
    ``ff`` is invalid; version 00 has exactly four fields, a later version may have more."""
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[:4]
    if not _is_hex(version, 2) or version == "ff" or (version == "00" and len(parts) != 4):
        return None
    if not (_is_hex(trace, 32) and _is_hex(span, 16) and _is_hex(flags, 2)):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


class RequestTrace(Protocol):
    def admitting(self) -> None: ...

    def acquiring(self) -> None: ...

    def routed(self, worker: str, reason: str, score: float) -> None: ...

    def attempt(self, worker: str, number: int, headers: Headers) -> Headers: ...

    def attempt_failed(self, status: int | None, error: str, *,
                       worker: str | None = None) -> None: ...

    def end(self, status: int, *, worker: str | None = None, reason: str | None = None,
            grpc_code: str | None = None, batched: bool = False) -> str: ...
