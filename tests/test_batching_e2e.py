"""Gateway-side batching end to end: the real gateway (a subprocess) in front of real Triton.

What is checked, always against the same requests sent one by one straight to a worker:

* a Hypothesis property over random callers of ``identity`` (FP32, FP16, INT64, BOOL and
  BYTES inputs, random non-batch widths, input sets and output selections) and ``strings``,
  JSON and binary callers mixed, some gzip-compressed, arriving in random order: every
  caller gets exactly what Triton alone would answer (own ``id``, own encoding, only the
  outputs it named), incompatible callers never share a batch and no batch exceeds the limit
  (read back from the gateway's ``gateway_batch_size`` histogram);
* fixed scenarios with a long window on ``add_sub``: exact batch counts at the limit, a batch
  that fails at the worker fails for each member, a malformed member fails alone, a caller
  that hangs up is withdrawn while the others are answered, gzip bodies join batches,
  sequence and oversized requests travel unbatched;
* faults from the simulator: a worker that errors or crashes fails every member of a batch.

Triton's own dynamic batcher (500 µs queue delay) may merge gateway batches again, so batch
sizes are read from the gateway's metrics, never from Triton's statistics.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.tensors import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    encode_infer_request,
    header_length_of,
    join_bytes_elements,
    parse_infer_response,
)
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.local import TritonFleet
from gateway.tools.procs import free_port
from tests.conftest import fleet_config

pytestmark = pytest.mark.triton

LIMIT = 4                 # the gateway's batch limit for identity and add_sub
WINDOW_MS = 15.0          # identity: short window, batches form from concurrent callers
LONG_WINDOW_MS = 800.0    # add_sub: every caller of a scenario arrives inside one window
IDENTITY_MAX_BATCH = 8    # the model's own max_batch_size (gateway.triton_worker)
STRINGS_MAX_BATCH = 64
IDENTITY_TYPES = ("FP32", "FP16", "INT64", "BOOL", "BYTES")
NUMPY: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"),
                                   "INT64": np.dtype("<i8"), "BOOL": np.dtype("?")}
TIMEOUT_S = 30.0

Decoded = tuple[int, Any]  # (status, (InferResponse, binary output names) | error JSON)


@pytest.fixture(scope="module")
def batching_gateway(triton_fleet: TritonFleet,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    models = {
        # flush_when_idle off: these scenarios check window semantics exactly
        "identity": {"batching": {"enabled": True, "max_batch_size": LIMIT,
                                  "max_delay_ms": WINDOW_MS, "flush_when_idle": False}},
        "strings": {"batching": {"enabled": True, "max_delay_ms": 2}},  # the form
        "add_sub": {"batching": {"enabled": True, "max_batch_size": LIMIT,
                                 "max_delay_ms": LONG_WINDOW_MS, "flush_when_idle": False}},
        "overhead": {},
    }
    gw = GatewayProcess(fleet_config(triton_fleet, models=models),
                        Path(tmp_path_factory.mktemp("gw-batching")))
    gw.start()
    try:
        gw.wait_workers_ready(2)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def direct_url(triton_fleet: TritonFleet) -> str:
    return triton_fleet.worker(0).http_url


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Caller:
    model: str
    request: InferRequest
    binary_inputs: bool
    gzipped: bool = False
    delay_ms: float = 0.0

    def body_and_headers(self) -> tuple[bytes, list[tuple[str, str]]]:
        encoded = encode_infer_request(self.request, binary=self.binary_inputs)
        headers = [(k.decode(), v.decode()) for k, v in encoded.headers()]
        body = encoded.body
        if self.gzipped:
            body = gzip.compress(body)
            headers.append(("content-encoding", "gzip"))
        return body, headers


def decoded(response: httpx.Response) -> Decoded:
    """Status and, for a 200, the response plus the names of the outputs sent binary."""
    if response.status_code != 200:
        return response.status_code, json.loads(response.content)
    body = response.content
    length = header_length_of(response.headers.items())
    parsed = parse_infer_response(body, length)
    # Like Triton, JSON BYTES elements that are not UTF-8 are written as raw bytes.
    doc = json.loads(body[:length].decode("utf-8", "surrogateescape"))
    binary = frozenset(o["name"] for o in doc["outputs"]
                       if "binary_data_size" in o.get("parameters", {}))
    return 200, (parsed, binary)


async def post(client: httpx.AsyncClient, base: str, caller: Caller) -> Decoded:
    if caller.delay_ms:
        await asyncio.sleep(caller.delay_ms / 1000.0)
    body, headers = caller.body_and_headers()
    r = await client.post(f"{base}/v2/models/{caller.model}/infer", content=body,
                          headers=headers)
    return decoded(r)


async def one_by_one(base: str, callers: list[Caller]) -> list[Decoded]:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        return [await post(client, base, c) for c in callers]


async def concurrently(base: str, callers: list[Caller]) -> list[Decoded]:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        return list(await asyncio.gather(*(post(client, base, c) for c in callers)))


@dataclass(frozen=True)
class BatchHistogram:
    """The gateway's ``gateway_batch_size`` histogram of one model (members per batch)."""

    count: float = 0.0
    total: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count)

    def at_most(self, members: float) -> float:
        return max((c for le, c in self.buckets if le <= members), default=0.0)

    def __sub__(self, other: BatchHistogram) -> BatchHistogram:
        before = dict(other.buckets)
        return BatchHistogram(self.count - other.count, self.total - other.total,
                              tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets))


