"""KServe v2 infer bodies, decoded and encoded: JSON and the binary tensor extension.

A body is a JSON header, optionally followed by raw tensors (``Inference-Header-Content-Length``
gives the header's length). Every tensor here holds its values as raw little-endian, row-major
bytes whatever encoding it arrived in, so that merging requests is concatenation and slicing a
response is byte arithmetic; JSON ``data`` is converted on the way in and on the way out.
BYTES elements are a 4-byte little-endian length followed by the bytes (their JSON form is a
string); BOOL is one byte; BF16 has no JSON form.

``peek_infer_header`` reads only what routing and batching decisions need (sequence id, shared
memory, batch size, tensor specs, output encoding) without converting any tensor data.
Content-Encoding is not undone here implicitly: ``decode_content`` is for the caller to apply.
Every malformed body raises :class:`gateway.core.errors.BadRequest` with a message that names the
tensor at fault.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import zlib
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from gateway.core.errors import BadRequest, PayloadTooLarge

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
Parameters: TypeAlias = dict[str, JsonValue]

HEADER_LENGTH = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
BINARY_DATA_SIZE = "binary_data_size"

ELEMENT_SIZE_BYTES: dict[str, int] = {
    "BOOL": 1, "UINT8": 1, "INT8": 1,
    "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4,
    "UINT64": 8, "INT64": 8, "FP64": 8,
}
DATATYPES = frozenset([*ELEMENT_SIZE_BYTES, "BYTES"])

# BF16 has no numpy dtype: it is carried as raw bytes only.
_NUMPY_DTYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"),
    "UINT16": np.dtype("<u2"), "INT16": np.dtype("<i2"), "FP16": np.dtype("<f2"),
    "UINT32": np.dtype("<u4"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4"),
    "UINT64": np.dtype("<u8"), "INT64": np.dtype("<i8"), "FP64": np.dtype("<f8"),
}
_LENGTH_PREFIX = struct.Struct("<I")
_SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor's name, type and shape, without its values."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input or output. ``data`` is raw little-endian bytes; ``parameters`` never holds the
    transport-only ``binary_data_size``. Treat ``parameters`` as read-only."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes = field(repr=False)  # may be megabytes: keep reprs and logs short
    parameters: Parameters = field(default_factory=dict)

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, self.shape, self.parameters)

    def to_numpy(self) -> npt.NDArray[Any]:
        """The values as an array of ``shape``; BYTES become an object array of ``bytes``."""
        if self.datatype == "BYTES":
            return np.array(split_bytes_elements(self.data), dtype=object).reshape(self.shape)
        if self.datatype == "BF16":
            raise BadRequest(f"tensor '{self.name}': BF16 has no numpy form")
        return np.frombuffer(self.data, dtype=_NUMPY_DTYPE[self.datatype]).reshape(self.shape)

    @classmethod
    def from_numpy(cls, name: str, array: npt.NDArray[Any], datatype: str | None = None,
                   parameters: Parameters | None = None) -> Tensor:
        dt = datatype or numpy_to_datatype(array.dtype)
        if dt == "BYTES":
            items = [x if isinstance(x, bytes) else str(x).encode() for x in array.ravel()]
            raw = join_bytes_elements(items)
        else:
            raw = np.ascontiguousarray(array, dtype=_NUMPY_DTYPE[dt]).tobytes()
        return cls(name, dt, tuple(int(d) for d in array.shape), raw, dict(parameters or {}))


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)

    @property
    def binary_data(self) -> bool | None:
        """The output's own ``binary_data`` flag; None when it does not say."""
        value = self.parameters.get("binary_data")
        return value if isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str
    parameters: Parameters
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] = ()

    @property
    def binary_data_output(self) -> bool:
        return self.parameters.get("binary_data_output") is True

    def wants_binary(self, output_name: str, datatype: str = "") -> bool:
        """Whether Triton would send this output as binary for this request. As Triton's HTTP
        server does (verified against 2.51): an output the request names is binary only if its
        own ``binary_data`` is true; ``binary_data_output`` sets the kind of the outputs that
        are not named, i.e. of all outputs when the request names none. BF16 has no JSON form,
        so it is always binary here."""
        if datatype == "BF16":
            return True
        for out in self.outputs:
            if out.name == output_name:
                return out.binary_data is True
        return self.binary_data_output


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: tuple[Tensor, ...]
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EncodedBody:
    """A body ready to send. ``header_length`` is None for pure JSON bodies."""

    body: bytes
    header_length: int | None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``Content-Type`` and, for binary bodies, ``Inference-Header-Content-Length``."""
        if self.header_length is None:
            return [(b"content-type", JSON_CONTENT_TYPE.encode())]
        return [(b"content-type", BINARY_CONTENT_TYPE.encode()),
                (HEADER_LENGTH.encode(), str(self.header_length).encode())]


@dataclass(frozen=True, slots=True)
class InferPeek:
    """What the proxy needs to know about an infer request before deciding how to route it.

    ``sequence_id`` is None unless the request belongs to a sequence (non-zero, non-empty
    ``parameters.sequence_id``). ``batch_size`` is the first dimension of the first input
    (None when there is no input or it is a scalar). ``is_raw_body``: the body is one raw
    input (``Inference-Header-Content-Length: 0``); nothing else is known then."""

    id: str
    parameters: Parameters
    sequence_id: int | str | None
    uses_shared_memory: bool
    batch_size: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[RequestedOutput, ...]
    binary_data_output: bool
    is_raw_body: bool = False


# ---------------------------------------------------------------------------------------------
# Content-Encoding
# ---------------------------------------------------------------------------------------------


def decode_content(body: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, identity; comma lists applied in reverse).

    Decompression stops at ``max_bytes`` (:class:`PayloadTooLarge`), so a small compressed
    body cannot expand without bound."""
    if not content_encoding:
        return body
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, max_bytes)
        elif coding == "deflate":
            try:
                body = _inflate(body, zlib.MAX_WBITS, max_bytes)
            except BadRequest:  # some clients send raw deflate without the zlib wrapper
                body = _inflate(body, -zlib.MAX_WBITS, max_bytes)
        else:
            raise BadRequest(f"unsupported Content-Encoding '{coding}'")
    return body


