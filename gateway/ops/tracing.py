"""Tracing: the gateway's own OpenTelemetry spans, exported over OTLP/HTTP (the only module
importing OpenTelemetry; the service imports it only when ``tracing.otlp_endpoint`` is set).

One traced request (an HTTP infer/generate, a gRPC ``ModelInfer``, one request of a
``ModelStreamInfer`` stream) is one SERVER span, a child of the client's W3C
``traceparent`` when it sent one, else the root of a new trace::

    POST /v2/models/{model}/infer        model, version, tenant, priority, status, worker
    ├─ gateway.admission                 the rate limits (and a bounded wait for a token)
    ├─ gateway.queue                     routing, and the wait for a slot when all are busy
    ├─ gateway.route                     the decision: candidates, chosen worker, reason, score
    ├─ gateway.upstream  (CLIENT)        attempt 1 → worker A; failed: status and error
    └─ gateway.upstream  (CLIENT)        attempt 2 → worker B (a retry is a span of its own)

Each upstream attempt sends the worker the attempt span's own ``traceparent`` (and the
client's ``tracestate``), replacing the client's, so a Triton running with ``--trace-config
mode=opentelemetry`` continues the same trace under the attempt. With tracing off, the
client's ``traceparent``/``tracestate`` headers (HTTP) and metadata (gRPC) reach the worker
unchanged, like every other end-to-end header.

Sampling is parent-based with a ratio (``tracing.sample_ratio``): a client's sampled parent
is always followed, an unsampled one never, and a request without a parent starts a sampled
trace with that probability. An unsampled request still gets a trace id and sends a
``traceparent`` (not sampled) on, so the worker and the access log can name it — but it
never reaches the SDK: nothing would record it, and a span the SDK makes only to drop it
costs more than the rest of the request's tracing (its ids and header are made here).

Bounds: spans are batched in memory (at most ``MAX_QUEUED_SPANS``; beyond, the SDK drops
them) and exported from the SDK's own thread every ``EXPORT_INTERVAL_S``; an export that
fails is dropped after ``EXPORT_TIMEOUT_S``, never retried into a backlog.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from gateway import __version__
from gateway.core.config import TracingConfig
from gateway.core.spans import TRACEPARENT, TRACESTATE, Headers, TraceParent, parse_traceparent
from gateway.core.types import ModelKey

SERVICE_NAME = "triton-gateway"
TRACES_PATH = "/v1/traces"
EXPORT_INTERVAL_S = 1.0
EXPORT_TIMEOUT_S = 5.0
MAX_QUEUED_SPANS = 8192
MAX_EXPORT_BATCH = 512
MAX_CANDIDATES = 32          # workers named in a routing span
_TRACE_HEADERS = (TRACEPARENT.encode(), TRACESTATE.encode())

Metadata = tuple[tuple[str, str | bytes], ...]
Candidates = Callable[[ModelKey], Sequence[str]]


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``http://collector:4318``)."""
    return endpoint.rstrip("/") + TRACES_PATH


