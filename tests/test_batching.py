"""Gateway-side batching: keys, plans, merge/split against a reference model, the async
Batcher (timers, limits, errors, cancellation), and agreement with a real Triton."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.core.batching import (
    BatchKey,
    BatchMeta,
    BatchRecord,
    CloseRule,
    FleetCounts,
    Headers,
    HttpReply,
    InstanceView,
    NotBatchable,
    PendingItem,
    UpstreamReply,
    Waiting,
    compatibility_key,
    instance_view,
    merge,
    plan_batches,
    plan_closes,
    prepare,
    render_response,
    replies_for,
    split,
)
from gateway.core.config import BatchingConfig
from gateway.core.errors import BadRequest, Overloaded, UpstreamError
from gateway.core.tensors import (
    InferRequest,
    InferResponse,
    Parameters,
    RequestedOutput,
    Tensor,
    encode_infer_request,
    encode_infer_response,
    header_length_of,
    join_bytes_elements,
    parse_infer_request,
    parse_infer_response,
    peek_infer_header,
    split_bytes_elements,
)
from gateway.core.types import ModelKey
from gateway.engine.batcher import Batcher

MODEL = ModelKey("ref")
FIXED_NUMPY = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT16": np.dtype("<i2"),
    "FP16": np.dtype("<f2"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4"),
    "INT64": np.dtype("<i8"), "UINT64": np.dtype("<u8"), "FP64": np.dtype("<f8"),
}
TYPES = [*FIXED_NUMPY, "BYTES"]
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- a pure reference model


def _op(tensor: Tensor) -> Tensor:
    """An elementwise (so row-independent) function of one input."""
    name = f"{tensor.name}_OP"
    if tensor.datatype == "BYTES":
        items = [item[::-1] + b"!" for item in split_bytes_elements(tensor.data)]
        return Tensor(name, "BYTES", tensor.shape, join_bytes_elements(items))
    array = tensor.to_numpy()
    with np.errstate(all="ignore"):
        if tensor.datatype == "BOOL":
            result = np.logical_not(array)
        elif array.dtype.kind == "f":
            result = array * array.dtype.type(2) - array.dtype.type(1)
        else:
            result = array + array.dtype.type(1)
    return Tensor.from_numpy(name, result, tensor.datatype)


def reference_model(request: InferRequest, name: str = "ref") -> InferResponse:
    """What a Triton model would answer: identity and an elementwise op per input; only the
    requested outputs (in the model's order, as Triton does), or all of them."""
    outputs: list[Tensor] = []
    for tensor in request.inputs:
        outputs.append(Tensor(f"{tensor.name}_ID", tensor.datatype, tensor.shape, tensor.data))
        outputs.append(_op(tensor))
    wanted = {o.name for o in request.outputs}
    if wanted:
        outputs = [t for t in outputs if t.name in wanted]
    return InferResponse(name, "1", request.id, tuple(outputs))


# ---------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Schema:
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, datatype, non-batch dims


@st.composite
def schemas(draw: st.DrawFn) -> Schema:
    names = draw(st.lists(st.sampled_from(["A", "B", "C"]), min_size=1, max_size=2,
                          unique=True))
    return Schema(tuple((n, draw(st.sampled_from(TYPES)),
                         tuple(draw(st.lists(st.integers(1, 3), max_size=2))))
                        for n in names))


@st.composite
def tensor_of(draw: st.DrawFn, name: str, datatype: str, shape: tuple[int, ...]) -> Tensor:
    count = math.prod(shape)
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=5), min_size=count, max_size=count))
        return Tensor(name, datatype, shape, join_bytes_elements(items))
    dtype = FIXED_NUMPY[datatype]
    elements = (st.floats(width=dtype.itemsize * 8, allow_nan=False,  # type: ignore[arg-type]
                          allow_infinity=False) if dtype.kind == "f" else None)
    return Tensor.from_numpy(name, draw(hnp.arrays(dtype, shape, elements=elements)), datatype)


OUTPUT_BINARY: st.SearchStrategy[Parameters] = st.sampled_from(
    [{}, {"binary_data": True}, {"binary_data": False}])


@st.composite
def members(draw: st.DrawFn, schema: Schema, max_rows: int = 3) -> InferRequest:
    """One caller's request for a model with ``schema``: own rows, id, output selection and
    encoding wishes."""
    rows = draw(st.integers(1, max_rows))
    inputs = tuple(draw(tensor_of(n, dt, (rows, *dims))) for n, dt, dims in schema.inputs)
    all_outputs = [f"{n}{suffix}" for n, _, _ in schema.inputs for suffix in ("_ID", "_OP")]
    chosen = draw(st.sampled_from([[], all_outputs[:1], all_outputs[::-1]]))
    outputs = tuple(RequestedOutput(n, draw(OUTPUT_BINARY)) for n in chosen)
    params: dict[str, Any] = {}
    if draw(st.booleans()):
        params["binary_data_output"] = True
    return InferRequest(draw(st.sampled_from(["", "a", "b-2", "id"])), params, inputs, outputs)


def key_of(request: InferRequest, max_batch: int = 64, model: ModelKey = MODEL) -> BatchKey:
    key = compatibility_key(model, request, model_max_batch_size=max_batch)
    assert isinstance(key, BatchKey), key
    return key


def expected_reply(member: InferRequest) -> InferResponse:
    return reference_model(member)


def decode_reply(reply: HttpReply) -> tuple[InferResponse, set[str]]:
    """The response in a reply, and the names of the outputs sent in binary."""
    response = parse_infer_response(reply.body, header_length_of(list(reply.headers)))
    doc = _header_doc(reply)
    binary = {o["name"] for o in doc["outputs"] if "binary_data_size" in o.get("parameters", {})}
    return response, binary


def _header_doc(reply: HttpReply) -> Any:
    length = header_length_of(list(reply.headers))
    # Like Triton, JSON BYTES elements that are not UTF-8 are written as raw bytes.
    return json.loads(reply.body[:length].decode("utf-8", "surrogateescape"))


def assert_reply_for(member: InferRequest, reply: HttpReply) -> None:
    assert reply.status == 200, reply.body
    response, binary = decode_reply(reply)
    assert response == expected_reply(member)
    assert binary == {t.name for t in response.outputs
                      if member.wants_binary(t.name, t.datatype)}
    assert _header_doc(reply).get("id", "") == member.id  # echoed, omitted when empty


# ---------------------------------------------------------------- compatibility keys


def _req(shape: tuple[int, ...] = (2, 3), datatype: str = "FP32", **params: Any
         ) -> InferRequest:
    count = math.prod(shape)
    data = b"\x01\x00\x00\x00x" * count if datatype == "BYTES" else (
        b"\0" * 4 * count if datatype == "FP32" else b"\0" * 8 * count)
    return InferRequest("", dict(params), (Tensor("X", datatype, shape, data),))