def batch_histogram(gw: GatewayProcess, model: str) -> BatchHistogram:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    count = total = 0.0
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name != "gateway_batch_size":
            continue
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
    return BatchHistogram(count, total, tuple(sorted(buckets)))


def assert_same_as_direct(callers: list[Caller], via_gateway: list[Decoded],
                          direct: list[Decoded]) -> None:
    for caller, got, want in zip(callers, via_gateway, direct, strict=True):
        assert got == want, (caller, got, want)
        if got[0] == 200:
            response: InferResponse = got[1][0]
            assert response.id == caller.request.id


def add_sub_caller(rows: int = 1, rid: str = "", *, width: int = 16, value: float = 1.0,
                   binary: bool = False, outputs: tuple[str, ...] = (),
                   input_names: tuple[str, str] = ("INPUT0", "INPUT1"),
                   **params: Any) -> Caller:
    a = np.full((rows, width), value, dtype=np.float32) + np.arange(width, dtype=np.float32)
    b = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    request = InferRequest(rid, dict(params), (Tensor.from_numpy(input_names[0], a),
                                               Tensor.from_numpy(input_names[1], b)),
                           tuple(RequestedOutput(n) for n in outputs))
    return Caller("add_sub", request, binary_inputs=binary)


# ---------------------------------------------------------------- the property


@st.composite
def tensor_of(draw: st.DrawFn, name: str, datatype: str, shape: tuple[int, ...],
              *, text_only: bool) -> Tensor:
    count = math.prod(shape)
    if datatype == "BYTES":
        # Triton's JSON form of BYTES is a string: no NUL, valid UTF-8 for JSON callers.
        items = (draw(st.lists(st.text("abcXYZ é", max_size=4), min_size=count,
                               max_size=count)) if text_only else None)
        raw = ([w.encode() for w in items] if items is not None else
               draw(st.lists(st.binary(max_size=4), min_size=count, max_size=count)))
        return Tensor(name, "BYTES", shape, join_bytes_elements(raw))
    dtype = NUMPY[datatype]
    elements = (st.floats(width=dtype.itemsize * 8, allow_nan=False,  # type: ignore[arg-type]
                          allow_infinity=False) if dtype.kind == "f" else None)
    return Tensor.from_numpy(name, draw(hnp.arrays(dtype, shape, elements=elements)), datatype)


@st.composite
def identity_schema(draw: st.DrawFn) -> tuple[tuple[str, int], ...]:
    types = draw(st.lists(st.sampled_from(IDENTITY_TYPES), min_size=1, max_size=2, unique=True))
    return tuple((t, draw(st.integers(1, 3))) for t in types)


