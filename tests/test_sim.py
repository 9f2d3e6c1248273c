"""Tests of the Triton simulator: the pure worker model (fake clock), the codec, and real
workers on loopback driven by the real ``tritonclient.http`` client."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from gateway.core.errors import BadRequest
from gateway.core.signals import derive_signals, parse_metrics
from gateway.core.tensors import parse_infer_request
from gateway.sim.cli import _parser, main, specs_from_args
from gateway.sim.core import (
    GIB,
    MIB,
    Fail,
    Faults,
    Queued,
    SimError,
    SimModel,
    Start,
    TensorSpec,
    WorkerCore,
    WorkerSpec,
    draw_service_s,
)
from gateway.sim.infer import answer, validate
from gateway.sim.server import SimFleet, SimFleetThread
from gateway.tools import procs

# ------------------------------------------------------------------ pure core, fake clock


def _core(**spec: object) -> WorkerCore:
    return WorkerCore(WorkerSpec(**spec), random.Random(7), now=0.0,  # type: ignore[arg-type]
                      gpu_uuid="GPU-test")


def _starts(events: list[Start | Fail]) -> list[tuple[int, float]]:
    return [(e.ticket, round(e.service_s, 9)) for e in events if isinstance(e, Start)]


def test_slots_then_fifo_queue_then_drain() -> None:
    core = _core(slots=2, base_ms=10.0, per_item_ms=1.0, speed_factor=2.0)
    a = core.arrive("simple", 4, now=0.0)
    b = core.arrive("simple", 1, now=0.0)
    c = core.arrive("simple", 1, now=0.1)
    d = core.arrive("simple", 2, now=0.2)
    assert isinstance(a, Start) and a.ticket == 1
    assert a.service_s == pytest.approx((10 + 4) / 2 / 1000)
    assert isinstance(b, Start)
    assert (c, d) == (Queued(3), Queued(4))
    assert core.statistics().queued == 2
    assert core.busy == 2
    assert _starts(core.complete(1, now=0.5)) == [(3, 0.0055)]  # FIFO: c first
    assert _starts(core.complete(2, now=0.5)) == [(4, 0.006)]
    assert core.complete(3, now=0.6) == []
    assert core.complete(4, now=0.7) == []
    stats = core.statistics()
    assert (stats.busy_slots, stats.queued, stats.success) == (0, 0, 4)
    raw = parse_metrics(core.render_metrics())
    m = raw.models["simple"]
    assert (m.success, m.inference_count, m.exec_count) == (4, 8, 4)
    # queue waits: c 0.4 s, d 0.3 s; request times 0.5+0.5+0.5+0.5 s
    assert m.queue_duration_us == pytest.approx(700_000, abs=2)
    assert m.request_duration_us == pytest.approx(2_000_000, abs=4)


def test_pending_memory_and_utilisation_in_metrics() -> None:
    core = _core(slots=2, memory_total_bytes=4 * GIB, memory_base_used_bytes=1 * GIB,
                 memory_per_item_bytes=100 * MIB)
    core.arrive("simple", 3, 0.0)
    core.arrive("simple", 5, 0.0)
    core.arrive("simple", 1, 0.0)
    signals = derive_signals(None, parse_metrics(core.render_metrics()), 0.0, None)
    assert signals.pending("simple") == 1
    assert signals.gpus[0].uuid == "GPU-test"
    assert signals.gpus[0].used_bytes == 1 * GIB + 8 * 100 * MIB
    assert signals.gpus[0].total_bytes == 4 * GIB
    assert signals.gpu_utilisation == 1.0


def test_out_of_memory_fails_and_is_counted() -> None:
    core = _core(slots=4, memory_total_bytes=2 * GIB, memory_base_used_bytes=1 * GIB,
                 memory_per_item_bytes=256 * MIB)
    assert isinstance(core.arrive("simple", 3, 0.0), Start)   # 768 MiB of 1 GiB free
    event = core.arrive("simple", 2, 0.0)                      # 512 MiB > 256 MiB free
    assert isinstance(event, Fail)
    assert event.status == 500 and "out of memory" in event.message
    assert core.oom_total == 1
    text = core.render_metrics()
    assert "sim_oom_total 1\n" in text
    assert 'reason="OTHER",version="1"} 1\n' in text
    assert parse_metrics(text).models["simple"].failure == 1


def test_queued_request_can_fail_oom_when_it_would_start() -> None:
    core = _core(slots=1, memory_total_bytes=2 * GIB, memory_base_used_bytes=0,
                 memory_per_item_bytes=GIB)
    first = core.arrive("simple", 1, 0.0)
    assert isinstance(first, Start)
    assert core.arrive("simple", 3, 0.0) == Queued(2)       # 3 GiB can never fit
    events = core.complete(first.ticket, 1.0)
    assert len(events) == 1 and isinstance(events[0], Fail) and events[0].ticket == 2
    assert core.statistics().queued == 0
    assert parse_metrics(core.render_metrics()).models["simple"].pending == 0


def test_error_rate_draw_uses_injected_random() -> None:
    outcomes = []
    for _ in range(2):
        core = WorkerCore(WorkerSpec(faults=Faults(error_rate=0.5), slots=1000),
                          random.Random(42), 0.0, "GPU-x")
        outcomes.append([isinstance(core.arrive("simple", 1, 0.0), Fail) for _ in range(200)])
    assert outcomes[0] == outcomes[1]
    assert 60 < sum(outcomes[0]) < 140
    raw = parse_metrics(core.render_metrics())
    assert raw.models["simple"].failure == sum(outcomes[1])


def test_queue_bound_rejects_with_503() -> None:
    core = _core(slots=1, max_queue=1)
    core.arrive("simple", 1, 0.0)
    assert isinstance(core.arrive("simple", 1, 0.0), Queued)
    event = core.arrive("simple", 1, 0.0)
    assert isinstance(event, Fail) and event.status == 503


def test_reconfigure_more_slots_starts_queued_work() -> None:
    core = _core(slots=1)
    core.arrive("simple", 1, 0.0)
    core.arrive("simple", 1, 0.0)
    events = core.reconfigure(WorkerSpec(slots=2), 1.0)
    assert [type(e) for e in events] == [Start]


def test_cpu_only_worker_has_no_gpu_series() -> None:
    core = _core(has_gpu=False)
    text = core.render_metrics()
    assert "nv_gpu_" not in text and "gpu_uuid" not in text
    assert parse_metrics(text).gpus == ()


def _service_times(core: WorkerCore, n: int) -> list[float]:
    """``n`` executions, one after the other on a one-slot worker: their service times."""
    out: list[float] = []
    now = 0.0
    for _ in range(n):
        event = core.arrive("simple", 1, now)
        assert isinstance(event, Start)
        out.append(event.service_s)
        now += event.service_s
        assert core.complete(event.ticket, now) == []
    return out


def test_fixed_service_time_is_exact_and_leaves_the_rng_alone() -> None:
    rng = random.Random(7)
    core = WorkerCore(WorkerSpec(slots=1, base_ms=50.0, per_item_ms=0.0), rng, now=0.0,
                      gpu_uuid="GPU-test")
    assert _service_times(core, 5) == [0.05] * 5
    assert rng.random() == random.Random(7).random()      # no draw was taken
    assert draw_service_s(0.05, "fixed", random.Random(1)) == 0.05


def test_exponential_service_time_mean_spread_and_seed() -> None:
    def times(seed: int) -> list[float]:
        spec = WorkerSpec(slots=1, base_ms=50.0, per_item_ms=0.0, service_dist="exponential")
        return _service_times(WorkerCore(spec, random.Random(seed), 0.0, "GPU-test"), 20_000)

    draws = times(3)
    mean = sum(draws) / len(draws)
    assert mean == pytest.approx(0.05, rel=0.03)
    # exponential: standard deviation = mean, and about e⁻¹ of draws exceed the mean
    sd = float(np.std(draws))
    assert sd == pytest.approx(0.05, rel=0.05)
    assert sum(d > 0.05 for d in draws) / len(draws) == pytest.approx(np.exp(-1), abs=0.02)
    assert min(draws) > 0
    assert times(3) == draws                              # seeded: reproducible
    assert times(4) != draws
    with pytest.raises(ValueError, match="unknown service distribution"):
        draw_service_s(0.05, "uniform", random.Random(1))  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 4), max_queue=st.integers(0, 5),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=60))
def test_core_invariants(slots: int, max_queue: int, ops: list[tuple[bool, int]]) -> None:
    """Random arrivals and completions: bounds hold and every request is answered once."""
    core = _core(slots=slots, max_queue=max_queue, memory_total_bytes=2 * GIB,
                 memory_base_used_bytes=GIB, memory_per_item_bytes=32 * MIB)
    running: list[int] = []
    answered: dict[int, str] = {}
    queued: set[int] = set()
    now = 0.0

    def record(event: Start | Fail | Queued) -> None:
        if isinstance(event, Start):
            queued.discard(event.ticket)
            running.append(event.ticket)
        elif isinstance(event, Fail):
            queued.discard(event.ticket)
            assert event.ticket not in answered
            answered[event.ticket] = "fail"
        else:
            queued.add(event.ticket)

    for is_arrival, batch in ops:
        now += 0.01
        if is_arrival or not running:
            record(core.arrive("simple", batch, now))
        else:
            ticket = running.pop(0)
            answered[ticket] = "ok"
            for event in core.complete(ticket, now):
                record(event)
        stats = core.statistics()
        assert stats.busy_slots == len(running) <= slots
        assert stats.queued == len(queued) <= max_queue
        assert GIB <= stats.memory_used_bytes <= 2 * GIB
    while running:
        ticket = running.pop(0)
        answered[ticket] = "ok"
        for event in core.complete(ticket, now):
            record(event)
    assert not queued and core.statistics().memory_used_bytes == GIB
    raw = parse_metrics(core.render_metrics()).models["simple"]
    assert raw.success == sum(v == "ok" for v in answered.values())
    assert raw.failure == sum(v == "fail" for v in answered.values())
    assert raw.pending == 0


# ------------------------------------------------------------------ the model, on the shared codec

MODEL = SimModel()


def _json_request(shape: list[int], data: list[float], **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32",
                                   "data": data}], **extra}).encode()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        # malformed bodies: the gateway's codec (gateway.core.tensors) judges them
        (b"{bad", 400, "malformed request JSON"),
        (b"[]", 400, "request JSON must be an object"),
        (_json_request([1, 16], [0.0] * 15), 400, "15 values in data"),
        # well-formed, but not what the model takes: Triton's messages
        (_json_request([65, 16], [0.0] * 65 * 16), 400, "batch-size must be <= 64"),
        (_json_request([1, 8], [0.0] * 8), 400, "unexpected shape"),
        (json.dumps({"inputs": [{"name": "X", "shape": [1, 16], "datatype": "FP32",
                                 "data": [0] * 16}]}).encode(), 400, "expected 1 inputs"),
        (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",
                                 "data": [0] * 16}]}).encode(), 400, "data-type is 'INT32'"),
        (_json_request([1, 16], [0.0] * 16, outputs=[{"name": "NOPE"}]), 400,
         "unexpected inference output 'NOPE'"),
    ],
)
def test_invalid_requests(body: bytes, status: int, fragment: str) -> None:
    with pytest.raises((BadRequest, SimError)) as info:
        validate(MODEL, parse_infer_request(body, None))
    assert isinstance(info.value, BadRequest | SimError)
    assert info.value.status == status
    assert fragment in info.value.message


def _roundtrip(body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
    req = parse_infer_request(body, header_length)
    validate(MODEL, req)
    encoded = answer(MODEL, req)
    return encoded.body, encoded.header_length


def test_binary_request_and_answer() -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    inp = triton.InferInput("INPUT0", [2, 16], "FP32")
    inp.set_data_from_numpy(x)
    out = triton.InferRequestedOutput("OUTPUT0", binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=[out], request_id="r1")
    reply, reply_length = _roundtrip(body, header_length)
    assert reply_length is not None
    result = triton.InferenceServerClient.parse_response_body(
        reply, header_length=reply_length)
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)


def test_bytes_identity_model() -> None:
    model = SimModel(name="echo", inputs=(TensorSpec("INPUT0", "BYTES", (-1,)),),
                     outputs=(TensorSpec("OUTPUT0", "BYTES", (-1,)),), op="identity")
    data = np.array([[b"ab", b""], [b"xyz", b"\x00\x01"]], dtype=np.object_)
    inp = triton.InferInput("INPUT0", [2, 2], "BYTES")
    inp.set_data_from_numpy(data)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=[triton.InferRequestedOutput("OUTPUT0", binary_data=True)])
    req = parse_infer_request(body, header_length)
    assert validate(model, req) == 2
    encoded = answer(model, req)
    result = triton.InferenceServerClient.parse_response_body(
        encoded.body, header_length=encoded.header_length)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


# ------------------------------------------------------------------ real workers on loopback


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimFleetThread]:
    specs = [
        WorkerSpec(base_ms=1.0),                                        # 0: plain
        WorkerSpec(slots=1, base_ms=1000.0, memory_total_bytes=4 * GIB,  # 1: slow, 1 slot
                   memory_base_used_bytes=GIB, memory_per_item_bytes=100 * MIB),
        WorkerSpec(memory_total_bytes=2 * GIB, memory_base_used_bytes=GIB,  # 2: OOM-prone
                   memory_per_item_bytes=64 * MIB),
        WorkerSpec(base_ms=1.0),                                        # 3: faults
        WorkerSpec(base_ms=1.0, has_gpu=False),                         # 4: CPU only
    ]
    with SimFleetThread(specs) as running:
        yield running


def _client(fleet: SimFleetThread, index: int) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(fleet.urls[index], connection_timeout=5.0,
                                        network_timeout=5.0)


def _get(port: int, path: str, method: str = "GET", body: bytes | None = None,
         headers: dict[str, str] | None = None,
         timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _infer_input(x: npt.NDArray[np.float32], binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_infer_binary_and_json_with_tritonclient(fleet: SimFleetThread) -> None:
    client = _client(fleet, 0)
    try:
        x = np.random.default_rng(1).random((3, 16), dtype=np.float32)
        result = client.infer("simple", [_infer_input(x)],
                              outputs=[triton.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 64
        result = client.infer(
            "simple", [_infer_input(x, binary=False)], request_id="abc", model_version="1",
            outputs=[triton.InferRequestedOutput("OUTPUT0", binary_data=False)])
        response = result.get_response()
        assert response["id"] == "abc" and response["model_version"] == "1"
        assert "parameters" not in response["outputs"][0]
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), x * 2)
    finally:
        client.close()


def test_health_metadata_config_index_stats(fleet: SimFleetThread) -> None:
    client = _client(fleet, 0)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
        assert not client.is_model_ready("simple", "2")
        assert not client.is_model_ready("nope")
        assert client.get_server_metadata()["name"] == "triton"
        meta = client.get_model_metadata("simple")
        assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
        config = client.get_model_config("simple")
        assert config["max_batch_size"] == 64 and "dynamic_batching" not in config
        # the worker's slots are its instances: what runs at once
        assert config["instance_group"][0]["count"] == WorkerSpec().slots
        assert client.get_model_repository_index() == [
            {"name": "simple", "version": "1", "state": "READY"}]
        stats = client.get_inference_statistics()["model_stats"][0]
        assert stats["name"] == "simple"
        with pytest.raises(InferenceServerException, match="unknown model: 'nope'") as info:
            client.get_model_metadata("nope")
        assert info.value.status() == "404"
    finally:
        client.close()


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/v2/nothing", 404, {"error": "Not Found"}),
        ("GET", "/", 404, {"error": "Not Found"}),
        ("GET", "/v2/models/simple/versions/x/ready", 404, {"error": "Not Found"}),
        ("POST", "/v2/health/ready", 405, {"error": "Method Not Allowed"}),
        ("GET", "/v2/models/simple/infer", 405, {"error": "Method Not Allowed"}),
        ("GET", "/v2/models/nope/ready", 400, {"error": "Model version not ready"}),
        ("GET", "/v2/models/simple/versions/7",
         404, {"error": "Request for unknown model: 'simple' version 7 is not found"}),
        ("POST", "/v2/models/simple/infer", 400, None),  # empty body: JSON parse error
    ],
)
def test_error_shapes(fleet: SimFleetThread, method: str, path: str, status: int,
                      body: dict[str, str] | None) -> None:
    got_status, headers, got_body = _get(fleet.ports[0], path, method, body=b"")
    assert got_status == status
    assert headers["content-type"] == "application/json"
    decoded = json.loads(got_body)
    assert set(decoded) == {"error"}
    if body is not None:
        assert decoded == body


def test_keep_alive_pipelining_and_gzip(fleet: SimFleetThread) -> None:
    port = fleet.ports[0]
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200"]
    body = gzip.compress(_json_request([1, 16], [1.0] * 16))
    status, headers, answer = _get(port, "/v2/models/simple/infer", "POST", body,
                                   {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer))["outputs"][0]["data"] == [2.0] * 16


def _scrape(port: int) -> str:
    status, headers, body = _get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return body.decode()


def test_metrics_reflect_load(fleet: SimFleetThread) -> None:
    port = fleet.ports[1]  # one slot, 1 s per request
    before = parse_metrics(_scrape(port))
    assert before.gpus[0].used_bytes == GIB

    def one(batch: int) -> int:
        x = _json_request([batch, 16], [0.5] * 16 * batch)
        return _get(port, "/v2/models/simple/infer", "POST", x, timeout_s=10.0)[0]

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one, 4)]
        deadline = time.monotonic() + 5.0
        while fleet.statistics().workers[1].core.busy_slots < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        futures += [pool.submit(one, 1), pool.submit(one, 1)]
        while fleet.statistics().workers[1].core.queued < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        during = parse_metrics(_scrape(port))
        assert [f.result(timeout=10) for f in futures] == [200, 200, 200]
    after = parse_metrics(_scrape(port))
    assert during.models["simple"].pending == 2
    assert during.gpus[0].utilisation == 1.0
    assert during.gpus[0].used_bytes == GIB + 4 * 100 * MIB
    assert after.models["simple"].pending == 0
    assert after.gpus[0].used_bytes == GIB
    assert after.models["simple"].success - before.models["simple"].success == 3
    signals = derive_signals(before, after, 2.0, 1.0)
    assert signals.models["simple"].queue_time_s > 0.5  # the two queued waited ≥ 1 s
    assert signals.models["simple"].request_time_s >= 1.0


def test_out_of_memory_over_http(fleet: SimFleetThread) -> None:
    client = _client(fleet, 2)  # 1 GiB free, 64 MiB per item: batch 17+ cannot fit
    try:
        x = np.ones((32, 16), dtype=np.float32)
        with pytest.raises(InferenceServerException, match="out of memory") as info:
            client.infer("simple", [_infer_input(x)])
        assert info.value.status() == "500"
        assert client.infer("simple", [_infer_input(x[:8])]).as_numpy("OUTPUT0") is not None
    finally:
        client.close()
    text = _scrape(fleet.ports[2])
    assert "sim_oom_total 1\n" in text
    assert parse_metrics(text).models["simple"].failure == 1
    assert fleet.statistics().workers[2].core.oom_total == 1


def test_cpu_only_worker_page(fleet: SimFleetThread) -> None:
    raw = parse_metrics(_scrape(fleet.ports[4]))
    assert raw.gpus == () and "simple" in raw.models


def test_faults(fleet: SimFleetThread) -> None:
    port = fleet.ports[3]
    client = _client(fleet, 3)
    x = np.ones((1, 16), dtype=np.float32)
    try:
        fleet.set_fault(3, error_rate=1.0)
        with pytest.raises(InferenceServerException, match="simulated") as info:
            client.infer("simple", [_infer_input(x)])
        assert info.value.status() == "500"
        fleet.set_fault(3, error_rate=0.0, added_latency_ms=300.0)
        started = time.monotonic()
        client.infer("simple", [_infer_input(x)])
        assert time.monotonic() - started >= 0.3
        fleet.set_fault(3, added_latency_ms=0.0, ready=False)
        assert not client.is_server_ready() and not client.is_model_ready("simple")
        assert client.is_server_live()
        fleet.set_fault(3, ready=True)
        assert client.is_server_ready()
    finally:
        client.close()

    fleet.set_fault(3, metrics="error")
    status, _, body = _get(port, "/metrics")
    assert status == 500 and "error" in json.loads(body)
    fleet.set_fault(3, metrics="hang")
    with pytest.raises(TimeoutError):
        _get(port, "/metrics", timeout_s=0.3)
    assert _get(port, "/v2/health/ready")[0] == 200  # only the metrics endpoint hangs
    fleet.set_fault(3, metrics="ok")

    fleet.set_fault(3, hang=True)
    with pytest.raises(TimeoutError):
        _get(port, "/v2/health/ready", timeout_s=0.3)
    assert fleet.statistics().workers[3].hung_requests >= 1
    # the control endpoint still answers on a hung worker's port
    status, _, body = _get(port, "/sim/control", "POST", json.dumps({"hang": False}).encode())
    assert status == 200 and json.loads(body) == {"ok": True, "workers": [3]}
    assert _get(port, "/v2/health/ready")[0] == 200


def test_crash_and_restart(fleet: SimFleetThread) -> None:
    port = fleet.ports[3]
    x = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                "data": [1.0] * 16}]}).encode()
    assert _get(port, "/v2/models/simple/infer", "POST", x)[0] == 200
    assert parse_metrics(_scrape(port)).models["simple"].success >= 1
    fleet.set_fault(3, crashed=True)
    with pytest.raises(ConnectionRefusedError):
        _get(port, "/v2/health/ready")
    assert not fleet.statistics().workers[3].up
    fleet.set_fault(3, crashed=False)
    assert _get(port, "/v2/health/ready")[0] == 200
    assert parse_metrics(_scrape(port)).models["simple"].success == 0  # a fresh process

    # the same through HTTP control, sent to another worker's port
    other = fleet.ports[0]
    status, _, _ = _get(other, "/sim/control", "POST", json.dumps({"worker": 3, "crash": True})
                        .encode())
    assert status == 200
    with pytest.raises(ConnectionRefusedError):
        _get(port, "/v2/health/live")
    _get(other, "/sim/control", "POST", json.dumps({"worker": 3, "restart": True}).encode())
    deadline = time.monotonic() + 5.0
    while not fleet.statistics().workers[3].up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _get(port, "/v2/health/live")[0] == 200
    status, _, body = _get(other, "/sim/stats")
    assert status == 200 and len(json.loads(body)["workers"]) == 5
    status, _, body = _get(other, "/sim/control", "POST", b'{"worker": 99}')
    assert status == 400 and "error" in json.loads(body)


def test_crash_drops_open_connections() -> None:
    with SimFleetThread([WorkerSpec(base_ms=5000.0)]) as one:
        port = one.ports[0]
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(_get, port, "/v2/models/simple/infer", "POST",
                                 _json_request([1, 16], [0.0] * 16), None, 10.0)
            deadline = time.monotonic() + 5.0
            while one.statistics().workers[0].core.busy_slots < 1 \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            one.crash(0)
            with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
                future.result(timeout=5.0)


async def _ready_status(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        line = await reader.readline()
        return line.split(b" ")[1]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_two_hundred_workers_in_one_process() -> None:
    fleet = SimFleet(workers=200)
    await asyncio.wait_for(fleet.start(), 60.0)
    try:
        assert len(set(fleet.ports)) == 200
        statuses: list[bytes] = []
        for start in range(0, 200, 50):  # bounded fan-out
            statuses += await asyncio.wait_for(asyncio.gather(
                *(_ready_status(p) for p in fleet.ports[start:start + 50])), 30.0)
        assert statuses == [b"200"] * 200
    finally:
        await fleet.stop()


def _start_cli(extra: list[str]) -> tuple[subprocess.Popen[str], list[int]]:
    """Start ``gateway sim`` on three consecutive free-looking ports (retried if taken)."""
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = min(probe.getsockname()[1], 65000)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sim", "--workers", "3", "--base-port", str(base),
             *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        line = proc.stdout.readline()
        if line:
            ports: list[int] = json.loads(line)["ports"]
            assert ports == [base, base + 1, base + 2]
            return proc, ports
        proc.wait(timeout=15)  # a port was taken: try elsewhere
    raise AssertionError("could not start gateway sim")


def test_cli_serves_consecutive_ports() -> None:
    proc, ports = _start_cli(["--speeds", "1,2", "--cpu-only", "--duration-s", "60"])
    try:
        for port in ports:
            assert _get(port, "/v2/health/ready")[0] == 200
        assert parse_metrics(_scrape(ports[2])).gpus == ()
    finally:
        assert procs.stop(proc, 15) == 0


def test_cli_rejects_bad_arguments() -> None:
    assert main(["--workers", "0"]) == 2


def test_cli_specs() -> None:
    args = _parser().parse_args([
        "--workers", "3", "--speeds", "1,2", "--slots", "4,8,16", "--memory-gib", "80",
        "--error-rate", "0.5", "--faulty", "1", "--model", "big:FP16:3x8:identity:8",
        "--model", "echo:BYTES:-1"])
    specs = specs_from_args(args)
    assert [s.speed_factor for s in specs] == [1.0, 2.0, 1.0]
    assert [s.slots for s in specs] == [4, 8, 16]
    assert {s.memory_total_bytes for s in specs} == {80 * GIB}
    assert [s.faults.error_rate for s in specs] == [0.0, 0.5, 0.0]
    big, echo = specs[0].models
    assert (big.name, big.inputs[0].datatype, big.inputs[0].dims, big.op, big.max_batch_size) \
        == ("big", "FP16", (3, 8), "identity", 8)
    assert (echo.inputs[0].datatype, echo.op) == ("BYTES", "identity")
    assert {s.service_dist for s in specs} == {"fixed"}
    exp = specs_from_args(_parser().parse_args(["--service-dist", "exponential"]))
    assert [s.service_dist for s in exp] == ["exponential"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--service-dist", "uniform"])


async def _arequest(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        data = await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


async def test_control_port_restart_after_and_runtime_capacity() -> None:
    fleet = SimFleet([WorkerSpec(slots=1, base_ms=2000.0), WorkerSpec()], control_port=0)
    await fleet.start()
    try:
        control = fleet.control_port
        assert control is not None
        assert (await _arequest(control, "GET", "/v2/health/ready"))[0] == 404
        status, body = await _arequest(control, "POST", "/sim/control", json.dumps(
            {"worker": 1, "crash": True, "restart_after_s": 0.2}).encode())
        assert status == 200 and json.loads(body)["workers"] == [1]
        assert not fleet.statistics().workers[1].up
        for _ in range(100):
            if fleet.is_up(1):
                break
            await asyncio.sleep(0.05)
        assert (await _arequest(fleet.ports[1], "GET", "/v2/health/ready"))[0] == 200

        # three requests on one slot queue up; raising the slots starts them at once
        infer = _json_request([1, 16], [1.0] * 16)
        tasks = [asyncio.ensure_future(_arequest(fleet.ports[0], "POST",
                                                 "/v2/models/simple/infer", infer))
                 for _ in range(3)]
        for _ in range(500):
            if fleet.statistics().workers[0].core.queued == 2:
                break
            await asyncio.sleep(0.01)
        assert fleet.statistics().workers[0].core.queued == 2
        fleet.set_fault(0, slots=3, speed_factor=2.0)
        stats = fleet.statistics().workers[0].core
        assert (stats.busy_slots, stats.queued, stats.slots) == (3, 0, 3)
        assert [s for s, _ in await asyncio.gather(*tasks)] == [200, 200, 200]
        with pytest.raises(TypeError):
            fleet.set_fault(0, no_such_fault=1)
        status, _ = await _arequest(control, "POST", "/sim/control", b'{"metrics": "bad"}')
        assert status == 400
    finally:
        await fleet.stop()


@pytest.mark.parametrize(
    "module", ["gateway/sim/core.py", "gateway/sim/infer.py", "gateway/core/signals.py"])
def test_pure_modules_do_no_io(module: str) -> None:
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parent.parent / module).read_text())
    imported = {alias.name for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"asyncio", "socket", "time", "httptools", "threading"}
    shell = {name for name in imported if name.startswith("gateway.sim")} \
        - {"gateway.sim.core", "gateway.sim.infer"}
    assert not shell


async def test_aio_client_concurrent_infer_with_compressed_answers() -> None:
    import tritonclient.http.aio as triton_aio

    fleet = SimFleet([WorkerSpec(slots=2, base_ms=5.0)])
    await fleet.start()
    client = triton_aio.InferenceServerClient(fleet.urls[0])
    try:
        assert await client.is_server_ready()
        xs = [np.full((2, 16), i, dtype=np.float32) for i in range(8)]

        async def one(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            inp = triton_aio.InferInput("INPUT0", [2, 16], "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer("simple", [inp])
            out: npt.NDArray[np.float32] = result.as_numpy("OUTPUT0")
            return out

        outs = await asyncio.wait_for(asyncio.gather(*(one(x) for x in xs)), 30.0)
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, x * 2)
        assert fleet.statistics().workers[0].core.success == 8
    finally:
        await client.close()
        await fleet.stop()
