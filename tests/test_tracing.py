"""Tracing: one trace from the client through the gateway into Triton's compute span.

A real OTLP receiver (``tests.otlp_receiver``: a loopback HTTP server decoding the protobuf
with ``opentelemetry-proto``) gets the gateway's spans and those of a PyTriton worker run
with ``--trace-config mode=opentelemetry``; the worker's ``InferRequest`` span must be a
child of the gateway's upstream span — the ``traceparent`` the gateway sent — over HTTP and
gRPC. Plus the sampling rules on the tracer itself (an in-memory exporter), retries as spans
of their own, and the trace id in the access log.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.core.config import TracingConfig
from gateway.core.spans import TraceParent, parse_traceparent
from gateway.core.types import ModelKey
from gateway.ops.tracing import Tracing, traces_url
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import free_port
from gateway.tools.procs import http_get
from tests.otlp_receiver import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
)
from tests.test_grpc import GrpcGatewayProcess

MODEL = "echo"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
GATEWAY = "triton-gateway"


def traceparent(trace_id: str, span_id: str = CLIENT_SPAN, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def new_trace_id(n: int) -> str:
    return f"{n:032x}"


# -- the tracer alone: sampling and propagation ----------------------------------------------
def tracer(ratio: float) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    cfg = TracingConfig(otlp_endpoint="http://127.0.0.1:4318", sample_ratio=ratio)
    return Tracing(cfg, exporter=exporter, candidates=lambda key: ["w1", "w2"]), exporter


def finished(tracing: Tracing, exporter: InMemorySpanExporter) -> list[Any]:
    tracing.provider.force_flush()
    return list(exporter.get_finished_spans())


def sent_traceparent(headers: list[tuple[bytes, bytes]]) -> str:
    values = [v.decode() for k, v in headers if k == b"traceparent"]
    assert len(values) == 1, headers
    return values[0]


@pytest.mark.parametrize(("value", "parsed"), [
    (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", TraceParent(int(CLIENT_TRACE, 16),
                                                        int(CLIENT_SPAN, 16), 1)),
    (f" 00-{CLIENT_TRACE}-{CLIENT_SPAN}-00 ", TraceParent(int(CLIENT_TRACE, 16),
                                                          int(CLIENT_SPAN, 16), 0)),
    (f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-later", TraceParent(int(CLIENT_TRACE, 16),
                                                              int(CLIENT_SPAN, 16), 1)),
    (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra", None),   # version 00 has four fields
    (f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", None),          # version ff is invalid
    (f"00-{'0' * 32}-{CLIENT_SPAN}-01", None),              # all-zero ids are invalid
    (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),
    (f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01", None),  # lowercase hex only
    (f"00-{CLIENT_TRACE[:-1]}-{CLIENT_SPAN}-01", None),
    ("", None), ("garbage", None),
])
def test_traceparent_is_parsed_by_the_w3c_rules(value: str, parsed: TraceParent | None) -> None:
    assert parse_traceparent(value) == parsed
    if parsed is not None:
        assert parse_traceparent(parsed.header()) == parsed


def test_traces_url_is_the_endpoints_v1_traces() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"


@pytest.mark.parametrize(("ratio", "client", "recorded"), [
    (0.0, traceparent(CLIENT_TRACE, sampled=True), True),    # a sampled parent is honoured
    (1.0, traceparent(CLIENT_TRACE, sampled=False), False),  # an unsampled one too
    (1.0, None, True),
    (0.0, None, False),
])
def test_sampling_is_parent_based_with_a_ratio(ratio: float, client: str | None,
                                               recorded: bool) -> None:
    tracing, exporter = tracer(ratio)
    headers = [(b"content-type", b"application/json")]
    if client is not None:
        headers += [(b"traceparent", client.encode()), (b"tracestate", b"vendor=x")]
    trace = tracing.start_http("POST", "/v2/models/{model}/infer", headers)
    trace.describe(ModelKey(MODEL), tenant="acme", priority="standard")
    trace.admitting()
    trace.acquiring()
    trace.routed("w1", "p2c", 0.5)
    out = trace.attempt("w1", 1, list(headers))
    assert trace.end(200, worker="w1") == trace.trace_id
    # the worker always gets a traceparent: the client's trace, the gateway's attempt span
    version, trace_id, span_id, flags = sent_traceparent(out).split("-")
    assert version == "00" and trace_id == trace.trace_id and len(span_id) == 16
    assert bool(int(flags, 16) & 1) is recorded  # the sampled flag (0x02: a random id)
    if client is not None:
        assert trace_id == CLIENT_TRACE and span_id != CLIENT_SPAN
        assert (b"tracestate", b"vendor=x") in out
    spans = finished(tracing, exporter)
    if not recorded:
        assert spans == []
        return
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"POST /v2/models/{model}/infer", "gateway.admission",
                            "gateway.queue", "gateway.route", "gateway.upstream"}
    request = by_name["POST /v2/models/{model}/infer"]
    assert request.attributes["gateway.model"] == MODEL
    assert request.attributes["gateway.tenant"] == "acme"
    assert request.attributes["gateway.worker"] == "w1"
    assert request.attributes["http.response.status_code"] == 200
    assert by_name["gateway.route"].attributes["gateway.route.candidates"] == ("w1", "w2")
    assert format(by_name["gateway.upstream"].context.span_id, "016x") == span_id
    for child in ("gateway.admission", "gateway.queue", "gateway.route", "gateway.upstream"):
        assert by_name[child].parent.span_id == request.context.span_id
    if client is not None:
        assert format(request.parent.span_id, "016x") == CLIENT_SPAN


def test_each_attempt_is_a_span_and_a_refusal_ends_the_trace() -> None:
    tracing, exporter = tracer(1.0)
    trace = tracing.start_grpc("inference.GRPCInferenceService/ModelInfer", ())
    md: tuple[tuple[str, str | bytes], ...] = (("x-api-key", "k"),)
    first = trace.attempt_metadata("w1", 1, md)
    trace.attempt_failed(503, "UNAVAILABLE: connection refused")
    second = trace.attempt_metadata("w2", 2, md)
    assert dict(first)["traceparent"] != dict(second)["traceparent"]
    assert ("x-api-key", "k") in second
    trace.end(200, grpc_code="OK")
    trace.end(500)  # a second end changes nothing
    upstream = [s for s in finished(tracing, exporter) if s.name == "gateway.upstream"]
    assert [(s.attributes["gateway.worker"], s.status.is_ok) for s in upstream] == \
        [("w1", False), ("w2", True)]
    tracing.shutdown()

    # a hedge beside the first attempt: the one that answered takes the status, the other
    # was cancelled (nobody's failure); a failed hedge is named by its worker
    tracing, exporter = tracer(1.0)
    trace = tracing.start_http("POST", "/v2/models/{model}/infer", [])
    trace.attempt("w1", 1, [])
    trace.attempt("w2", 2, [])
    trace.attempt("w3", 3, [])
    trace.attempt_failed(None, "hedge: connection refused", worker="w2")
    trace.end(200, worker="w3")
    by_worker = {s.attributes["gateway.worker"]: s for s in finished(tracing, exporter)
                 if s.name == "gateway.upstream"}
    assert not by_worker["w2"].status.is_ok
    assert by_worker["w3"].attributes["gateway.status"] == 200
    assert by_worker["w1"].attributes["gateway.cancelled"] is True
    assert by_worker["w1"].status.is_ok
    tracing.shutdown()

    tracing, exporter = tracer(1.0)
    refused = tracing.start_http("POST", "/v2/models/{model}/infer", [])
    refused.admitting()
    refused.end(429, reason="rate_limited")
    spans = {s.name: s for s in finished(tracing, exporter)}
    assert spans["POST /v2/models/{model}/infer"].attributes["gateway.reason"] == "rate_limited"
    assert "gateway.admission" in spans
    tracing.shutdown()


# -- end to end: a PyTriton worker exporting its own spans -------------------------------------
def serve_traced_worker(http_port: int, grpc_port: int, metrics_port: int,
                        otlp_url: str) -> None:
    """Run in a child process: PyTriton with one model, ``echo``, and Triton's
    OpenTelemetry tracing on (every request, exported to ``otlp_url``)."""
    from gateway.tools.triton_worker import env_with_libpython_first

    os.environ.update(env_with_libpython_first(os.environ))
    home = tempfile.mkdtemp(prefix="triton-traced-")
    os.environ["PYTRITON_HOME"] = home
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    def echo(requests: list[Any]) -> list[dict[str, np.ndarray[Any, Any]]]:
        return [{"OUT": r.data["IN"]} for r in requests]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = TritonConfig(http_address="127.0.0.1", http_port=http_port,
                          grpc_address="127.0.0.1", grpc_port=grpc_port,
                          metrics_address="127.0.0.1", metrics_port=metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=5,
                          trace_config=["mode=opentelemetry", "rate=1", "level=TIMESTAMPS",
                                        f"opentelemetry,url={otlp_url}/v1/traces",
                                        "opentelemetry,resource=service.name=triton"])
    triton = Triton(config=config, workspace=Path(home) / "workspace",
                    security_config=TritonSecurityConfig(restricted_endpoints=[]))
    try:
        triton.bind(model_name=MODEL, infer_func=echo,
                    inputs=[Tensor(name="IN", dtype=np.float32, shape=(-1,))],
                    outputs=[Tensor(name="OUT", dtype=np.float32, shape=(-1,))],
                    config=ModelConfig(batching=False), strict=False)
        triton.run()
        while not stop.wait(0.5) and os.getppid() != 1:
            pass
    finally:
        triton.stop()


class TracedWorker:
    def __init__(self, otlp_url: str, log_path: Path) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_tracing import serve_traced_worker; "
             f"serve_traced_worker({self.http}, {self.grpc}, {self.metrics}, {otlp_url!r})"],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parents[1])
        self.log_path = log_path
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"traced worker exited: {log_path.read_text()[-3000:]}")
            try:
                if http_get(f"http://127.0.0.1:{self.http}/v2/models/{MODEL}/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"traced worker not ready: {log_path.read_text()[-3000:]}")

    def entry(self) -> dict[str, str]:
        return {"url": f"http://127.0.0.1:{self.http}",
                "metrics_url": f"http://127.0.0.1:{self.metrics}/metrics",
                "grpc_url": f"127.0.0.1:{self.grpc}"}

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def worker(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TracedWorker]:
    w = TracedWorker(receiver.url, tmp_path_factory.mktemp("traced") / "worker.log")
    yield w
    w.stop()


def start_gateway(workers: list[dict[str, str]], workdir: Path, receiver: OtlpReceiver,
                  ratio: float, **extra: Any) -> GrpcGatewayProcess:
    access = workdir / "access.jsonl"
    config = {"workers": workers,
              "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
              "tracing": {"otlp_endpoint": receiver.url, "sample_ratio": ratio},
              "access_log": {"enabled": True, "path": str(access)}, **extra}
    gw = GrpcGatewayProcess(config, workdir)
    gw.start()
    gw.wait_workers_ready(len(workers), timeout_s=30)
    return gw


@pytest.fixture(scope="module")
def gateway(worker: TracedWorker, receiver: OtlpReceiver,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcGatewayProcess]:
    """The minimal config (no models named) with tracing on, sampling no new trace: only a
    client's sampled parent is recorded."""
    gw = start_gateway([worker.entry()], tmp_path_factory.mktemp("gw"), receiver, 0.0)
    yield gw
    gw.stop()