def _inflate(body: bytes, wbits: int, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
        if len(out) <= max_bytes and not inflater.unconsumed_tail:
            out += inflater.flush()
    except zlib.error as exc:
        raise BadRequest(f"cannot decompress body: {exc}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds {max_bytes} bytes")
    if not inflater.eof:
        raise BadRequest("cannot decompress body: truncated stream")
    return out


# ---------------------------------------------------------------------------------------------
# Element conversion
# ---------------------------------------------------------------------------------------------


def numpy_to_datatype(dtype: np.dtype[Any]) -> str:
    if dtype.kind in "OSU":
        return "BYTES"
    for name, candidate in _NUMPY_DTYPE.items():
        if candidate == dtype.newbyteorder("<") or candidate == dtype:
            return name
    raise BadRequest(f"no v2 datatype for numpy dtype {dtype}")


def join_bytes_elements(items: Iterable[bytes]) -> bytes:
    """BYTES serialisation: each element as a 4-byte little-endian length + its bytes."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LENGTH_PREFIX.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def bytes_element_offsets(raw: bytes | memoryview, tensor: str = "") -> list[int]:
    """Start offsets of every BYTES element, plus the end offset; raises on a bad prefix."""
    offsets = [0]
    pos, end = 0, len(raw)
    unpack = _LENGTH_PREFIX.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise BadRequest(f"tensor '{tensor}': truncated BYTES length prefix")
        (length,) = unpack(raw, pos)
        pos += 4 + length
        if pos > end:
            raise BadRequest(f"tensor '{tensor}': BYTES element longer than the tensor data")
        offsets.append(pos)
    return offsets


def split_bytes_elements(raw: bytes, tensor: str = "") -> list[bytes]:
    offsets = bytes_element_offsets(raw, tensor)
    return [raw[a + 4:b] for a, b in itertools.pairwise(offsets)]


def _flatten(data: list[JsonValue]) -> list[JsonValue]:
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[JsonValue] = []
    stack: list[JsonValue] = list(reversed(data))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def json_to_raw(name: str, datatype: str, shape: tuple[int, ...], data: JsonValue) -> bytes:
    """Convert JSON ``data`` (flat or nested) to raw bytes, checking count and value types."""
    if not isinstance(data, list):
        data = [data]
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise BadRequest(f"tensor '{name}': {len(flat)} values in data, shape {list(shape)} "
                         f"needs {count}")
    if datatype == "BYTES":
        items: list[bytes] = []
        for value in flat:
            if not isinstance(value, str):
                raise BadRequest(f"tensor '{name}': BYTES data must be strings")
            try:
                items.append(value.encode("utf-8", "surrogateescape"))
            except UnicodeEncodeError:
                raise BadRequest(f"tensor '{name}': string is not valid Unicode") from None
        return join_bytes_elements(items)
    dtype = _NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise BadRequest(f"tensor '{name}': {datatype} data must be sent as binary")
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise BadRequest(f"tensor '{name}': BOOL data must be true/false")
        return np.array(flat, dtype=dtype).tobytes()
    if dtype.kind in "iu":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise BadRequest(f"tensor '{name}': {datatype} data must be integers")
        info = np.iinfo(dtype)
        ints = cast(list[int], flat)
        if ints and (min(ints) < info.min or max(ints) > info.max):
            raise BadRequest(f"tensor '{name}': value out of range for {datatype}")
        return np.array(ints, dtype=dtype).tobytes()
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
        raise BadRequest(f"tensor '{name}': {datatype} data must be numbers")
    with np.errstate(over="ignore"):
        return np.array(flat, dtype=np.float64).astype(dtype).tobytes()


def raw_to_json(name: str, datatype: str, data: bytes) -> list[JsonValue]:
    """Flat JSON ``data`` for raw bytes (BYTES elements become UTF-8 strings)."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "surrogateescape") for b in split_bytes_elements(data, name)]
    dtype = _NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise BadRequest(f"tensor '{name}': {datatype} has no JSON form")
    return cast(list[JsonValue], np.frombuffer(data, dtype=dtype).tolist())


def check_tensor_bytes(name: str, datatype: str, shape: tuple[int, ...], data: bytes) -> None:
    """Raise unless ``data`` holds exactly the elements ``shape`` asks for."""
    count = math.prod(shape)
    if datatype == "BYTES":
        found = len(bytes_element_offsets(data, name)) - 1
        if found != count:
            raise BadRequest(f"tensor '{name}': {found} BYTES elements, shape {list(shape)} "
                             f"needs {count}")
        return
    expected = count * ELEMENT_SIZE_BYTES[datatype]
    if len(data) != expected:
        raise BadRequest(f"tensor '{name}': {len(data)} bytes of data, shape {list(shape)} of "
                         f"{datatype} needs {expected}")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _load_header(body: bytes, header_length: int | None, what: str) -> tuple[Any, int]:
    if header_length is None:
        header_length = len(body)
    if header_length < 0:
        raise BadRequest(f"Inference-Header-Content-Length {header_length} is negative")
    if header_length > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} exceeds the body "
                         f"length {len(body)}")
    header = body[:header_length]
    try:
        try:
            doc = json.loads(header)
        except UnicodeDecodeError:
            # Triton writes BYTES elements into JSON strings unescaped, valid UTF-8 or not.
            doc = json.loads(header.decode("utf-8", "surrogateescape"))
    except ValueError as exc:
        raise BadRequest(f"malformed {what} JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} JSON must be an object")
    return doc, header_length


