"""One read of an infer request's head: decompression, fast path, opaque heads, bounds."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from gateway.core.admission import triton_priority
from gateway.core.config import parse_config
from gateway.core.errors import BadRequest, PayloadTooLarge
from gateway.core.requesthead import read_head, with_parameters
from gateway.core.tenants import TenantDirectory
from gateway.core.types import Priority


def _body(params: dict[str, object] | None = None, rows: int = 3) -> bytes:
    doc: dict[str, object] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2],
                                          "data": [0.0] * (rows * 2)}]}
    if params is not None:
        doc["parameters"] = params
    return json.dumps(doc).encode()


def test_fast_path_parses_nothing() -> None:
    head = read_head(_body(), None, None, max_bytes=1 << 20, need_peek=False)
    assert head.peek is None and head.batch_size == 1 and head.sequence_id is None


@pytest.mark.parametrize(("params", "field", "value"), [
    ({"sequence_id": 7, "sequence_end": True}, "sequence_id", "7"),
    ({"sequence_id": 7, "sequence_end": True}, "sequence_end", True),
    ({"sequence_id": 0}, "sequence_id", None),
    ({"timeout": 2500}, "timeout_us", 2500),
    ({"timeout": -1}, "timeout_us", None),
    ({"priority": 2}, "priority", 2),
])
def test_routing_keys_are_read(params: dict[str, object], field: str, value: object) -> None:
    head = read_head(_body(params), None, None, max_bytes=1 << 20, need_peek=False)
    assert getattr(head, field) == value


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"identity"])
def test_one_decompressor_for_every_encoding(encoding: bytes) -> None:
    raw = _body({"sequence_id": 5}, rows=4)
    wire = {b"gzip": gzip.compress, b"deflate": zlib.compress,
            b"identity": lambda b: b}[encoding](raw)
    head = read_head(wire, None, encoding, max_bytes=1 << 20, need_peek=True)
    assert head.body == raw and head.sequence_id == "5" and head.batch_size == 4


def test_binary_body_reads_only_the_json_header() -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 1],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    body = header + b"\x01\x00\x00\x00\x02\x00\x00\x00"
    head = read_head(body, str(len(header)).encode(), None, max_bytes=1 << 20, need_peek=True)
    assert head.batch_size == 2 and head.header_length == len(header)


def test_malformed_json_is_opaque_and_left_to_the_worker() -> None:
    head = read_head(b'{"inputs": [', None, None, max_bytes=1 << 20, need_peek=True)
    assert head.is_opaque and head.batch_size == 1


@pytest.mark.parametrize(("body", "ihcl", "encoding", "error"), [
    (b"[" * 100_000 + b"]" * 100_000, None, None, BadRequest),     # too deep: 400, no crash
    (b"{}", b"abc", None, BadRequest),
    (b"{}", b"-1", None, BadRequest),
    (b"not gzip", None, b"gzip", BadRequest),
    (b"{}", None, b"br", BadRequest),
    (gzip.compress(b" " * 5000), None, b"gzip", PayloadTooLarge),  # decompression bomb
])
def test_bad_heads_are_clear_errors(body: bytes, ihcl: bytes | None, encoding: bytes | None,
                                    error: type[Exception]) -> None:
    with pytest.raises(error):
        read_head(body, ihcl, encoding, max_bytes=4096, need_peek=True)


def test_empty_or_blank_keys_never_authenticate() -> None:
    cfg = parse_config({"workers": [{"url": "http://127.0.0.1:9"}],
                        "admission": {"tenants": {"a": {"keys": ["k1"], "priority": "critical"}}}})
    d = TenantDirectory.from_config(cfg)
    assert d.identify([(b"x-api-key", b"k1")]) == ("a", Priority.CRITICAL)
    assert d.identify([(b"authorization", b"Bearer k1")]) == ("a", Priority.CRITICAL)
    for value in (b"", b"  ", b"Bearer ", b"k2"):
        assert d.identify([(b"x-api-key", value), (b"authorization", value)])[0] is None


@pytest.mark.parametrize(("header", "tail"), [
    (b'{"inputs":[]}', None),
    (b'{"parameters":{"priority":1},"inputs":[]}', None),
    (b'{"inputs":[{"name":"X","parameters":{"binary_data_size":4}}]}', b"\x00\x01\x02\x03"),
])
def test_with_parameters_sets_the_parameter_and_keeps_the_tail(header: bytes,
                                                            tail: bytes | None) -> None:
    body = header + (tail or b"")
    new, length = with_parameters(body, len(header) if tail is not None else None,
                                  {"timeout": 1500})
    if tail is None:
        assert length is None
        doc = json.loads(new)
    else:
        assert length is not None and new[length:] == tail
        doc = json.loads(new[:length])
    assert doc["parameters"]["timeout"] == 1500
    assert {k: v for k, v in doc["parameters"].items() if k != "timeout"} == \
        json.loads(header).get("parameters", {})


@pytest.mark.parametrize("header", [b"[1]", b'{"parameters":[]}', b"{nope"])
def test_with_parameters_refuses_what_it_cannot_rewrite(header: bytes) -> None:
    with pytest.raises(ValueError):
        with_parameters(header, None, {"timeout": 1000})


@pytest.mark.parametrize(("priority", "levels", "expected"), [
    (Priority.CRITICAL, 3, 1), (Priority.STANDARD, 3, 2), (Priority.SHEDDABLE, 3, 3),
    (Priority.CRITICAL, 2, 1), (Priority.STANDARD, 2, 1), (Priority.SHEDDABLE, 2, 2),
    (Priority.SHEDDABLE, 1, 1), (Priority.STANDARD, 10, 5),
])
def test_the_gateways_class_as_tritons_priority_level(priority: Priority, levels: int,
                                                     expected: int) -> None:
    assert triton_priority(priority, levels) == expected
