"""A small OTLP/HTTP trace receiver for tests: what a collector's ``/v1/traces`` would get.

It decodes OTLP protobuf (what the gateway's exporter sends) with ``opentelemetry-proto``,
and OTLP JSON (what Triton's C++ exporter sends), into :class:`ReceivedSpan` records.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPAN_KIND_CLIENT = 3
SPAN_KIND_SERVER = 2
STATUS_ERROR = 2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str       # 32 hex digits
    span_id: str        # 16 hex digits
    parent_span_id: str  # "" for a root
    kind: int
    status_code: int
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _json_value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_json_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def decode_protobuf(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for rs in request.resource_spans:
        service = next((a.value.string_value for a in rs.resource.attributes
                        if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                    int(s.kind), int(s.status.code),
                    {a.key: _value(a.value) for a in s.attributes}))
    return out


def decode_json(body: bytes) -> list[ReceivedSpan]:
    """OTLP JSON: ids are hex strings, enums are numbers."""
    out = []
    for rs in json.loads(body).get("resourceSpans", []):
        service = next((_json_value(a["value"]) for a in rs.get("resource", {}).get(
            "attributes", []) if a["key"] == "service.name"), "")
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                out.append(ReceivedSpan(
                    service, s["name"], s["traceId"].lower(), s["spanId"].lower(),
                    s.get("parentSpanId", "").lower(), int(s.get("kind", 0)),
                    int(s.get("status", {}).get("code", 0)),
                    {a["key"]: _json_value(a["value"]) for a in s.get("attributes", [])}))
    return out


class OtlpReceiver:
    """``POST /v1/traces`` on loopback, in a thread; :attr:`spans` grows as exports come."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                content_type = self.headers.get("content-type") or ""
                spans = decode_json(body) if "json" in content_type else decode_protobuf(body)
                with receiver._lock:
                    receiver.paths.append(self.path)
                    receiver.spans.extend(spans)
                if "json" in content_type:
                    out, reply_type = b"{}", "application/json"
                else:
                    out = ExportTraceServiceResponse().SerializeToString()
                    reply_type = "application/x-protobuf"
                self.send_response(200)
                self.send_header("content-type", reply_type)
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0,
                 what: str = "spans") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        with self._lock:
            seen = [(s.service, s.name, s.trace_id) for s in self.spans[-30:]]
        raise AssertionError(f"timed out waiting for {what}; last spans: {seen}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