def _parameters(value: Any, where: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return cast(Parameters, value)


def _string(value: Any, where: str, key: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: '{key}' must be a string")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def _tensor_list(doc: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise BadRequest(f"{what}: '{key}' must be a list of objects")
    return items


def _spec(obj: dict[str, Any], kind: str) -> TensorSpec:
    name = _string(obj.get("name"), kind, "name")
    where = f"{kind} '{name}'"
    datatype = _string(obj.get("datatype"), where, "datatype")
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}: unknown datatype '{datatype}'")
    return TensorSpec(name, datatype, _shape(obj.get("shape"), where),
                      _parameters(obj.get("parameters"), where))


class _Tail:
    """Walks the binary part of a body in tensor order."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes, start: int) -> None:
        self.body = body
        self.pos = start

    def take(self, size: Any, where: str) -> bytes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{where}: 'binary_data_size' must be a non-negative integer")
        end = self.pos + size
        if end > len(self.body):
            raise BadRequest(f"{where}: binary_data_size {size} runs past the end of the body")
        chunk = self.body[self.pos:end]
        self.pos = end
        return chunk

    def finish(self) -> None:
        if self.pos != len(self.body):
            raise BadRequest(f"{len(self.body) - self.pos} unexpected bytes after the last "
                             "binary tensor")


def _tensor(obj: dict[str, Any], kind: str, tail: _Tail) -> Tensor:
    spec = _spec(obj, kind)
    where = f"{kind} '{spec.name}'"
    params = spec.parameters
    if any(k in params for k in _SHARED_MEMORY_KEYS):
        raise BadRequest(f"{where}: shared-memory tensors cannot be decoded by the gateway")
    if BINARY_DATA_SIZE in params:
        if "data" in obj:
            raise BadRequest(f"{where}: has both 'data' and binary_data_size")
        raw = tail.take(params[BINARY_DATA_SIZE], where)
        params = {k: v for k, v in params.items() if k != BINARY_DATA_SIZE}
        check_tensor_bytes(spec.name, spec.datatype, spec.shape, raw)
    elif "data" in obj:
        raw = json_to_raw(spec.name, spec.datatype, spec.shape, obj["data"])
    else:
        raise BadRequest(f"{where}: no 'data' and no binary_data_size")
    return Tensor(spec.name, spec.datatype, spec.shape, raw, params)


def _requested_outputs(doc: dict[str, Any]) -> tuple[RequestedOutput, ...]:
    outs = []
    for obj in _tensor_list(doc, "outputs", "request"):
        name = _string(obj.get("name"), "output", "name")
        outs.append(RequestedOutput(name, _parameters(obj.get("parameters"), f"output '{name}'")))
    return tuple(outs)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an (already content-decoded) infer request body."""
    if header_length == 0:
        raise BadRequest("a raw binary body (Inference-Header-Content-Length: 0) cannot be "
                         "decoded without the model's metadata")
    doc, hl = _load_header(body, header_length, "request")
    tail = _Tail(body, hl)
    inputs = tuple(_tensor(obj, "input", tail) for obj in _tensor_list(doc, "inputs", "request"))
    tail.finish()
    return InferRequest(
        id=_string(doc.get("id"), "request", "id", required=False),
        parameters=_parameters(doc.get("parameters"), "request"),
        inputs=inputs,
        outputs=_requested_outputs(doc),
    )


def parse_infer_response(body: bytes, header_length: int | None) -> InferResponse:
    doc, hl = _load_header(body, header_length, "response")
    tail = _Tail(body, hl)
    outputs = tuple(_tensor(obj, "output", tail) for obj in _tensor_list(doc, "outputs",
                                                                          "response"))
    tail.finish()
    version = doc.get("model_version", "")
    return InferResponse(
        model_name=_string(doc.get("model_name"), "response", "model_name", required=False),
        model_version=str(version) if isinstance(version, int | str) else "",
        id=_string(doc.get("id"), "response", "id", required=False),
        outputs=outputs,
        parameters=_parameters(doc.get("parameters"), "response"),
    )


def sequence_id_of(params: Parameters) -> int | str | None:
    """The request's sequence id; None when it belongs to no sequence (absent, 0 or empty)."""
    value = params.get("sequence_id")
    if isinstance(value, bool) or value in (None, 0, ""):
        return None
    if isinstance(value, int | str):
        return value
    raise BadRequest("request: 'sequence_id' must be an integer or a string")


def _transport_free(spec: TensorSpec) -> TensorSpec:
    if BINARY_DATA_SIZE not in spec.parameters:
        return spec
    params = {k: v for k, v in spec.parameters.items() if k != BINARY_DATA_SIZE}
    return TensorSpec(spec.name, spec.datatype, spec.shape, params)


def peek_infer_header(body: bytes, header_length: int | None) -> InferPeek:
    """Read the decision-relevant facts of an infer request without converting tensor data."""
    if header_length == 0:
        return InferPeek("", {}, None, False, 1, (), (), False, is_raw_body=True)
    doc, _ = _load_header(body, header_length, "request")
    params = _parameters(doc.get("parameters"), "request")
    inputs = tuple(_transport_free(_spec(obj, "input"))
                   for obj in _tensor_list(doc, "inputs", "request"))
    outputs = _requested_outputs(doc)
    all_params = [t.parameters for t in inputs] + [o.parameters for o in outputs]
    uses_shm = any(k in p for p in all_params for k in _SHARED_MEMORY_KEYS)
    batch = inputs[0].shape[0] if inputs and inputs[0].shape else None
    return InferPeek(
        id=_string(doc.get("id"), "request", "id", required=False),
        parameters=params,
        sequence_id=sequence_id_of(params),
        uses_shared_memory=uses_shm,
        batch_size=batch,
        inputs=inputs,
        outputs=outputs,
        binary_data_output=params.get("binary_data_output") is True,
    )


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _tensor_json(tensor: Tensor, binary: bool, tail: list[bytes]) -> dict[str, JsonValue]:
    obj: dict[str, JsonValue] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
    params: Parameters = dict(tensor.parameters)
    if binary or tensor.datatype == "BF16":
        params[BINARY_DATA_SIZE] = len(tensor.data)
        tail.append(tensor.data)
    else:
        obj["data"] = raw_to_json(tensor.name, tensor.datatype, tensor.data)
    if params:
        obj["parameters"] = params
    return obj


def _finish(doc: dict[str, JsonValue], tail: list[bytes]) -> EncodedBody:
    try:
        # Like Triton: BYTES elements that are not UTF-8 go into JSON strings as raw bytes.
        header = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogateescape")
    except UnicodeEncodeError:
        header = json.dumps(doc, separators=(",", ":")).encode()
    if not tail:
        return EncodedBody(header, None)
    return EncodedBody(b"".join([header, *tail]), len(header))


def encode_infer_request(request: InferRequest, *, binary: bool = True) -> EncodedBody:
    """Encode a request; ``binary`` sends input data in the binary tail (BF16 always is)."""
    tail: list[bytes] = []
    doc: dict[str, JsonValue] = {}
    if request.id:
        doc["id"] = request.id
    if request.parameters:
        doc["parameters"] = request.parameters
    doc["inputs"] = [_tensor_json(t, binary, tail) for t in request.inputs]
    if request.outputs:
        doc["outputs"] = [{"name": o.name, "parameters": o.parameters} if o.parameters
                          else {"name": o.name} for o in request.outputs]
    return _finish(doc, tail)


def encode_infer_response(response: InferResponse, *,
                          binary_outputs: Container[str] | bool = False) -> EncodedBody:
    """Encode a response; outputs named in ``binary_outputs`` (or all, when True) go to the
    binary tail, in output order, the others carry JSON ``data``."""
    tail: list[bytes] = []
    doc: dict[str, JsonValue] = {"model_name": response.model_name,
                                 "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = [
        _tensor_json(t, binary_outputs if isinstance(binary_outputs, bool)
                     else t.name in binary_outputs, tail)
        for t in response.outputs
    ]
    return _finish(doc, tail)


HeadersLike: TypeAlias = (
    "Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]")


def header_value(headers: HeadersLike, name: str) -> str | None:
    """Case-insensitive header lookup in a mapping or a list of (str or bytes) pairs."""
    pairs: Iterable[tuple[str | bytes, str | bytes]] = (
        headers.items() if isinstance(headers, Mapping) else headers)
    lowered = name.lower()
    for key, value in pairs:
        k = key.decode("latin-1") if isinstance(key, bytes) else key
        if k.lower() == lowered:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def header_length_of(headers: HeadersLike) -> int | None:
    """``Inference-Header-Content-Length`` as an int (None when absent); BadRequest if bad."""
    value = header_value(headers, HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length '{value}' is not an integer") from None