@st.composite
def gateway_callers(draw: st.DrawFn) -> list[Caller]:
    """Callers of identity (one to three schemas: compatible and incompatible ones) and
    strings, each with its own rows, id, outputs, encodings, compression and arrival time."""
    schemas = draw(st.lists(identity_schema(), min_size=1, max_size=3))
    callers = []
    for _ in range(draw(st.integers(2, 10))):
        binary = draw(st.booleans())
        # Mostly small members; sometimes one above the gateway's limit (it travels alone).
        rows = draw(st.sampled_from([1, 1, 1, 2, 3, LIMIT + 1]))
        if draw(st.integers(0, 4)) == 0:
            model = "strings"
            inputs: tuple[Tensor, ...] = (
                draw(tensor_of("TEXT", "BYTES", (rows, 1), text_only=True)),)
            names = ["UPPER", "LENGTH"]
        else:
            model = "identity"
            schema = draw(st.sampled_from(schemas))
            binary = binary or any(t == "FP16" for t, _ in schema)
            inputs = tuple(draw(tensor_of(f"INPUT_{t}", t, (rows, width),
                                          text_only=not binary)) for t, width in schema)
            names = [f"OUTPUT_{t}" for t, _ in schema]
        chosen = draw(st.sampled_from([[], [], names, names[-1:]]))
        params: dict[str, Any] = {}
        if draw(st.booleans()):
            params["binary_data_output"] = True
        outputs = tuple(RequestedOutput(n, draw(st.sampled_from(
            [{}, {"binary_data": True}, {"binary_data": False}]))) for n in chosen)
        if any(t.datatype == "FP16" for t in inputs):
            # Triton 2.51 has no JSON form of FP16 at all (a JSON caller gets a 400 from
            # Triton alone, but an answer through the gateway, which merges in binary).
            params["binary_data_output"] = True
            outputs = tuple(RequestedOutput(o.name, {"binary_data": True}) for o in outputs)
        request = InferRequest(draw(st.sampled_from(["", "a", "id-7", "ü"])), params, inputs,
                               outputs)
        callers.append(Caller(model, request, binary_inputs=binary, gzipped=draw(st.booleans()),
                              delay_ms=draw(st.sampled_from([0.0, 0.0, 1.0, 5.0, 20.0]))))
    return callers


def _key(caller: Caller) -> tuple[object, ...]:
    r = caller.request
    return (caller.model, tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in r.inputs)),
            tuple(sorted(o.name for o in r.outputs)))


def fewest_batches(callers: list[Caller], limit: int) -> int:
    """The fewest batches any planner keeping to the rules could send: one per key at least,
    no batch above ``limit`` rows (a larger request travels alone)."""
    rows_by_key: Counter[tuple[object, ...]] = Counter()
    alone = 0
    for c in callers:
        rows = c.request.inputs[0].shape[0]
        if rows > limit:
            alone += 1
        else:
            rows_by_key[_key(c)] += rows
    return alone + sum(math.ceil(rows / limit) for rows in rows_by_key.values())