@pytest.mark.parametrize(("request_", "max_batch", "decoupled", "reason"), [
    (_req(), 0, False, "max_batch_size 0"),
    (_req(), 8, True, "decoupled"),
    (_req(sequence_id=7), 8, False, "sequence request"),
    (_req(sequence_id="s1"), 8, False, "sequence request"),
    (_req(shape=()), 8, False, "batch dimension"),
    (_req(shape=(0, 3)), 8, False, "batch dimension"),
    (_req(shape=(9, 1)), 8, False, "larger than the model's max_batch_size"),
    (InferRequest("", {}, ()), 8, False, "batch dimension"),
    (InferRequest("", {}, (Tensor("X", "FP32", (1,), b"\0" * 4),
                           Tensor("Y", "FP32", (2,), b"\0" * 8))), 8, False, "batch dimension"),
    (InferRequest("", {}, (Tensor("X", "FP32", (1,), b"\0" * 4),) * 2), 8, False, "duplicate"),
])
def test_never_batchable(request_: InferRequest, max_batch: int, decoupled: bool,
                         reason: str) -> None:
    key = compatibility_key(MODEL, request_, model_max_batch_size=max_batch, decoupled=decoupled)
    assert isinstance(key, NotBatchable) and reason in key.reason


def test_shared_memory_and_raw_bodies_are_not_batchable_from_a_peek() -> None:
    header = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 2],
                                     "parameters": {"shared_memory_region": "r"}}]}).encode()
    shm = compatibility_key(MODEL, peek_infer_header(header, None), model_max_batch_size=8)
    raw = compatibility_key(MODEL, peek_infer_header(b"\0" * 8, 0), model_max_batch_size=8)
    assert isinstance(shm, NotBatchable) and "shared-memory" in shm.reason
    assert isinstance(raw, NotBatchable) and "raw" in raw.reason


def test_key_from_peek_equals_key_from_full_parse() -> None:
    request = InferRequest("q", {"priority": 1, "binary_data_output": True},
                           (Tensor("X", "FP32", (2, 3), b"\0" * 24, {"p": 1}),
                            Tensor("S", "BYTES", (2,), b"\1\0\0\0a" * 2)),
                           (RequestedOutput("Y", {"binary_data": True}),))
    encoded = encode_infer_request(request)
    from_peek = compatibility_key(MODEL, peek_infer_header(encoded.body, encoded.header_length),
                                  model_max_batch_size=8)
    assert from_peek == key_of(request)


def test_prepare_peeks_first_and_decodes_only_batchable_bodies() -> None:
    request = InferRequest("q", {}, (Tensor("X", "FP32", (2, 3), b"\0" * 24),))
    wire = encode_infer_request(request)
    prepared = prepare(MODEL, wire.body, wire.header_length, model_max_batch_size=8)
    assert prepared == (request, key_of(request))
    # A sequence request is turned away by the peek: its (broken) tail is never decoded.
    def broken(parameters: dict[str, Any]) -> bytes:  # binary_data_size without the bytes
        return json.dumps({"parameters": parameters, "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [1],
             "parameters": {"binary_data_size": 4}}]}).encode()

    seq = broken({"sequence_id": 5})
    refused = prepare(MODEL, seq, len(seq), model_max_batch_size=8)
    assert refused == NotBatchable("sequence request")
    plain = broken({})
    with pytest.raises(BadRequest, match="runs past the end"):
        prepare(MODEL, plain, len(plain), model_max_batch_size=8)


def test_replies_for_decodes_a_compressed_answer() -> None:
    members_ = [_req((1, 3)), _req((2, 3))]
    answer = encode_infer_response(reference_model(merge(members_)), binary_outputs=True)
    headers = [("Content-Encoding", "gzip"),
               ("Inference-Header-Content-Length", str(answer.header_length))]
    replies = replies_for(members_, 200, headers, gzip.compress(answer.body))
    for member, reply in zip(members_, replies, strict=True):
        assert_reply_for(member, reply)


@pytest.mark.parametrize(("a", "b", "same"), [
    (_req((1, 3)), _req((4, 3)), True),                       # batch dim may differ
    (_req((1, 3)), _req((1, 4)), False),                      # non-batch dim differs
    (_req(datatype="FP32"), _req(datatype="FP64"), False),
    (_req(priority=1), _req(priority=2), False),
    (_req(binary_data_output=True), _req(), True),            # encoding wish only
    (_req(), _req(timeout=100), False),
])
def test_key_equality(a: InferRequest, b: InferRequest, same: bool) -> None:
    assert (key_of(a) == key_of(b)) is same


def test_key_distinguishes_models_inputs_and_outputs_but_not_output_encoding() -> None:
    base = _req()
    assert compatibility_key(ModelKey("ref", "2"), base, model_max_batch_size=8) != key_of(base)
    renamed = InferRequest("", {}, (Tensor("Z", "FP32", (2, 3), b"\0" * 24),))
    assert key_of(renamed) != key_of(base)
    want_y = InferRequest("", {}, base.inputs, (RequestedOutput("Y"),))
    want_y_bin = InferRequest("", {}, base.inputs, (RequestedOutput("Y", {"binary_data": True}),))
    want_z = InferRequest("", {}, base.inputs, (RequestedOutput("Z"),))
    assert key_of(want_y) == key_of(want_y_bin)
    assert len({key_of(base), key_of(want_y), key_of(want_z)}) == 3
    assert key_of(base).infer_path == "/v2/models/ref/infer"
    assert BatchKey("m", "3", (), "", None).infer_path == "/v2/models/m/versions/3/infer"


# ---------------------------------------------------------------- planning


def _fake_key(i: int) -> BatchKey:
    return BatchKey(f"m{i}", "", (), "", None)


@PROPS
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(0, 300)),
                max_size=40),
       st.integers(1, 8), st.integers(1, 600))
def test_plans_respect_limits_and_keys(items: list[tuple[int, int, int]], max_batch: int,
                                       max_bytes: int) -> None:
    pending = [PendingItem(_fake_key(k), rows, size) for k, rows, size in items]
    plans = plan_batches(pending, max_batch, max_bytes)
    seen = sorted(i for p in plans for i in p.members)
    assert seen == list(range(len(pending)))  # every request once
    last_of_key: dict[BatchKey, int] = {}
    for index, plan in enumerate(plans):
        assert all(pending[i].key == plan.key for i in plan.members)
        assert list(plan.members) == sorted(plan.members)
        assert plan.rows == sum(pending[i].rows for i in plan.members)
        assert plan.size_bytes == sum(pending[i].size_bytes for i in plan.members)
        if len(plan.members) > 1:
            assert plan.rows <= max_batch and plan.size_bytes <= max_bytes
        if plan.rows >= max_batch or plan.size_bytes >= max_bytes:
            assert plan.is_ready
        last_of_key[plan.key] = index
    for index, plan in enumerate(plans):
        if last_of_key[plan.key] != index:
            assert plan.is_ready  # only the newest batch of a key may still gather
    # Arrival order is kept within a key.
    for key in last_of_key:
        order = [i for p in plans if p.key == key for i in p.members]
        assert order == sorted(order)