def http_infer(gw: GrpcGatewayProcess, headers: dict[str, str]) -> httpx.Response:
    body = {"inputs": [{"name": "IN", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
    r = httpx.post(f"{gw.url}/v2/models/{MODEL}/infer", json=body, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r


def grpc_infer(gw: GrpcGatewayProcess, headers: dict[str, str]) -> None:
    with grpcclient.InferenceServerClient(gw.grpc_target) as client:
        i = grpcclient.InferInput("IN", [2], "FP32")
        i.set_data_from_numpy(np.array([1, 2], dtype=np.float32))
        client.infer(MODEL, [i], headers=headers)


def named(spans: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name == name]


def wait_for_span(receiver: OtlpReceiver, trace_id: str, service: str, name: str) -> None:
    receiver.wait_for(lambda: bool(named(receiver.of_trace(trace_id), service, name)),
                      what=f"{service}'s span {name} of {trace_id}")


def wait_for_triton(receiver: OtlpReceiver, trace_id: str) -> None:
    wait_for_span(receiver, trace_id, "triton", "InferRequest")


class TritonLeftTheTrace(Exception):
    """The gateway's spans of a request arrived, Triton's did not join them (see
    :func:`until_triton_joins`)."""


# Triton (via PyTriton) now and then starts a trace of its own for a gRPC request that came
# with a ``traceparent``: its spans then carry a random trace id. Seen at the same rate with
# the gateway of the revision before the HTTP front end (in about 1 run of 5 of these tests),
# so not the gateway's doing. What these tests check is the gateway's side, so a request
# whose gateway spans are all there but whose Triton spans went into another trace is sent
# again with a new trace id, up to TRITON_ATTEMPTS times; any other failure fails at once.
TRITON_ATTEMPTS = 3
TRITON_JOIN_S = 15.0


def triton_joined(receiver: OtlpReceiver, trace_id: str, count: int = 1) -> None:
    """Wait for ``count`` of Triton's InferRequest spans in ``trace_id``, else raise
    :class:`TritonLeftTheTrace`."""
    deadline = time.monotonic() + TRITON_JOIN_S
    while time.monotonic() < deadline:
        if len(named(receiver.of_trace(trace_id), "triton", "InferRequest")) >= count:
            return
        time.sleep(0.1)
    raise TritonLeftTheTrace(trace_id)


def until_triton_joins(attempt: Callable[[int], None]) -> None:
    for n in range(TRITON_ATTEMPTS):
        try:
            attempt(n)
            return
        except TritonLeftTheTrace:
            if n == TRITON_ATTEMPTS - 1:
                raise


def assert_one_trace_into_triton(receiver: OtlpReceiver, trace_id: str, request_name: str,
                                 parent: str | None) -> ReceivedSpan:
    """The gateway's request span (a child of ``parent``), its children, and Triton's
    request and compute spans under the gateway's upstream span — all in one trace."""
    def complete() -> bool:
        spans = receiver.of_trace(trace_id)
        return bool(named(spans, GATEWAY, request_name) and named(spans, "triton", "compute")
                    and named(spans, "triton", "InferRequest"))

    receiver.wait_for(lambda: bool(named(receiver.of_trace(trace_id), GATEWAY, request_name)),
                      what=f"the gateway's spans of {trace_id}")
    triton_joined(receiver, trace_id)
    receiver.wait_for(complete, what=f"the gateway's and Triton's spans of {trace_id}")
    spans = receiver.of_trace(trace_id)
    (request,) = named(spans, GATEWAY, request_name)
    assert request.kind == SPAN_KIND_SERVER
    assert request.parent_span_id == (parent or "")
    assert request.attributes["gateway.model"] == MODEL
    assert request.attributes["gateway.status"] == 200
    assert request.attributes["gateway.worker"]
    children = {s.name: s for s in spans
                if s.service == GATEWAY and s.parent_span_id == request.span_id}
    assert {"gateway.admission", "gateway.queue", "gateway.route",
            "gateway.upstream"} <= set(children), sorted(children)
    route = children["gateway.route"]
    assert route.attributes["gateway.worker"] == request.attributes["gateway.worker"]
    assert route.attributes["gateway.route.reason"]
    assert route.attributes["gateway.route.candidate_count"] == 1
    upstream = children["gateway.upstream"]
    assert upstream.kind == SPAN_KIND_CLIENT
    (infer,) = named(spans, "triton", "InferRequest")
    assert infer.parent_span_id == upstream.span_id  # the traceparent the gateway sent
    (compute,) = named(spans, "triton", "compute")
    assert compute.trace_id == trace_id
    return request


def access_line(gw: GrpcGatewayProcess, trace_id: str) -> dict[str, Any]:
    path = Path(gw.config["access_log"]["path"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists():
            for raw in path.read_text().splitlines():
                line = json.loads(raw)
                if line.get("trace_id") == trace_id:
                    return dict(line)
        time.sleep(0.2)  # flushed once a second
    raise AssertionError(f"no access-log line with trace_id {trace_id}")


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_http_one_trace_from_the_client_into_tritons_compute_span(
        gateway: GrpcGatewayProcess, receiver: OtlpReceiver) -> None:
    trace_id = new_trace_id(0xA1)
    r = http_infer(gateway, {"traceparent": traceparent(trace_id), "tracestate": "k=v",
                             "x-request-id": "traced-http-1"})
    assert r.json()["outputs"][0]["data"] == [1.0, 2.0]
    request = assert_one_trace_into_triton(receiver, trace_id, "POST /v2/models/{model}/infer",
                                           CLIENT_SPAN)
    assert request.attributes["http.response.status_code"] == 200
    line = access_line(gateway, trace_id)
    assert line["rid"] == "traced-http-1" and line["status"] == 200


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_grpc_one_trace_from_the_client_into_tritons_compute_span(
        gateway: GrpcGatewayProcess, receiver: OtlpReceiver) -> None:
    def attempt(n: int) -> None:
        trace_id = new_trace_id(0xB2 + 0x1000 * n)
        grpc_infer(gateway, {"traceparent": traceparent(trace_id)})
        request = assert_one_trace_into_triton(
            receiver, trace_id, "inference.GRPCInferenceService/ModelInfer", CLIENT_SPAN)
        assert request.attributes["rpc.grpc.status_code"] == "OK"
        assert access_line(gateway, trace_id)["status"] == 200

    until_triton_joins(attempt)


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_a_request_without_a_parent_gets_a_new_traceparent(
        gateway: GrpcGatewayProcess, receiver: OtlpReceiver) -> None:
    """Sampling ratio 0: the gateway records nothing of its own, but the worker still gets
    a fresh ``traceparent`` — Triton's spans carry the trace id the access log names."""
    http_infer(gateway, {"x-request-id": "unsampled-1"})
    path = Path(gateway.config["access_log"]["path"])
    found: list[str] = []

    def logged() -> bool:
        found[:] = [json.loads(raw).get("trace_id") or "" for raw in path.read_text()
                    .splitlines() if json.loads(raw).get("rid") == "unsampled-1"]
        return bool(found and found[0])

    receiver.wait_for(logged, timeout_s=5, what="the access-log line")
    trace_id = found[0]
    wait_for_triton(receiver, trace_id)
    spans = receiver.of_trace(trace_id)
    assert not [s for s in spans if s.service == GATEWAY]  # not sampled: nothing recorded
    (infer,) = named(spans, "triton", "InferRequest")
    assert infer.parent_span_id and infer.parent_span_id != CLIENT_SPAN


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_a_retry_is_a_span_of_its_own(worker: TracedWorker, receiver: OtlpReceiver,
                                      tmp_path: Path) -> None:
    """A second worker whose HTTP side is healthy (the simulator) but whose gRPC port
    refuses: a ``ModelInfer`` routed there never leaves and is retried on the traced worker
    — two upstream spans, the first failed, Triton's span under the second."""
    with SimFleetThread([WorkerSpec(base_ms=1.0, models=(SimModel(name=MODEL),))]) as sim:
        broken = {"url": f"http://{sim.urls[0]}", "metrics_url": f"http://{sim.urls[0]}/metrics",
                  "grpc_url": f"127.0.0.1:{free_port()}"}
        gw = start_gateway([broken, worker.entry()], tmp_path, receiver, 1.0,
                           admission={"breaker": {"enabled": False},
                                      "retry": {"max_attempts": 2, "budget_min": 100}},
                           routing={"policy": "round_robin"},
                           # named, so that every worker is asked for it (the simulator's
                           # index lists it, the PyTriton worker's lists nothing)
                           models={MODEL: {}})
        try:
            gw.wait_for(lambda: all(MODEL in w["models"] for w in gw.status()["workers"]),
                        what="both workers serving the model")
            results: queue.Queue[str] = queue.Queue()
            for n in range(8):
                trace_id = new_trace_id(0xC000 + n)
                grpc_infer(gw, {"traceparent": traceparent(trace_id)})
                results.put(trace_id)
            gw_log = gw.log()
        finally:
            gw.stop()
    retried, joined = [], []
    while not results.empty():
        trace_id = results.get()
        wait_for_span(receiver, trace_id, GATEWAY, "inference.GRPCInferenceService/ModelInfer")
        upstream = named(receiver.of_trace(trace_id), GATEWAY, "gateway.upstream")
        if len(upstream) == 2:
            retried.append(trace_id)
            first, second = sorted(upstream, key=lambda s: s.attributes["gateway.attempt"])
            assert first.status_code == STATUS_ERROR
            assert first.attributes["gateway.worker"] != second.attributes["gateway.worker"]
            try:
                triton_joined(receiver, trace_id)
            except TritonLeftTheTrace:
                continue   # Triton's own doing (see TRITON_ATTEMPTS); the others must join
            joined.append(trace_id)
            (infer,) = named(receiver.of_trace(trace_id), "triton", "InferRequest")
            assert infer.parent_span_id == second.span_id
    assert retried, f"no request was retried: {gw_log[-2000:]}"
    assert joined, f"Triton joined none of the retried traces {retried}"


@pytest.mark.triton
@pytest.mark.timeout(180)
def test_a_grpc_stream_is_one_span_with_the_worker_stream_under_it(
        gateway: GrpcGatewayProcess, receiver: OtlpReceiver) -> None:
    until_triton_joins(lambda n: _one_traced_stream(gateway, receiver, n))


def _one_traced_stream(gateway: GrpcGatewayProcess, receiver: OtlpReceiver, n: int) -> None:
    trace_id = new_trace_id(0xD4 + 0x1000 * n)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(gateway.grpc_target) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)),
                            headers={"traceparent": traceparent(trace_id)})
        try:
            for k in range(2):
                i = grpcclient.InferInput("IN", [2], "FP32")
                i.set_data_from_numpy(np.array([k, k], dtype=np.float32))
                client.async_stream_infer(MODEL, [i], request_id=f"s{k}")
            for _ in range(2):
                _, error = answers.get(timeout=20)
                assert error is None, f"{error!s} ({error!r})"
        finally:
            client.stop_stream()
    name = "inference.GRPCInferenceService/ModelStreamInfer"
    receiver.wait_for(lambda: bool(named(receiver.of_trace(trace_id), GATEWAY, name)),
                      what="the stream's span")
    triton_joined(receiver, trace_id, count=2)
    spans = receiver.of_trace(trace_id)
    (stream,) = named(spans, GATEWAY, name)
    assert stream.parent_span_id == CLIENT_SPAN
    assert stream.attributes["rpc.grpc.status_code"] == "OK"
    (upstream,) = named(spans, GATEWAY, "gateway.upstream")
    assert upstream.parent_span_id == stream.span_id
    routes = named(spans, GATEWAY, "gateway.route")
    assert len(routes) == 2 and all(r.parent_span_id == stream.span_id for r in routes)
    assert all(s.parent_span_id == upstream.span_id
               for s in named(spans, "triton", "InferRequest"))