class Tracing:
    """The gateway's tracer provider, sampler and exporter; :meth:`start_http` and
    :meth:`start_grpc` open one request's :class:`Trace`."""

    def __init__(self, cfg: TracingConfig, *, exporter: SpanExporter | None = None,
                 candidates: Candidates | None = None) -> None:
        endpoint = cfg.otlp_endpoint or ""
        self.config = cfg
        # The ratio is applied here (Tracing._start) before the SDK sees an unsampled request;
        # what reaches the SDK is sampled by its parent, or a root chosen to be sampled.
        self.provider = TracerProvider(
            sampler=ParentBased(ALWAYS_ON),
            resource=Resource.create({"service.name": SERVICE_NAME,
                                      "service.version": __version__}))
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)
        self.provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=MAX_QUEUED_SPANS, max_export_batch_size=MAX_EXPORT_BATCH,
            schedule_delay_millis=EXPORT_INTERVAL_S * 1000,
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000))
        self.tracer = self.provider.get_tracer(SERVICE_NAME, __version__)
        self.rng = random.Random()
        self.candidates: Candidates = candidates or (lambda key: ())
        self.started = 0

    def __repr__(self) -> str:
        return (f"<Tracing {self.config.otlp_endpoint} ratio={self.config.sample_ratio} "
                f"started={self.started}>")

    def start_http(self, method: str, route: str,
                   headers: Iterable[tuple[bytes, bytes]]) -> Trace:
        """The span of one HTTP request, a child of its ``traceparent`` when it has one."""
        parent = state = None
        for k, v in headers:
            if k == _TRACE_HEADERS[0]:
                parent = v.decode("latin-1")
            elif k == _TRACE_HEADERS[1]:
                state = v.decode("latin-1")
        return self._start(f"{method} {route}", parent, state, "http")

    def start_grpc(self, method: str, md: Metadata) -> Trace:
        """The span of one gRPC call (or one request of a stream), from its metadata."""
        parent = state = None
        for k, v in md:
            if k == TRACEPARENT:
                parent = v.decode("latin-1") if isinstance(v, bytes) else v
            elif k == TRACESTATE:
                state = v.decode("latin-1") if isinstance(v, bytes) else v
        return self._start(method, parent, state, "grpc")

    def _start(self, name: str, traceparent: str | None, tracestate: str | None,
               transport: str) -> Trace:
        self.started += 1
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            ratio = self.config.sample_ratio
            if ratio < 1.0 and (ratio <= 0.0 or self.rng.random() >= ratio):
                return Trace(self, None, TraceParent(self._new_id(128), self._new_id(64)))
            context = None
        elif not parent.is_sampled:
            return Trace(self, None, TraceParent(parent.trace_id, self._new_id(64),
                                                 parent.flags), tracestate or "")
        else:
            remote = SpanContext(parent.trace_id, parent.span_id, is_remote=True,
                                 trace_flags=TraceFlags(parent.flags),
                                 trace_state=TraceState.from_header([tracestate])
                                 if tracestate else None)
            context = trace_api.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=context, kind=SpanKind.SERVER,
                                      attributes={"gateway.transport": transport})
        return Trace(self, span)

    def _new_id(self, bits: int) -> int:
        while True:
            value = self.rng.getrandbits(bits)
            if value:
                return value

    def shutdown(self) -> None:
        """Export what is batched (bounded by the export timeout) and stop the exporter."""
        self.provider.shutdown()