def test_plan_table() -> None:
    a, b = _fake_key(0), _fake_key(1)
    plans = plan_batches([PendingItem(a, 2, 10), PendingItem(b, 1, 10), PendingItem(a, 2, 10),
                          PendingItem(a, 1, 10), PendingItem(a, 9, 10)], 4, 1000)
    assert [(p.key, p.members, p.is_ready) for p in plans] == [
        (a, (0, 2), True), (b, (1,), False), (a, (3,), True), (a, (4,), True)]
    by_bytes = plan_batches([PendingItem(a, 1, 60), PendingItem(a, 1, 60)], 8, 100)
    assert [p.members for p in by_bytes] == [(0,), (1,)]


# ---------------------------------------------------------------- when a batch closes

RULE = CloseRule(max_batch_size=8, max_bytes=1 << 20, max_delay_s=0.002)
BUSY = InstanceView(free=0, in_flight=1, service_time_s=0.010)
FIVE_BACK_AT_1 = InstanceView(free=1, in_flight=0, answered_at=1.0, answered=5,
                              service_time_s=0.010)
ONE_BACK_AT_1 = InstanceView(free=1, in_flight=0, answered_at=1.0, answered=1,
                             service_time_s=0.010)
IDLE = InstanceView(free=1, in_flight=0)
ONE_FREE_OF_TWO = InstanceView(free=1, in_flight=1, answered_at=0.5, answered=3,
                               service_time_s=0.010)


def _w(n: int, at: float = 0.0, rows: int = 1, priority: int = 1,
       deadline: float = float("inf")) -> list[Waiting]:
    return [Waiting(rows, 16, at, priority, deadline) for _ in range(n)]


# (what, waiting members of one key, view, rule, now, expected closes [(members, reason)],
#  expected wake-up)
CLOSE_TABLE: list[tuple[str, list[Waiting], InstanceView, CloseRule, float,
                        list[tuple[int, str]], float | None]] = [
    ("a lone request to an idle fleet goes at once",
     _w(1, at=5.0), IDLE, RULE, 5.0, [(1, "idle")], None),
    ("idle, but a batch of five came back 1 ms ago: its callers get max_delay to return",
     _w(1, at=1.001), FIVE_BACK_AT_1, RULE, 1.001, [], 1.002),
    ("... and then the batch goes (nothing came in flight meanwhile)",
     _w(5, at=1.001), FIVE_BACK_AT_1, RULE, 1.002, [(5, "idle")], None),
    ("a batch of one came back 1 ms ago (a sequential caller): at once",
     _w(1, at=1.001), ONE_BACK_AT_1, RULE, 1.001, [(1, "idle")], None),
    ("every instance busy: the batch is held past max_delay",
     _w(3, at=0.0), BUSY, RULE, 0.005, [], 0.102),
    ("held, up to max_delay + max(4 service times, 100 ms) (a count that never drops)",
     _w(3, at=0.0), BUSY, RULE, 0.103, [(3, "held")], None),
    ("... 4 service times when that is longer",
     _w(3, at=0.0), InstanceView(0, 1, service_time_s=0.5), RULE, 1.0, [], 2.002),
    ("a full batch goes at once, busy or not",
     _w(8, at=0.0), BUSY, RULE, 0.0, [(8, "full")], None),
    ("full batches go, the rest is held",
     _w(11, at=0.0), BUSY, RULE, 0.0, [(8, "full")], 0.102),
    ("the earliest deadline minus 50 ms (at least) sends a held batch",
     [*_w(2), *_w(1, deadline=0.060)], BUSY, RULE, 0.010, [(3, "deadline")], None),
    ("... not before: wake up at that moment",
     [*_w(2), *_w(1, deadline=0.060)], BUSY, RULE, 0.005, [], 0.010),
    ("... or minus 2 service times when that is more",
     [*_w(2), *_w(1, deadline=1.5)], InstanceView(0, 1, service_time_s=0.5), RULE, 0.0, [],
     0.5),
    ("an instance free while others run: max_delay from the first member (or the return)",
     _w(2, at=1.0), ONE_FREE_OF_TWO, RULE, 1.001, [], 1.002),
    ("... then the timer",
     _w(2, at=1.0), ONE_FREE_OF_TWO, RULE, 1.002, [(2, "timer")], None),
    ("just in time: the instance runs a batch that ends at 10.000; the place behind it is "
     "free: the batch fills until 1.5 ms before (at least), not max_delay",
     _w(2, at=9.990), InstanceView(1, 1, service_time_s=0.010, frees_at=10.0), RULE, 9.992,
     [], 9.9985),
    ("... then it goes, to be at the worker when the instance frees",
     _w(4, at=9.990), InstanceView(1, 1, service_time_s=0.010, frees_at=10.0), RULE, 9.9985,
     [(4, "held")], None),
    ("... or 15 % of a service time before, when that is more",
     _w(2, at=9.9), InstanceView(1, 1, service_time_s=0.1, frees_at=10.0), RULE, 9.95, [],
     9.985),
    ("... an end already due (or past): at once",
     _w(2, at=9.999), InstanceView(1, 1, service_time_s=0.010, frees_at=10.0), RULE, 9.999,
     [(2, "held")], None),
    ("... a long execution ahead: held, bounded like a held batch",
     _w(2, at=0.0), InstanceView(1, 1, service_time_s=0.010, frees_at=5.0), RULE, 0.05, [],
     0.102),
    ("wait_for_instance off: the timer alone, busy or not",
     _w(2, at=0.0), BUSY, CloseRule(8, 1 << 20, 0.002, wait_for_instance=False), 0.002,
     [(2, "timer")], None),
    ("flush_when_idle off: an idle fleet waits max_delay",
     _w(1, at=5.0), IDLE, CloseRule(8, 1 << 20, 0.002, send_when_idle=False), 5.0, [], 5.002),
    ("no eligible instance and nothing in flight: nothing will wake it, send",
     _w(2, at=0.0), InstanceView(free=0, in_flight=0), RULE, 0.0, [(2, "idle")], None),
    ("the byte cap makes a batch full",
     [Waiting(1, 600_000, 0.0), Waiting(1, 600_000, 0.0)], BUSY, RULE, 0.0,
     [(1, "full")], 0.102),
]