@settings(max_examples=12, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(callers=gateway_callers())
def test_batched_gateway_answers_like_triton_one_by_one(
        batching_gateway: GatewayProcess, direct_url: str, callers: list[Caller]) -> None:
    direct = asyncio.run(one_by_one(direct_url, callers))
    before = {m: batch_histogram(batching_gateway, m) for m in ("identity", "strings")}
    via_gateway = asyncio.run(concurrently(batching_gateway.url, callers))
    assert_same_as_direct(callers, via_gateway, direct)

    for model, limit in (("identity", LIMIT), ("strings", STRINGS_MAX_BATCH)):
        mine = [c for c in callers if c.model == model]
        delta = batch_histogram(batching_gateway, model) - before[model]
        assert delta.total == len(mine)  # every caller went through a batch, once
        assert delta.at_most(limit) == delta.count  # no batch has more members than the limit
        # Incompatible callers never share a batch; no batch holds more rows than the limit.
        assert fewest_batches(mine, limit) <= delta.count <= len(mine)


# ---------------------------------------------------------------- fixed scenarios (add_sub)


def test_batches_close_at_the_limit_and_keys_never_mix(batching_gateway: GatewayProcess,
                                                      direct_url: str) -> None:
    # Six one-row callers of one key (batches of 4 + 2), two naming other outputs (own key),
    # JSON and binary mixed; then a 3-row and a 2-row caller, which do not fit together.
    callers = [add_sub_caller(1, f"a{i}", value=i, binary=i % 2 == 0,
                              binary_data_output=i == 3) for i in range(6)]
    callers += [add_sub_caller(1, f"b{i}", value=10 + i, outputs=("OUTPUT1",))
                for i in range(2)]
    before = batch_histogram(batching_gateway, "add_sub")
    via_gateway = asyncio.run(concurrently(batching_gateway.url, callers))
    assert_same_as_direct(callers, via_gateway, asyncio.run(one_by_one(direct_url, callers)))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (3, 8)  # [a0..a3], [a4, a5], [b0, b1]
    assert (delta.at_most(1), delta.at_most(2), delta.at_most(4)) == (0, 2, 3)

    big = [add_sub_caller(3, "r3"), add_sub_caller(2, "r2", value=5)]
    before = batch_histogram(batching_gateway, "add_sub")
    via_gateway = asyncio.run(concurrently(batching_gateway.url, big))
    assert_same_as_direct(big, via_gateway, asyncio.run(one_by_one(direct_url, big)))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (2, 2)  # 3 + 2 rows > 4: two batches of one


@pytest.mark.parametrize("spoiler", [
    {"input_names": ("INPUT0", "INPUT9")},  # an input the model does not have
    {"width": 8},  # the wrong non-batch dimension
])
def test_a_batch_that_fails_at_the_worker_fails_for_each_member(
        batching_gateway: GatewayProcess, direct_url: str, spoiler: dict[str, Any]) -> None:
    callers = [add_sub_caller(1, f"f{i}", value=i, binary=i == 1, **spoiler) for i in range(3)]
    before = batch_histogram(batching_gateway, "add_sub")
    via_gateway = asyncio.run(concurrently(batching_gateway.url, callers))
    direct = asyncio.run(one_by_one(direct_url, callers))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (1, 3)  # one batch, and it failed
    for (status, doc), (want_status, want_doc) in zip(via_gateway, direct, strict=True):
        assert status == want_status == 400
        assert isinstance(doc["error"], str) and doc["error"]
        if "input_names" in spoiler:  # the message names no shape: identical to Triton's
            assert doc == want_doc


def test_a_malformed_member_fails_alone(batching_gateway: GatewayProcess,
                                        direct_url: str) -> None:
    good = [add_sub_caller(1, f"g{i}", value=i) for i in range(2)]
    bad = json.dumps({"id": "bad", "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]})

    async def scenario(base: str) -> tuple[list[Decoded], int]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            bad_call = asyncio.ensure_future(client.post(
                f"{base}/v2/models/add_sub/infer", content=bad,
                headers={"content-type": "application/json"}))
            answers = await asyncio.gather(*(post(client, base, c) for c in good))
            return list(answers), (await bad_call).status_code

    before = batch_histogram(batching_gateway, "add_sub")
    answers, bad_status = asyncio.run(scenario(batching_gateway.url))
    _, direct_bad_status = asyncio.run(scenario(direct_url))
    # Triton 2.51 itself answers 500 ("Unable to parse 'data'"); the gateway, which has to
    # decode the body to batch it, answers 400 to that caller alone.
    assert bad_status == 400 and direct_bad_status >= 400
    assert_same_as_direct(good, answers, asyncio.run(one_by_one(direct_url, good)))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (1, 2)


def test_a_caller_that_hangs_up_is_withdrawn_and_the_others_are_answered(
        batching_gateway: GatewayProcess, direct_url: str) -> None:
    callers = [add_sub_caller(1, f"s{i}", value=i, binary=i == 0) for i in range(2)]
    leaver = add_sub_caller(1, "gone", value=9)

    async def hang_up(base: str) -> None:
        body, headers = leaver.body_and_headers()
        host, port = base.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(f"POST /v2/models/add_sub/infer HTTP/1.1\r\nhost: {host}\r\n{head}"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        await asyncio.sleep(LONG_WINDOW_MS / 4000.0)  # well inside the batch window
        writer.close()
        await writer.wait_closed()

    async def scenario(base: str) -> list[Decoded]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            leaving = asyncio.ensure_future(hang_up(base))
            answers = await asyncio.gather(*(post(client, base, c) for c in callers))
            await leaving
            return list(answers)

    before = batch_histogram(batching_gateway, "add_sub")
    via_gateway = asyncio.run(scenario(batching_gateway.url))
    assert_same_as_direct(callers, via_gateway, asyncio.run(one_by_one(direct_url, callers)))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (1, 2)  # the leaver was withdrawn before the send


def test_gzip_callers_join_a_batch(batching_gateway: GatewayProcess, direct_url: str) -> None:
    callers = [Caller("add_sub", add_sub_caller(1, f"z{i}", value=i).request,
                      binary_inputs=i % 2 == 0, gzipped=i < 3) for i in range(4)]
    before = batch_histogram(batching_gateway, "add_sub")
    via_gateway = asyncio.run(concurrently(batching_gateway.url, callers))
    assert_same_as_direct(callers, via_gateway, asyncio.run(one_by_one(direct_url, callers)))
    delta = batch_histogram(batching_gateway, "add_sub") - before
    assert (delta.count, delta.total) == (1, 4)


def test_sequence_and_unbatchable_requests_pass_through(batching_gateway: GatewayProcess,
                                                        direct_url: str) -> None:
    over_model_limit = np.arange(IDENTITY_MAX_BATCH + 1, dtype=np.int64)[:, None]
    callers = [
        add_sub_caller(1, "seq", sequence_id=42, sequence_start=True),
        Caller("identity", InferRequest("big", {}, (
            Tensor.from_numpy("INPUT_INT64", over_model_limit),)), binary_inputs=False),
        Caller("overhead", InferRequest("off", {}, (Tensor.from_numpy(
            "INPUT", np.ones((1, 4), dtype=np.float32)),)), binary_inputs=True),
    ]
    before = {m: batch_histogram(batching_gateway, m) for m in ("add_sub", "identity",
                                                                  "overhead")}
    via_gateway = asyncio.run(concurrently(batching_gateway.url, callers))
    assert_same_as_direct(callers, via_gateway, asyncio.run(one_by_one(direct_url, callers)))
    for model, hist in before.items():
        assert (batch_histogram(batching_gateway, model) - hist).count == 0, model


# ---------------------------------------------------------------- faults (simulator)


def control(port: int, change: dict[str, Any]) -> None:
    r = httpx.post(f"http://127.0.0.1:{port}/sim/control", json={"worker": 0, **change},
                   timeout=5)
    assert r.status_code == 200, r.text


def test_worker_errors_and_crashes_fail_every_member(tmp_path: Path) -> None:
    control_port = free_port()
    with SimFleetThread([WorkerSpec(base_ms=5.0)], control_port=control_port) as sim:
        url = f"http://127.0.0.1:{sim.ports[0]}"
        cfg = {"workers": [{"url": url, "metrics_url": url + "/metrics"}],
               "models": {"simple": {"batching": {"enabled": True, "max_delay_ms": 300,
                                                  "flush_when_idle": False}}},
               "health": {"interval_s": 0.2, "rise": 1, "fall": 1, "timeout_s": 0.5},
               "scrape": {"interval_s": 0.5}}
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                       "data": [1.0] * 16}]})
        with GatewayProcess(cfg, tmp_path) as gw:
            async def burst(crash_after_s: float | None = None) -> list[httpx.Response]:
                async def crash() -> None:
                    assert crash_after_s is not None
                    await asyncio.sleep(crash_after_s)
                    await asyncio.to_thread(control, control_port, {"crash": True})

                async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                    calls = [client.post(f"{gw.url}/v2/models/simple/infer", content=body,
                                         headers={"content-type": "application/json"})
                             for _ in range(3)]
                    crashing = asyncio.ensure_future(crash()) if crash_after_s else None
                    answers = await asyncio.gather(*calls)
                    if crashing is not None:
                        await crashing
                    return list(answers)

            assert [r.status_code for r in asyncio.run(burst())] == [200] * 3
            control(control_port, {"error_rate": 1.0})
            failed = asyncio.run(burst())
            assert [r.status_code for r in failed] == [500] * 3
            assert all(r.json() == {"error": "simulated backend error"} for r in failed)
            hist = batch_histogram(gw, "simple")
            assert (hist.count, hist.total) == (2, 6)  # two batches of three
            control(control_port, {"error_rate": 0.0})
            # The worker dies while a batch is open: every member gets the same error.
            crashed = asyncio.run(burst(crash_after_s=0.1))
            statuses = {r.status_code for r in crashed}
            assert len(statuses) == 1 and statuses <= {502, 503}, [r.text for r in crashed]
            assert len({r.content for r in crashed}) == 1 and "error" in crashed[0].json()