class Trace:
    """One request's spans; implements :class:`gateway.core.spans.RequestTrace` for the
    dispatcher, and the transports describe and end it."""

    __slots__ = ("_attempts", "_context", "_key", "_own", "_phase", "_recording", "_tracestate",
                 "_tracing", "attempts", "ended", "span", "worker")

    def __init__(self, tracing: Tracing, span: trace_api.Span | None,
                 unsampled: TraceParent | None = None, tracestate: str = "") -> None:
        """``span`` None: an unsampled request, whose context is ``unsampled`` (the trace,
        its own span id, the flags) and the client's ``tracestate``."""
        self._tracing = tracing
        self.span = span
        self._recording = span is not None and span.is_recording()
        self._own = unsampled
        self._tracestate = tracestate
        self._context = trace_api.set_span_in_context(span) if span is not None else None
        self._phase: trace_api.Span | None = None
        # open upstream attempts, oldest first: (worker, span); a hedge runs beside another
        self._attempts: list[tuple[str, trace_api.Span]] = []
        self._key: ModelKey | None = None
        self.attempts = 0
        self.worker: str | None = None
        self.ended = False

    def __repr__(self) -> str:
        return f"<Trace {self.trace_id} attempts={self.attempts} worker={self.worker}>"

    @property
    def trace_id(self) -> str:
        if self.span is None:
            assert self._own is not None
            return f"{self._own.trace_id:032x}"
        return f"{self.span.get_span_context().trace_id:032x}"

    @property
    def is_sampled(self) -> bool:
        return self._recording

    def describe(self, key: ModelKey, *, tenant: str | None, priority: str) -> None:
        self._key = key
        if self._recording and self.span is not None:
            self.span.set_attributes({"gateway.model": key.name,
                                      "gateway.model_version": key.version,
                                      "gateway.tenant": tenant or "",
                                      "gateway.priority": priority})

    # the dispatcher's hooks (gateway.core.spans.RequestTrace) -------------------------------
    def admitting(self) -> None:
        self._begin_phase("gateway.admission")

    def acquiring(self) -> None:
        self._begin_phase("gateway.queue")

    def routed(self, worker: str, reason: str, score: float) -> None:
        self._end_phase()
        self.worker = worker
        if not self._recording:
            return
        candidates = list(self._tracing.candidates(self._key)) if self._key else []
        span = self._tracing.tracer.start_span("gateway.route", context=self._context,
                                               attributes={
            "gateway.worker": worker, "gateway.route.reason": reason,
            "gateway.route.score": float(score),
            "gateway.route.candidates": candidates[:MAX_CANDIDATES],
            "gateway.route.candidate_count": len(candidates)})
        span.end()

    def attempt(self, worker: str, number: int, headers: Headers) -> Headers:
        traceparent, tracestate = self._begin_attempt(worker, number)
        out = [(k, v) for k, v in headers if k not in _TRACE_HEADERS]
        out.append((_TRACE_HEADERS[0], traceparent.encode("latin-1")))
        if tracestate:
            out.append((_TRACE_HEADERS[1], tracestate.encode("latin-1")))
        return out

    def attempt_metadata(self, worker: str, number: int, md: Metadata) -> Metadata:
        """:meth:`attempt` for gRPC metadata."""
        traceparent, tracestate = self._begin_attempt(worker, number)
        out: list[tuple[str, str | bytes]] = [(k, v) for k, v in md
                                              if k not in (TRACEPARENT, TRACESTATE)]
        out.append((TRACEPARENT, traceparent))
        if tracestate:
            out.append((TRACESTATE, tracestate))
        return tuple(out)

    def attempt_failed(self, status: int | None, error: str, *,
                       worker: str | None = None) -> None:
        """An attempt failed: ``worker``'s when given (a hedge and its first attempt may
        both be open), else the latest."""
        open_attempts = self._attempts
        if not open_attempts:
            return
        index = len(open_attempts) - 1
        if worker is not None:
            index = next((i for i in range(index, -1, -1) if open_attempts[i][0] == worker),
                         index)
        _, span = open_attempts.pop(index)
        if status is not None:
            span.set_attribute("gateway.status", status)
        span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    # the transport's --------------------------------------------------------------------
    def end(self, status: int, *, worker: str | None = None, reason: str | None = None,
            grpc_code: str | None = None, batched: bool = False) -> str:
        """The answer the client got: ``status`` (the gateway's HTTP-style status; for gRPC
        also its ``grpc_code``), the worker that answered, the gateway's refusal reason.
        Returns the trace id (for the access log); a second call changes nothing."""
        if self.ended:
            return self.trace_id
        self.ended = True
        span = self.span
        if span is None:
            return self.trace_id
        self._end_phase()
        answered = worker or self.worker
        # The attempt that answered takes the request's status; another still open (a
        # hedge that lost, or the attempt its hedge beat) was cancelled, nobody's failure.
        winner = next((i for i in range(len(self._attempts) - 1, -1, -1)
                       if self._attempts[i][0] == answered), len(self._attempts) - 1)
        for i, (_, attempt) in enumerate(self._attempts):
            if i == winner:
                attempt.set_attribute("gateway.status", status)
                if status >= 500:
                    attempt.set_status(Status(StatusCode.ERROR, reason or str(status)))
            else:
                attempt.set_attribute("gateway.cancelled", True)
            attempt.end()
        self._attempts.clear()
        if self._recording:
            attrs: dict[str, Any] = {"gateway.status": status,
                                     "gateway.attempts": self.attempts}
            if grpc_code is None:
                attrs["http.response.status_code"] = status
            else:
                attrs["rpc.grpc.status_code"] = grpc_code
            if worker or self.worker:
                attrs["gateway.worker"] = worker or self.worker
            if reason:
                attrs["gateway.reason"] = reason
            if batched:
                attrs["gateway.batched"] = True
            span.set_attributes(attrs)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, reason or str(status)))
        span.end()
        return self.trace_id

    # ------------------------------------------------------------------------------------
    def _begin_phase(self, name: str) -> None:
        if not self._recording:
            return
        self._end_phase()
        self._phase = self._tracing.tracer.start_span(name, context=self._context)

    def _end_phase(self) -> None:
        phase = self._phase
        if phase is not None:
            self._phase = None
            phase.end()

    def _begin_attempt(self, worker: str, number: int) -> tuple[str, str]:
        """Open the attempt's CLIENT span; its ``(traceparent, tracestate)``. Unsampled: no
        span, the request span's own context."""
        self.attempts = number
        self.worker = worker
        if self._own is not None:
            return self._own.header(), self._tracestate
        if not self._recording:
            assert self.span is not None
            return _w3c(self.span.get_span_context())
        self._end_phase()
        span = self._tracing.tracer.start_span(
            "gateway.upstream", context=self._context, kind=SpanKind.CLIENT,
            attributes={"gateway.worker": worker, "gateway.attempt": number})
        self._attempts.append((worker, span))
        return _w3c(span.get_span_context())


def _w3c(ctx: trace_api.SpanContext) -> tuple[str, str]:
    """W3C ``(traceparent, tracestate)`` of a span context (version 00)."""
    return (f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}",
            ctx.trace_state.to_header() if ctx.trace_state else "")