@pytest.mark.parametrize(("what", "waiting", "view", "rule", "now", "closes", "wake_at"),
                         CLOSE_TABLE, ids=[row[0] for row in CLOSE_TABLE])
def test_close_table(what: str, waiting: list[Waiting], view: InstanceView, rule: CloseRule,
                     now: float, closes: list[tuple[int, str]], wake_at: float | None) -> None:
    key = _fake_key(0)
    plan = plan_closes({key: waiting}, view, rule, now)
    assert [(len(c.members), c.reason) for c in plan.closes] == closes
    assert all(c.key == key for c in plan.closes)
    if wake_at is None:
        assert plan.wake_at is None
    else:
        assert plan.wake_at == pytest.approx(wake_at)


def test_priority_order_inside_a_batch() -> None:
    """More members than fit: the most urgent go in the first batch, arrival order next."""
    waiting = [Waiting(1, 16, at, priority) for at, priority in
               [(0.000, 2), (0.001, 2), (0.002, 0), (0.003, 1), (0.004, 0)]]
    plan = plan_closes({_fake_key(0): waiting}, BUSY, CloseRule(3, 1 << 20, 0.002), 0.004)
    assert [(c.members, c.reason) for c in plan.closes] == [((2, 4, 3), "full")]
    assert plan.wake_at == pytest.approx(0.102)  # members 0 and 1 are held


def test_a_freed_instance_goes_to_the_most_urgent_then_the_largest_batch() -> None:
    a, b, c = _fake_key(0), _fake_key(1), _fake_key(2)
    open_ = {a: _w(2, at=0.0), b: _w(5, at=0.001), c: _w(1, at=0.002, priority=0)}
    view = InstanceView(free=2, in_flight=1, service_time_s=0.010)
    plan = plan_closes(open_, view, RULE, 0.010)
    assert [(cl.key, len(cl.members), cl.reason) for cl in plan.closes] == [
        (c, 1, "timer"), (b, 5, "timer")]
    assert plan.wake_at == pytest.approx(0.102)  # a is held: both free instances are taken


def test_instance_view_counts_batches_not_yet_at_a_worker() -> None:
    # Two instances, one busy with another client's request, one batch of ours on its way.
    view = instance_view(FleetCounts(free=1, busy=1, total=2), own_in_flight=1,
                         answered_at=3.0, answered=4, service_time_s=0.01)
    assert view == InstanceView(free=1, in_flight=1, answered_at=3.0, answered=4,
                                service_time_s=0.01)
    view = instance_view(FleetCounts(free=2, busy=0, total=2, service_time_s=0.02),
                         own_in_flight=2, answered_at=3.0, answered=4, service_time_s=0.01)
    assert (view.free, view.in_flight, view.service_time_s) == (0, 2, 0.02)
    assert instance_view(None, own_in_flight=0, answered_at=0.0, answered=0,
                         service_time_s=0.0).free > 1000


@pytest.mark.parametrize(("counts", "own", "oldest_sent", "answered_at", "execution_s",
                          "frees_at"), [
    # one instance (two places), our batch sent at 1.0 executing: ends at 1.0 + 10 ms
    (FleetCounts(free=1, busy=1, total=2), 1, 1.0, 0.5, 0.010, 1.010),
    # it waited behind another that came back at 1.004: it started then
    (FleetCounts(free=1, busy=1, total=2), 1, 1.0, 1.004, 0.010, 1.014),
    # an instance is idle (two instances, one busy): no just-in-time, the timer applies
    (FleetCounts(free=3, busy=1, total=4), 1, 1.0, 0.5, 0.010, None),
    # busy with other clients' requests only, or nothing measured: unknown
    (FleetCounts(free=1, busy=1, total=2), 0, None, 0.5, 0.010, None),
    (FleetCounts(free=1, busy=1, total=2), 1, 1.0, 0.5, 0.0, None),
])
def test_instance_view_knows_when_the_busy_instance_frees(
        counts: FleetCounts, own: int, oldest_sent: float | None, answered_at: float,
        execution_s: float, frees_at: float | None) -> None:
    view = instance_view(counts, own_in_flight=own, answered_at=answered_at, answered=1,
                         service_time_s=0.01, oldest_sent=oldest_sent,
                         execution_s=execution_s)
    assert view.frees_at == (pytest.approx(frees_at) if frees_at is not None else None)


@PROPS
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4), st.integers(0, 2),
                          st.floats(0, 0.05)), max_size=30),
       st.integers(0, 3), st.integers(0, 3), st.floats(0, 0.1), st.booleans())
def test_plan_closes_properties(items: list[tuple[int, int, int, float]], free: int,
                                in_flight: int, now: float, wait: bool) -> None:
    """Every member is sent at most once; no merged batch exceeds the limits; full batches
    always go; while every instance is busy only full, due or long-held batches go."""
    open_: dict[BatchKey, list[Waiting]] = {}
    for k, rows, priority, at in items:
        open_.setdefault(_fake_key(k), []).append(Waiting(rows, 16 * rows, at, priority))
    rule = CloseRule(6, 1 << 20, 0.002, wait_for_instance=wait)
    view = InstanceView(free, in_flight, answered_at=0.0, answered=3, service_time_s=0.01)
    plan = plan_closes(open_, view, rule, now)
    for key, waiting in open_.items():
        sent = [i for c in plan.closes if c.key == key for i in c.members]
        assert len(sent) == len(set(sent)) and set(sent) <= set(range(len(waiting)))
        if sum(w.rows for w in waiting) >= rule.max_batch_size:
            assert any(c.key == key and c.reason == "full" for c in plan.closes)
    for close in plan.closes:
        rows = sum(open_[close.key][i].rows for i in close.members)
        if len(close.members) > 1:
            assert rows <= rule.max_batch_size
        if wait and free == 0 and in_flight > 0:
            assert close.reason in ("full", "held", "deadline")
    if plan.wake_at is not None:
        assert plan.wake_at > now


# ---------------------------------------------------------------- merge and split


@PROPS
@given(st.data())
def test_merge_then_split_equals_per_request_answers(data: st.DataObject) -> None:
    schema = data.draw(schemas())
    group = data.draw(st.lists(members(schema), min_size=1, max_size=5))
    for key in {key_of(m) for m in group}:
        same = [m for m in group if key_of(m) == key]
        merged = merge(same)
        assert merged.inputs[0].shape[0] == sum(m.inputs[0].shape[0] for m in same)
        # The merged request survives the wire in binary form.
        wire = encode_infer_request(merged)
        assert parse_infer_request(wire.body, wire.header_length) == merged
        parts = split(reference_model(merged), same)
        for member, part in zip(same, parts, strict=True):
            assert part == expected_reply(member)
            assert_reply_for(member, render_response(member, part))