def test_a_batched_member_keeps_its_own_deadline(batching_gateway: GatewayProcess) -> None:
    """A member's deadline travels with it into the batch and closes the batch early: with
    an 800 ms window and a 400 ms deadline the batch leaves 50 ms before the deadline, in
    time for the answer (before,
    the batched path replaced every member's deadline by the default and the caller waited
    for the window). A deadline shorter than the service time gets a JSON refusal with
    Retry-After (503 unmeetable or 504), well before the window, never a late 200."""

    def post(timeout_ms: int, rid: str) -> tuple[httpx.Response, float]:
        body, headers = add_sub_caller(1, rid).body_and_headers()
        headers.append(("x-request-timeout-ms", str(timeout_ms)))
        started = time.monotonic()
        response = httpx.post(f"{batching_gateway.url}/v2/models/add_sub/infer", content=body,
                              headers=headers, timeout=TIMEOUT_S)
        return response, time.monotonic() - started

    response, elapsed = post(400, "in-time")
    # A 200 at all means the batch left before the member's deadline (else 504).
    assert response.status_code == 200, response.text
    assert elapsed < LONG_WINDOW_MS / 1000.0
    response, elapsed = post(1, "too-short")
    assert response.status_code in (503, 504), response.text
    assert "error" in response.json() and response.headers["retry-after"]
    assert elapsed < LONG_WINDOW_MS / 1000.0


