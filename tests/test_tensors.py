"""The v2 infer body codec: round trips, agreement with tritonclient, errors, peek."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.core.errors import BadRequest, PayloadTooLarge
from gateway.core.tensors import (
    ELEMENT_SIZE_BYTES,
    InferRequest,
    InferResponse,
    Parameters,
    RequestedOutput,
    Tensor,
    decode_content,
    encode_infer_request,
    encode_infer_response,
    header_length_of,
    join_bytes_elements,
    parse_infer_request,
    parse_infer_response,
    peek_infer_header,
)

FIXED_NUMPY = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"),
    "UINT16": np.dtype("<u2"), "INT16": np.dtype("<i2"), "FP16": np.dtype("<f2"),
    "UINT32": np.dtype("<u4"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4"),
    "UINT64": np.dtype("<u8"), "INT64": np.dtype("<i8"), "FP64": np.dtype("<f8"),
}
ALL_TYPES = [*FIXED_NUMPY, "BYTES", "BF16"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 3), min_size=1, max_size=3).map(tuple)
param_values = st.one_of(st.booleans(), st.integers(-5, 2**40), st.text(max_size=4))
parameters: st.SearchStrategy[Parameters] = st.dictionaries(
    st.sampled_from(["priority", "timeout", "x", "custom_key"]), param_values, max_size=3)


def _elements(datatype: str) -> st.SearchStrategy[Any] | None:
    if datatype.startswith("FP"):
        width = int(datatype[2:])
        return st.floats(width=width, allow_nan=False, allow_infinity=False)  # type: ignore[arg-type]
    return None


@st.composite
def tensors(draw: st.DrawFn, name: str, datatype: str | None = None,
            shape: tuple[int, ...] | None = None) -> Tensor:
    dt = datatype or draw(st.sampled_from(ALL_TYPES))
    sh = shape if shape is not None else draw(shapes)
    count = math.prod(sh)
    if dt == "BYTES":
        items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
        return Tensor(name, dt, sh, join_bytes_elements(items))
    if dt == "BF16":
        return Tensor(name, dt, sh, draw(st.binary(min_size=2 * count, max_size=2 * count)))
    array = draw(hnp.arrays(FIXED_NUMPY[dt], sh, elements=_elements(dt)))
    return Tensor.from_numpy(name, array, dt)


@st.composite
def requests(draw: st.DrawFn) -> InferRequest:
    names = draw(st.lists(st.sampled_from(["A", "B", "INPUT", "x_1"]), min_size=1, max_size=3,
                          unique=True))
    inputs = tuple(draw(tensors(n)) for n in names)
    out_names = draw(st.lists(st.sampled_from(["O1", "O2", "OUT"]), max_size=2, unique=True))
    outputs = tuple(RequestedOutput(n, draw(st.sampled_from([{}, {"binary_data": True},
                                                              {"binary_data": False}])))
                    for n in out_names)
    return InferRequest(draw(st.text(max_size=6)), draw(parameters), inputs, outputs)


@st.composite
def responses(draw: st.DrawFn) -> InferResponse:
    names = draw(st.lists(st.sampled_from(["O1", "O2", "OUT"]), min_size=1, max_size=3,
                          unique=True))
    return InferResponse(draw(st.text(max_size=5)), draw(st.sampled_from(["", "1", "17"])),
                         draw(st.text(max_size=5)), tuple(draw(tensors(n)) for n in names),
                         draw(parameters))


@FAST
@given(requests(), st.booleans())
def test_request_round_trip(request: InferRequest, binary: bool) -> None:
    encoded = encode_infer_request(request, binary=binary)
    has_tail = binary or any(t.datatype == "BF16" for t in request.inputs)
    assert (encoded.header_length is not None) == has_tail
    assert parse_infer_request(encoded.body, encoded.header_length) == request


@FAST
@given(responses(), st.data())
def test_response_round_trip(response: InferResponse, data: st.DataObject) -> None:
    binary = data.draw(st.sets(st.sampled_from(["O1", "O2", "OUT"])))
    encoded = encode_infer_response(response, binary_outputs=binary)
    assert parse_infer_response(encoded.body, encoded.header_length) == response


@FAST
@given(requests())
def test_peek_agrees_with_full_parse(request: InferRequest) -> None:
    encoded = encode_infer_request(request)
    peek = peek_infer_header(encoded.body, encoded.header_length)
    assert [t.spec() for t in request.inputs] == list(peek.inputs)
    assert peek.outputs == request.outputs
    assert peek.batch_size == request.inputs[0].shape[0]
    assert peek.id == request.id
    assert peek.binary_data_output == request.binary_data_output
    assert not peek.uses_shared_memory and peek.sequence_id is None


# ---------------------------------------------------------------- agreement with tritonclient

TC_TYPES = ["BOOL", "UINT8", "INT16", "UINT32", "INT64", "UINT64", "FP16", "FP32", "FP64",
            "BYTES"]


@st.composite
def numpy_inputs(draw: st.DrawFn) -> tuple[str, npt.NDArray[Any]]:
    dt = draw(st.sampled_from(TC_TYPES))
    sh = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple))
    if dt == "BYTES":
        count = math.prod(sh)
        words = draw(st.lists(st.text(max_size=5), min_size=count, max_size=count))
        return dt, np.array([w.encode() for w in words], dtype=object).reshape(sh)
    return dt, draw(hnp.arrays(FIXED_NUMPY[dt], sh, elements=_elements(dt)))


@FAST
@given(st.lists(numpy_inputs(), min_size=1, max_size=3), st.lists(st.booleans(), min_size=3,
                                                                   max_size=3))
def test_parses_what_tritonclient_sends(arrays: list[tuple[str, npt.NDArray[Any]]],
                                        binary: list[bool]) -> None:
    inputs = []
    for i, (dt, array) in enumerate(arrays):
        inp = triton_http.InferInput(f"IN{i}", list(array.shape), dt)
        inp.set_data_from_numpy(array, binary_data=binary[i])
        inputs.append(inp)
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        inputs, request_id="req-7", priority=2)
    request = parse_infer_request(body, json_size)
    assert request.id == "req-7" and request.parameters.get("priority") == 2
    for i, (dt, array) in enumerate(arrays):
        got = request.inputs[i]
        assert (got.name, got.datatype, got.shape) == (f"IN{i}", dt, array.shape)
        np.testing.assert_array_equal(got.to_numpy(), array)


@FAST
@given(st.lists(numpy_inputs(), min_size=1, max_size=3), st.data())
def test_tritonclient_parses_what_we_answer(arrays: list[tuple[str, npt.NDArray[Any]]],
                                            data: st.DataObject) -> None:
    outputs = tuple(Tensor.from_numpy(f"OUT{i}", a, dt) for i, (dt, a) in enumerate(arrays))
    binary = data.draw(st.sets(st.sampled_from([f"OUT{i}" for i in range(len(arrays))])))
    encoded = encode_infer_response(InferResponse("m", "1", "abc", outputs),
                                    binary_outputs=binary)
    result = triton_http.InferenceServerClient.parse_response_body(
        encoded.body, header_length=encoded.header_length)
    assert result.get_response()["id"] == "abc"
    for i, (_, array) in enumerate(arrays):
        got = result.as_numpy(f"OUT{i}")
        if got.dtype == object:  # tritonclient hands JSON BYTES back as str
            got = np.array([x.encode() if isinstance(x, str) else x for x in got.ravel()],
                           dtype=object).reshape(got.shape)
        np.testing.assert_array_equal(got, array)


# ---------------------------------------------------------------- details


def test_json_data_may_be_nested_and_bytes_are_strings() -> None:
    body = json.dumps({"inputs": [
        {"name": "X", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "S", "datatype": "BYTES", "shape": [2], "data": ["hé", ""]},
        {"name": "B", "datatype": "BOOL", "shape": [1], "data": [True]},
    ]}).encode()
    request = parse_infer_request(body, None)
    assert request.inputs[0].data == np.array([1, 2, 3, 4], dtype="<i4").tobytes()
    assert request.inputs[1].data == b"\x03\x00\x00\x00h\xc3\xa9\x00\x00\x00\x00"
    assert request.inputs[2].data == b"\x01"


def test_triton_style_raw_bytes_in_json_strings_are_kept() -> None:
    # Triton writes non-UTF-8 BYTES elements into JSON output strings unescaped.
    body = (b'{"model_name":"m","model_version":"1","outputs":[{"name":"O","datatype":"BYTES",'
            b'"shape":[2],"data":["ab","\xff\\u0000"]}]}')
    response = parse_infer_response(body, None)
    assert response.outputs[0].to_numpy().tolist() == [b"ab", b"\xff\x00"]
    again = encode_infer_response(response)
    assert parse_infer_response(again.body, again.header_length) == response


def test_encoded_headers() -> None:
    request = InferRequest("", {}, (Tensor.from_numpy("X", np.zeros((1, 2), np.float32)),))
    binary = encode_infer_request(request, binary=True)
    assert binary.headers() == [(b"content-type", b"application/octet-stream"),
                                (b"inference-header-content-length",
                                 str(binary.header_length).encode())]
    assert header_length_of(binary.headers()) == binary.header_length
    assert header_length_of({"Inference-Header-Content-Length": "12"}) == 12
    assert encode_infer_request(request, binary=False).headers() == [
        (b"content-type", b"application/json")]


def _json(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _one_input(**fields: object) -> bytes:
    tensor = {"name": "X", "datatype": "FP32", "shape": [2], **fields}
    return _json({"inputs": [tensor]})


BAD_REQUESTS: list[tuple[bytes, int | None, str]] = [
    (b"{not json", None, "malformed request JSON"),
    (b"[1, 2]", None, "must be an object"),
    (_one_input(data=[1.0]), None, "1 values in data, shape [2] needs 2"),
    (_one_input(data=["a", "b"]), None, "FP32 data must be numbers"),
    (_one_input(datatype="FP8", data=[1, 2]), None, "unknown datatype 'FP8'"),
    (_one_input(shape=[-1], data=[1, 2]), None, "'shape' must be a list of non-negative"),
    (_one_input(), None, "no 'data' and no binary_data_size"),
    (_one_input(datatype="INT8", data=[1, 300]), None, "value out of range for INT8"),
    (_one_input(datatype="INT8", data=[1, 2.5]), None, "INT8 data must be integers"),
    (_one_input(datatype="BOOL", data=[1, 0]), None, "BOOL data must be true/false"),
    (_one_input(datatype="BYTES", data=[1, 2]), None, "BYTES data must be strings"),
    (_one_input(datatype="BF16", data=[1, 2]), None, "BF16 data must be sent as binary"),
    (_one_input(parameters={"shared_memory_region": "r"}), None, "shared-memory tensors"),
    (b"{}", 10, "exceeds the body length 2"),
    (_one_input(parameters={"binary_data_size": 8}), None, "runs past the end of the body"),
    (_one_input(parameters={"binary_data_size": 4}) + b"\0" * 4, len(_one_input(
        parameters={"binary_data_size": 4})), "4 bytes of data, shape [2] of FP32 needs 8"),
    (_one_input(parameters={"binary_data_size": 8}) + b"\0" * 12, len(_one_input(
        parameters={"binary_data_size": 8})), "4 unexpected bytes"),
    (_one_input(datatype="BYTES", parameters={"binary_data_size": 6}) + b"\x05\0\0\0ab",
     len(_one_input(datatype="BYTES", parameters={"binary_data_size": 6})),
     "BYTES element longer than the tensor data"),
    (_one_input(data=[1, 2], parameters={"binary_data_size": 8}) + b"\0" * 8, len(_one_input(
        data=[1, 2], parameters={"binary_data_size": 8})), "both 'data' and binary_data_size"),
    (b"raw tensor bytes", 0, "raw binary body"),
]


@pytest.mark.parametrize(("body", "header_length", "message"), BAD_REQUESTS)
def test_bad_requests_are_400_with_a_clear_message(body: bytes, header_length: int | None,
                                                   message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_infer_request(body, header_length)


@pytest.mark.parametrize(("parameters", "sequence_id"), [
    ({}, None), ({"sequence_id": 0}, None), ({"sequence_id": ""}, None),
    ({"sequence_id": 42}, 42), ({"sequence_id": "abc"}, "abc"),
])
def test_peek_sequence_id(parameters: Parameters, sequence_id: int | str | None) -> None:
    peek = peek_infer_header(_json({"parameters": parameters, "inputs": []}), None)
    assert peek.sequence_id == sequence_id
    assert peek.batch_size is None


def test_peek_reads_shared_memory_batch_and_output_flags_without_data() -> None:
    header = _json({
        "id": "q", "parameters": {"binary_data_output": True},
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [5, 3],
                    "parameters": {"shared_memory_region": "in0",
                                   "shared_memory_byte_size": 60}}],
        "outputs": [{"name": "Y", "parameters": {"binary_data": False}}],
    })
    peek = peek_infer_header(header, len(header))
    assert peek.uses_shared_memory and peek.batch_size == 5 and peek.binary_data_output
    assert peek.outputs == (RequestedOutput("Y", {"binary_data": False}),)
    # The tail is not even looked at: a peek never converts tensor data.
    tail_peek = peek_infer_header(header + b"garbage", len(header))
    assert tail_peek == peek
    raw = peek_infer_header(b"\x00" * 16, 0)
    assert raw.is_raw_body and not raw.inputs


def test_wants_binary_follows_triton() -> None:
    # A named output is binary only by its own flag; binary_data_output covers the rest.
    request = InferRequest("", {"binary_data_output": True}, (), (
        RequestedOutput("A", {"binary_data": False}), RequestedOutput("B"),
        RequestedOutput("C", {"binary_data": True})))
    assert not request.wants_binary("A") and not request.wants_binary("B")
    assert request.wants_binary("C") and request.wants_binary("A", "BF16")
    assert InferRequest("", {"binary_data_output": True}, ()).wants_binary("A")
    assert not InferRequest("", {}, ()).wants_binary("A")


def test_decode_content() -> None:
    body = _one_input(data=[1, 2]) * 10
    assert decode_content(gzip.compress(body), "gzip", max_bytes=10_000) == body
    assert decode_content(zlib.compress(body), "deflate", max_bytes=10_000) == body
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(body) + raw.flush()
    assert decode_content(raw_deflate, "deflate", max_bytes=10_000) == body
    assert decode_content(body, None, max_bytes=1) == body
    assert decode_content(body, "identity", max_bytes=1) == body
    with pytest.raises(PayloadTooLarge):
        decode_content(gzip.compress(b"\0" * 100_000), "gzip", max_bytes=1000)
    with pytest.raises(BadRequest, match="cannot decompress"):
        decode_content(b"not gzip", "gzip", max_bytes=1000)
    with pytest.raises(BadRequest, match="truncated"):
        decode_content(gzip.compress(body)[:-12], "gzip", max_bytes=10_000)
    with pytest.raises(BadRequest, match="unsupported Content-Encoding 'br'"):
        decode_content(body, "br", max_bytes=1000)


def test_element_sizes_match_numpy() -> None:
    for datatype, dtype in FIXED_NUMPY.items():
        assert ELEMENT_SIZE_BYTES[datatype] == dtype.itemsize