def test_split_rejects_responses_that_do_not_fit_the_batch() -> None:
    a, b = _req((1, 3)), _req((2, 3))
    good = reference_model(merge([a, b]))
    short = InferResponse("ref", "1", "", (Tensor("X_ID", "FP32", (2, 3), b"\0" * 24),))
    with pytest.raises(UpstreamError, match="the batch has 3 rows"):
        split(short, [a, b])
    truncated = InferResponse("ref", "1", "", (Tensor("X_ID", "FP32", (3, 3), b"\0" * 20),))
    with pytest.raises(UpstreamError, match="20 bytes"):
        split(truncated, [a, b])
    texts = InferResponse("ref", "1", "", (Tensor("S", "BYTES", (3,), b"\1\0\0\0a" * 2),))
    with pytest.raises(UpstreamError, match="2 elements"):
        split(texts, [a, b])
    assert len(split(good, [a, b])) == 2
    with pytest.raises(BadRequest, match="differs"):
        merge([a, _req((1, 4))])


# ---------------------------------------------------------------- the async Batcher


class RefUpstream:
    """An in-process stand-in for a worker: decodes the merged body like Triton would, runs
    the reference model and answers in binary. Records every batch it saw."""

    def __init__(self, max_batch: int = 64, max_bytes: int = 1 << 30) -> None:
        self.max_batch = max_batch
        self.max_bytes = max_bytes
        self.batches: list[InferRequest] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
        if self.gate is not None:
            await self.gate.wait()
        request = parse_infer_request(body, header_length_of(headers))
        assert dict(headers)[b"accept-encoding"] == b"identity"
        self.batches.append(request)
        rows = request.inputs[0].shape[0]
        if rows > self.max_batch:
            return 400, {}, b'{"error": "batch too large"}'
        response = reference_model(request, key.model)
        binary = {t.name for t in response.outputs if request.wants_binary(t.name)}
        encoded = encode_infer_response(response, binary_outputs=binary)
        return 200, [(k.decode(), v.decode()) for k, v in encoded.headers()], encoded.body


def _batcher(upstream: Callable[[BatchKey, bytes, Headers, BatchMeta], Any], **kw: Any) -> Batcher:
    options: dict[str, Any] = {"max_batch_size": 8, "max_delay_ms": 60_000.0,
                               "max_bytes": 1 << 20}
    options.update(kw)
    return Batcher(upstream, **options)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@PROPS
@given(st.data(), st.integers(1, 8), st.integers(64, 4096), st.booleans())
def test_batcher_answers_every_member_as_if_alone(data: st.DataObject, max_batch: int,
                                                  max_bytes: int, by_timer: bool) -> None:
    schemas_ = data.draw(st.lists(schemas(), min_size=1, max_size=2))
    group = [data.draw(members(data.draw(st.sampled_from(schemas_))))
             for _ in range(data.draw(st.integers(1, 10)))]
    order = data.draw(st.permutations(range(len(group))))
    records: list[BatchRecord] = []

    async def scenario() -> list[HttpReply]:
        upstream = RefUpstream()
        batcher = _batcher(upstream, max_batch_size=max_batch, max_bytes=max_bytes,
                           max_delay_ms=1.0 if by_timer else 60_000.0, on_batch=records.append)
        tasks = {}
        for i in order:
            tasks[i] = asyncio.create_task(batcher.submit(group[i], key_of(group[i])))
            if data.draw(st.booleans(), label="yield"):
                await asyncio.sleep(0)
        await _settle()
        if not by_timer:
            batcher.flush()
        replies = await asyncio.wait_for(asyncio.gather(*(tasks[i] for i in range(len(group)))),
                                         10)
        assert len(records) == len(upstream.batches)
        for record in records:  # limits hold for every batch that merged anything
            if record.members > 1:
                assert record.rows <= max_batch and record.size_bytes <= max_bytes
        wire_rows = sorted(m.inputs[0].shape[0] for m in upstream.batches)
        assert wire_rows == sorted(r.rows for r in records)
        stats = batcher.statistics()
        assert stats.requests_sent == len(group) and stats.waiting_requests == 0
        assert stats.open_batches == 0 and stats.batches_sent == len(upstream.batches)
        await batcher.aclose()
        return replies

    replies = asyncio.run(scenario())
    for member, reply in zip(group, replies, strict=True):
        assert_reply_for(member, reply)
    for record in records:
        assert record.fill_ratio > 0 and record.members >= 1


def _rows(n: int, value: float = 1.0, rid: str = "", **params: Any) -> InferRequest:
    array = np.full((n, 2), value, dtype=np.float32)
    return InferRequest(rid, dict(params), (Tensor.from_numpy("A", array),))


async def test_flushes_when_full_without_waiting_for_the_timer() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_batch_size=4)
    requests_ = [_rows(1, i, f"r{i}") for i in range(4)]
    replies = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(r, key_of(r)) for r in requests_)), 5)
    for r, reply in zip(requests_, replies, strict=True):
        assert_reply_for(r, reply)
    stats = batcher.statistics()
    assert stats.flushes["full"] == 1 and stats.batches_sent == 1
    assert stats.mean_fill_ratio == 1.0 and dict(stats.size_counts)[4] == 1
    assert [m.inputs[0].shape for m in upstream.batches] == [(4, 2)]


async def test_timer_started_by_first_member_sends_a_partial_batch() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_batch_size=8, max_delay_ms=5.0)
    a, b = _rows(1, 1.0, "a"), _rows(2, 2.0, "b")
    replies = await asyncio.wait_for(
        asyncio.gather(batcher.submit(a, key_of(a)), batcher.submit(b, key_of(b))), 5)
    assert_reply_for(a, replies[0])
    assert_reply_for(b, replies[1])
    stats = batcher.statistics()
    assert stats.flushes["timer"] == 1 and stats.rows_sent == 3
    assert stats.mean_fill_ratio == pytest.approx(3 / 8)


async def test_flush_due_follows_the_injected_clock() -> None:
    now = [100.0]
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_delay_ms=1000.0, clock=lambda: now[0])
    first = asyncio.create_task(batcher.submit(_rows(1), key_of(_rows(1))))
    await _settle()
    now[0] = 100.6
    second = asyncio.create_task(batcher.submit(_rows(1, 2.0), key_of(_rows(1))))
    await _settle()
    batcher.flush_due(100.9)
    await _settle()
    assert not first.done() and batcher.statistics().open_batches == 1
    batcher.flush_due(101.0)  # the first member's deadline, not the second's
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert len(upstream.batches) == 1 and upstream.batches[0].inputs[0].shape == (2, 2)