# ---------------------------------------------------------------- waiting for an instance

SLOW_MS = 400.0     # one execution of the slow model; the worker has one instance
SLOW_DELAY_MS = 20  # the slow model's max_delay_ms
FOLLOWERS = 6
FOLLOWER_GAP_S = 0.05  # 2.5 × max_delay: the timer alone sends each follower on its own


def _slow_followers(gw: GatewayProcess, body: str) -> tuple[float, list[int], float]:
    """A lone ``quick`` request to the idle fleet (its latency), then one ``slow`` request
    and, while it executes, FOLLOWERS more FOLLOWER_GAP_S apart (statuses, arrival span)."""

    async def scenario() -> tuple[float, list[int], float]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            async def post(model: str) -> int:
                r = await client.post(f"{gw.url}/v2/models/{model}/infer", content=body,
                                      headers={"content-type": "application/json"})
                return r.status_code

            assert await post("quick") == 200  # warm: the model's config is read
            await asyncio.sleep(0.2)  # idle for longer than any window
            started = time.monotonic()
            assert await post("quick") == 200
            lone_s = time.monotonic() - started
            assert await post("slow") == 200  # warm, and the service time is learned
            await asyncio.sleep(0.2)
            first = asyncio.ensure_future(post("slow"))
            await asyncio.sleep(0.05)
            followers = []
            sent_at = []
            for _ in range(FOLLOWERS):
                sent_at.append(time.monotonic())
                followers.append(asyncio.ensure_future(post("slow")))
                await asyncio.sleep(FOLLOWER_GAP_S)
            statuses = await asyncio.gather(first, *followers)
            return lone_s, statuses, sent_at[-1] - sent_at[0]

    return asyncio.run(scenario())


def test_batches_wait_for_a_busy_instance_and_an_idle_one_sends_at_once(
        tmp_path: Path) -> None:
    """One simulated worker with one instance. ``quick`` (5 ms, a 2 s window): a lone request
    to the idle fleet is answered at once, not after the window. ``slow`` (400 ms, a 20 ms
    window): while the first request executes, followers arriving 50 ms apart — each alone
    in any 20 ms window — keep joining one batch, which goes when the instance frees. The
    same callers through a gateway with ``wait_for_instance: false`` (the timer alone) go
    in about one batch each."""
    models = (SimModel(name="quick", base_ms=5.0), SimModel(name="slow", base_ms=SLOW_MS))
    with SimFleetThread([WorkerSpec(slots=1, per_item_ms=0.0, models=models)]) as sim:
        url = f"http://127.0.0.1:{sim.ports[0]}"
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                       "data": [1.0] * 16}]})
        batches: dict[bool, BatchHistogram] = {}
        for wait in (True, False):
            slow = {"enabled": True, "max_delay_ms": SLOW_DELAY_MS}
            if not wait:
                slow["wait_for_instance"] = False
            cfg = {"workers": [{"url": url, "metrics_url": url + "/metrics"}],
                   "models": {"quick": {"batching": {"enabled": True, "max_delay_ms": 2000}},
                              "slow": {"batching": slow}}}
            workdir = tmp_path / f"wait-{wait}"
            workdir.mkdir()
            with GatewayProcess(cfg, workdir) as gw:
                gw.wait_workers_ready(1)
                before = batch_histogram(gw, "slow")
                lone_s, statuses, span_s = _slow_followers(gw, body)
                batches[wait] = batch_histogram(gw, "slow") - before
            assert lone_s < 1.0, f"a lone request to an idle fleet waited {lone_s:.3f} s"
            assert statuses == [200] * (FOLLOWERS + 1)
            # The followers arrived over more than ten 20 ms windows.
            assert span_s > 10 * SLOW_DELAY_MS / 1000.0
        for hist in batches.values():
            assert hist.total == FOLLOWERS + 2  # the warm-up, the first and the followers
        # Waiting for the instance: the followers went in one batch (two, should the machine
        # stall the client past the first execution) ...
        assert batches[True].count - 2 <= 2, batches[True]
        # ... the timer alone sends them about one by one.
        assert batches[False].count - 2 >= 4, batches[False]