async def test_incompatible_requests_travel_in_separate_batches() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream)
    reqs = [_rows(1), _rows(1, priority=1), _rows(2), _rows(1, sequence_id=0)]
    tasks = [asyncio.create_task(batcher.submit(r, key_of(r))) for r in reqs]
    await _settle()
    batcher.flush()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    # Only the two requests without parameters share a batch (1 + 2 rows).
    assert sorted(m.inputs[0].shape[0] for m in upstream.batches) == [1, 1, 3]


@pytest.mark.parametrize(("answer", "status", "message"), [
    ((500, {}, b'{"error": "model crashed"}'), 500, "model crashed"),
    ((503, {}, b"<html>busy</html>"), 503, "upstream answered 503: <html>busy</html>"),
    (UpstreamError("connection refused"), 502, "connection refused"),
    (RuntimeError("boom"), 502, "RuntimeError: boom"),
    ((200, {}, b"not json"), 502, "bad batched response"),
])
async def test_an_error_fans_out_to_every_member(answer: UpstreamReply | Exception, status: int,
                                                 message: str) -> None:
    async def failing(key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
        if isinstance(answer, Exception):
            raise answer
        return answer

    batcher = _batcher(failing, max_batch_size=3)
    reqs = [_rows(1, i, f"id{i}") for i in range(3)]
    replies = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(r, key_of(r)) for r in reqs)), 5)
    assert len({(r.status, r.body) for r in replies}) == 1
    assert replies[0].status == status
    assert message in json.loads(replies[0].body)["error"]
    assert batcher.statistics().failed_batches == 1


async def test_a_cancelled_member_does_not_break_the_batch() -> None:
    upstream = RefUpstream()
    upstream.gate = asyncio.Event()
    batcher = _batcher(upstream, max_batch_size=3)
    reqs = [_rows(1, i, f"id{i}") for i in range(3)]
    tasks = [asyncio.create_task(batcher.submit(r, key_of(r))) for r in reqs]
    await _settle()  # the batch is full and in flight, blocked in send
    tasks[1].cancel()
    await _settle()
    upstream.gate.set()
    done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert isinstance(done[1], asyncio.CancelledError)
    assert_reply_for(reqs[0], done[0])  # type: ignore[arg-type]
    assert_reply_for(reqs[2], done[2])  # type: ignore[arg-type]
    stats = batcher.statistics()
    assert stats.cancelled_requests == 1 and stats.waiting_requests == 0


async def test_a_member_cancelled_before_the_flush_is_withdrawn() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream)
    reqs = [_rows(1, i, f"id{i}") for i in range(3)]
    tasks = [asyncio.create_task(batcher.submit(r, key_of(r))) for r in reqs]
    await _settle()
    tasks[0].cancel()
    await _settle()
    batcher.flush()
    replies = await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), 5)
    assert upstream.batches[0].inputs[0].shape == (2, 2)
    assert_reply_for(reqs[1], replies[0])
    assert_reply_for(reqs[2], replies[1])
    lone = asyncio.create_task(batcher.submit(reqs[0], key_of(reqs[0])))
    await _settle()
    lone.cancel()
    await _settle()
    assert batcher.statistics().open_batches == 0  # an emptied batch is gone, timer too


async def test_a_batch_whose_callers_all_left_is_not_sent() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_batch_size=2)
    tasks = [asyncio.create_task(batcher.submit(_rows(1), key_of(_rows(1)))) for _ in range(2)]
    await asyncio.sleep(0)  # both joined; the full batch is dispatched but not started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _settle()
    stats = batcher.statistics()
    assert upstream.batches == [] and stats.cancelled_requests == 2
    assert stats.waiting_requests == 0 and stats.in_flight_batches == 0


async def test_bounded_open_batches_and_waiting_requests() -> None:
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_open_batches=1, max_waiting_requests=2)
    a, b = _rows(1), _rows(1, priority=3)
    first = asyncio.create_task(batcher.submit(a, key_of(a)))
    await _settle()
    assert not batcher.can_accept(key_of(b))
    with pytest.raises(Overloaded, match="batcher full"):
        await batcher.submit(b, key_of(b))
    second = asyncio.create_task(batcher.submit(a, key_of(a)))
    await _settle()
    with pytest.raises(Overloaded):
        await batcher.submit(a, key_of(a))
    assert batcher.statistics().rejected_requests == 2
    await batcher.aclose()  # sends what is open
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    with pytest.raises(Overloaded, match="closed"):
        await batcher.submit(a, key_of(a))


async def test_aclose_gives_up_on_a_hung_upstream() -> None:
    upstream = RefUpstream()
    upstream.gate = asyncio.Event()  # never set
    batcher = _batcher(upstream)
    task = asyncio.create_task(batcher.submit(_rows(1), key_of(_rows(1))))
    await _settle()
    await batcher.aclose(timeout_s=0.01)
    reply = await asyncio.wait_for(task, 5)
    assert reply.status == 502 and b"batcher closed" in reply.body
    assert "in_flight=0" in repr(batcher)


def test_from_config_takes_the_smaller_batch_limit() -> None:
    async def never(key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
        raise AssertionError

    config = BatchingConfig(enabled=True, max_batch_size=16, max_delay_ms=3.0, max_bytes=1000)
    batcher = Batcher.from_config(config, never, model_max_batch_size=8)
    assert (batcher.max_batch_size, batcher.max_delay_s, batcher.max_bytes) == (8, 0.003, 1000)
    loose = Batcher.from_config(BatchingConfig(enabled=True), never, model_max_batch_size=32)
    assert loose.max_batch_size == 32


# ---------------------------------------------------------------- against a real Triton

# gateway.triton_worker's models: identity (optional inputs INPUT_<T> [-1, -1] → OUTPUT_<T>,
# max_batch_size 8), add_sub (INPUT0/1 FP32 [-1, 16] → OUTPUT0/1), strings (TEXT BYTES [-1, 1]
# → UPPER BYTES, LENGTH INT64).
IDENTITY_TYPES = ("FP32", "FP16", "INT64", "BOOL", "BYTES")
TRITON_MAX_BATCH = 8


@pytest.fixture(scope="module")
def triton_url() -> Iterator[str]:
    """One real Triton: gateway.local's fleet of one gateway.triton_worker (PyTriton's
    tritonserver with the demo models), stopped without leftovers."""
    pytest.importorskip("pytriton")
    from gateway.tools.local import TritonFleet

    with TritonFleet(1, service_times_ms=[0.0], startup_timeout_s=150.0) as fleet:
        yield fleet.worker(0).http_url


@dataclass(frozen=True)
class Call:
    model: str
    request: InferRequest
    binary_inputs: bool


def _text_tensor(draw: st.DrawFn, name: str, shape: tuple[int, ...]) -> Tensor:
    # Triton's JSON form of BYTES is a string: keep to text without NUL for JSON callers.
    count = math.prod(shape)
    words = draw(st.lists(st.text("abcXYZ é", max_size=4), min_size=count, max_size=count))
    return Tensor(name, "BYTES", shape, join_bytes_elements(w.encode() for w in words))


@st.composite
def triton_calls(draw: st.DrawFn) -> list[Call]:
    """Callers of one model with random rows, ids, output choices and encodings."""
    model = draw(st.sampled_from(["identity", "identity", "add_sub", "strings"]))
    if model == "identity":
        types = draw(st.lists(st.sampled_from(IDENTITY_TYPES), min_size=1, max_size=3,
                              unique=True))
        spec = [(f"INPUT_{t}", t, draw(st.integers(1, 3))) for t in types]
        outputs = [f"OUTPUT_{t}" for t in types]
    elif model == "add_sub":
        spec, outputs = [("INPUT0", "FP32", 16), ("INPUT1", "FP32", 16)], ["OUTPUT0", "OUTPUT1"]
    else:
        spec, outputs = [("TEXT", "BYTES", 1)], ["UPPER", "LENGTH"]
    calls = []
    for _ in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(1, 3))
        inputs = tuple(_text_tensor(draw, name, (rows, width)) if datatype == "BYTES"
                       else draw(tensor_of(name, datatype, (rows, width)))
                       for name, datatype, width in spec)
        chosen = draw(st.sampled_from([[], outputs, outputs[-1:]]))
        requested = tuple(RequestedOutput(n, draw(OUTPUT_BINARY)) for n in chosen)
        params: dict[str, Any] = {"binary_data_output": True} if draw(st.booleans()) else {}
        has_fp16 = any(t.datatype == "FP16" for t in inputs)
        if has_fp16:
            # Triton 2.51 has no JSON form for FP16 (it answers 400 to a JSON caller, where
            # the gateway would succeed): such callers use binary both ways.
            params["binary_data_output"] = True
            requested = tuple(RequestedOutput(o.name, {"binary_data": True}) for o in requested)
        calls.append(Call(model, InferRequest(draw(st.sampled_from(["", "x", "id-9"])), params,
                                              inputs, requested),
                          binary_inputs=has_fp16 or draw(st.booleans())))
    return calls


def _decoded(status: int, headers: httpx.Headers, body: bytes) -> tuple[int, Any]:
    if status != 200:
        return status, json.loads(body)
    reply = HttpReply(status, tuple((k.encode(), v.encode()) for k, v in headers.items()), body)
    return status, decode_reply(reply)


@pytest.mark.triton
@settings(max_examples=15, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(triton_calls())
def test_batched_through_real_triton_equals_one_by_one(triton_url: str,
                                                       calls: list[Call]) -> None:
    async def scenario() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]], int]:
        async with httpx.AsyncClient(base_url=triton_url, timeout=30) as client:
            alone = []
            for call in calls:
                encoded = encode_infer_request(call.request, binary=call.binary_inputs)
                r = await client.post(f"/v2/models/{call.model}/infer", content=encoded.body,
                                      headers=[(k.decode(), v.decode())
                                               for k, v in encoded.headers()])
                alone.append(_decoded(r.status_code, r.headers, r.content))

            async def send(key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
                r = await client.post(key.infer_path, content=body, headers=headers)
                return r.status_code, r.headers, r.content

            batcher = Batcher(send, max_batch_size=TRITON_MAX_BATCH, max_delay_ms=20.0,
                              max_bytes=1 << 20)

            async def one(call: Call) -> HttpReply:
                # The request as the gateway sees it: decoded from the caller's own bytes.
                encoded = encode_infer_request(call.request, binary=call.binary_inputs)
                request = parse_infer_request(encoded.body, encoded.header_length)
                key = compatibility_key(ModelKey(call.model), request,
                                        model_max_batch_size=TRITON_MAX_BATCH)
                assert isinstance(key, BatchKey)
                return await batcher.submit(request, key)

            replies = await asyncio.gather(*(one(c) for c in calls))
            batched = [_decoded(r.status, httpx.Headers([(k.decode(), v.decode())
                                                         for k, v in r.headers]), r.body)
                       for r in replies]
            sent = batcher.statistics().batches_sent
            await batcher.aclose()
            return alone, batched, sent

    alone, batched, sent = asyncio.run(scenario())
    assert batched == alone
    assert sent <= len(calls)


@pytest.mark.triton
def test_real_triton_batches_mixed_callers(triton_url: str) -> None:
    """A fixed scenario: six callers of add_sub, JSON and binary, merged into one request."""
    async def scenario() -> tuple[list[HttpReply], list[InferRequest], int]:
        async with httpx.AsyncClient(base_url=triton_url, timeout=30) as client:
            async def send(key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
                r = await client.post(key.infer_path, content=body, headers=headers)
                return r.status_code, r.headers, r.content

            batcher = Batcher(send, max_batch_size=64, max_delay_ms=60_000.0, max_bytes=1 << 20)
            reqs = []
            for i in range(6):
                a = np.full((i % 3 + 1, 16), float(i), dtype=np.float32)
                b = np.arange(16, dtype=np.float32)[None, :].repeat(i % 3 + 1, axis=0)
                outputs = (RequestedOutput("OUTPUT1", {"binary_data": i % 2 == 0}),) if i < 3 \
                    else ()
                params: dict[str, Any] = {"binary_data_output": True} if i == 4 else {}
                reqs.append(InferRequest(f"c{i}", params, (Tensor.from_numpy("INPUT0", a),
                                                           Tensor.from_numpy("INPUT1", b)),
                                         outputs))
            tasks = [asyncio.create_task(batcher.submit(r, key_of(r, 64, ModelKey("add_sub"))))
                     for r in reqs]
            await _settle()
            batcher.flush()
            replies = await asyncio.gather(*tasks)
            sent = batcher.statistics().batches_sent
            await batcher.aclose()
            return replies, reqs, sent

    replies, reqs, sent = asyncio.run(scenario())
    assert sent == 2  # two output selections → two keys
    for request, reply in zip(reqs, replies, strict=True):
        response, binary = decode_reply(reply)
        a, b = request.inputs[0].to_numpy(), request.inputs[1].to_numpy()
        got = {t.name: t.to_numpy() for t in response.outputs}
        assert response.id == request.id and response.model_name == "add_sub"
        if request.outputs:
            assert set(got) == {"OUTPUT1"}
        else:
            np.testing.assert_array_equal(got["OUTPUT0"], a + b)
        np.testing.assert_array_equal(got["OUTPUT1"], a - b)
        assert binary == {n for n in got if request.wants_binary(n)}



async def test_flush_when_idle_sends_a_lone_caller_at_once_and_gathers_under_load() -> None:
    upstream = RefUpstream()
    upstream.gate = asyncio.Event()
    batcher = _batcher(upstream, max_batch_size=8, max_delay_ms=60_000.0, flush_when_idle=True)
    first = asyncio.create_task(batcher.submit(_rows(1, 1.0, "a"), key_of(_rows(1))))
    await _settle()
    # Nothing was in flight: sent at once despite the 60 s window.
    assert batcher.statistics().flushes["idle"] == 1
    assert batcher.statistics().in_flight_batches == 1
    # While that batch is in flight, the next callers gather into one batch.
    rest = [asyncio.create_task(batcher.submit(_rows(1, float(i), f"r{i}"), key_of(_rows(1))))
            for i in range(3)]
    await _settle()
    assert batcher.statistics().open_batches == 1 and batcher.statistics().batches_sent == 1
    upstream.gate.set()
    await asyncio.wait_for(first, 5)
    batcher.flush()
    replies = await asyncio.wait_for(asyncio.gather(*rest), 5)
    assert [len(b.inputs[0].data) for b in upstream.batches] == [8, 24]  # 1 row, then 3
    assert all(r.status == 200 for r in replies)


async def test_merged_batch_carries_its_members_priority_and_deadline() -> None:
    """The batched path keeps each member's priority and deadline: the merged request goes
    with the most urgent member's priority and the latest member deadline."""
    seen: list[BatchMeta] = []
    upstream = RefUpstream()

    async def send(key: BatchKey, body: bytes, headers: Headers,
                   meta: BatchMeta) -> UpstreamReply:
        seen.append(meta)
        return await upstream(key, body, headers, meta)

    batcher = _batcher(send, max_batch_size=3, clock=lambda: 0.0)
    members = [(_rows(1), 2, 10.0, "a"), (_rows(1), 0, 30.0, "b"), (_rows(1), 1, 20.0, None)]
    await asyncio.wait_for(asyncio.gather(*(
        batcher.submit(r, key_of(r), priority=p, deadline=d, tenant=t)
        for r, p, d, t in members)), 5)
    # Members sit in the batch in priority order (most urgent first).
    assert seen == [BatchMeta(priority=0, deadline=30.0, tenants=("b", None, "a"), rows=3,
                              member_rows=(1, 1, 1))]


async def test_a_busy_instance_holds_the_batch_until_it_frees() -> None:
    """One instance, busy with the first batch: newcomers keep joining the open batch long
    after max_delay_ms (1 ms here), and the whole lot goes once the instance frees. With
    ``wait_for_instance`` off the same callers leave on the 1 ms timer, in small batches."""

    async def scenario(wait: bool) -> list[int]:
        upstream = RefUpstream()
        upstream.gate = asyncio.Event()
        busy = [0]

        async def send(key: BatchKey, body: bytes, headers: Headers,
                       meta: BatchMeta) -> UpstreamReply:
            busy[0] += 1  # what the dispatcher's in-flight count does
            try:
                return await upstream(key, body, headers, meta)
            finally:
                busy[0] -= 1
                batcher.instance_freed()

        batcher = _batcher(send, max_batch_size=8, max_delay_ms=1.0, flush_when_idle=True,
                           wait_for_instance=wait,
                           fleet=lambda: FleetCounts(max(0, 1 - busy[0]), busy[0], 1))
        first = asyncio.create_task(batcher.submit(_rows(1, 0.0, "first"), key_of(_rows(1))))
        await _settle()
        assert batcher.statistics().flushes["idle"] == 1  # an idle fleet: sent at once
        rest = []
        for i in range(5):
            rest.append(asyncio.create_task(
                batcher.submit(_rows(1, float(i), f"r{i}"), key_of(_rows(1)))))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
        if wait:
            stats = batcher.statistics()
            assert (stats.batches_sent, stats.open_batches, stats.waiting_requests) == (1, 1, 6)
        upstream.gate.set()
        replies = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        assert all(r.status == 200 for r in replies)
        await batcher.aclose()
        return [b.inputs[0].shape[0] for b in upstream.batches]

    assert await scenario(wait=True) == [1, 5]
    timer_only = await scenario(wait=False)
    assert len(timer_only) == 6 and max(timer_only) == 1  # each alone, on the timer


async def test_a_held_batch_leaves_in_time_for_its_earliest_deadline() -> None:
    """Every instance stays busy (another client's work): the batch is held, but leaves
    50 ms before its most urgent member's deadline, in time to be answered."""
    upstream = RefUpstream()
    batcher = _batcher(upstream, max_batch_size=8, max_delay_ms=1.0, flush_when_idle=True,
                       fleet=lambda: FleetCounts(free=0, busy=1, total=1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    relaxed = asyncio.create_task(batcher.submit(_rows(1), key_of(_rows(1))))
    await asyncio.sleep(0.02)
    assert batcher.statistics().open_batches == 1  # held past max_delay_ms
    urgent = batcher.submit(_rows(1, 2.0), key_of(_rows(1)), deadline=started + 0.09)
    replies = await asyncio.wait_for(asyncio.gather(relaxed, urgent), 5)
    elapsed = loop.time() - started
    assert all(r.status == 200 for r in replies)
    assert 0.04 <= elapsed < 0.09  # (the hold bound alone would wait until 0.101)
    stats = batcher.statistics()
    assert stats.flushes["deadline"] == 1 and stats.batches_sent == 1


@pytest.mark.parametrize(("tenants", "member_rows", "expected"), [
    (("a", "b", "a"), (1, 1, 1), (("a", 2), ("b", 1))),
    (("a", "b", "a"), (1, 8, 1), (("b", 8), ("a", 2))),
    (("b", "a"), (2, 2), (("b", 2), ("a", 2))),          # a tie: the first member's tenant
    ((None, "a"), (), (("a", 1), (None, 1))[::-1]),     # rows unknown: one per member
    ((), (), ()),
])
def test_a_batch_knows_its_tenants_rows(tenants: tuple[str | None, ...],
                                        member_rows: tuple[int, ...],
                                        expected: tuple[tuple[str | None, int], ...]) -> None:
    meta = BatchMeta.of([(1, 1.0, t) for t in tenants], rows=sum(member_rows) or len(tenants),
                        member_rows=member_rows)
    assert meta.rows_by_tenant() == expected
