"""tritonclient (sync and aio) through the gateway, in front of real Triton servers."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from gateway.tools.gatewayproc import GatewayProcess, http_get
from gateway.tools.local import TritonFleet

pytestmark = pytest.mark.triton

IDENTITY_CASES = [
    # (input name, datatype, array, binary)
    ("INPUT_FP32", "FP32", np.arange(12, dtype=np.float32).reshape(2, 6) / 7, True),
    ("INPUT_FP32", "FP32", np.arange(12, dtype=np.float32).reshape(3, 4), False),
    ("INPUT_FP16", "FP16", (np.arange(8, dtype=np.float16) / 3).reshape(2, 4), True),
    ("INPUT_INT64", "INT64", np.array([[2**40, -5, 7]], dtype=np.int64), True),
    ("INPUT_INT64", "INT64", np.array([[2**40, -5, 7]], dtype=np.int64), False),
    ("INPUT_BOOL", "BOOL", np.array([[True, False, True, True]]), True),
    ("INPUT_BOOL", "BOOL", np.array([[True, False, True, True]]), False),
    ("INPUT_BYTES", "BYTES", np.array([[b"alpha", b"\x00\xffbin", b""]], dtype=np.object_),
     True),
    ("INPUT_BYTES", "BYTES", np.array([["hello", "w\u00f6rld"]], dtype=np.object_), False),
]


def _client(gw: GatewayProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=gw.hostport, network_timeout=30.0)


@pytest.fixture(scope="module")
def minimal_gateway(triton_fleet: TritonFleet,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The README's minimal config — ``listen`` and ``workers`` only, no ``models:`` — in
    front of PyTriton, whose repository index is empty: every model is found on first use."""
    cfg = {"workers": [{"url": w.http_url, "metrics_url": w.metrics_url}
                       for w in triton_fleet.workers]}
    gw = GatewayProcess(cfg, Path(tmp_path_factory.mktemp("gw-minimal")))
    gw.start()
    try:
        gw.wait_workers_ready(2)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(params=["models named", "minimal config"])
def any_gateway(request: pytest.FixtureRequest) -> GatewayProcess:
    """Every case runs through both: a gateway whose YAML names the models, and one that
    names none."""
    name = "triton_gateway" if request.param == "models named" else "minimal_gateway"
    gw: GatewayProcess = request.getfixturevalue(name)
    return gw


@pytest.mark.parametrize(("name", "dtype", "array", "binary"), IDENTITY_CASES)
def test_identity_round_trip_sync(any_gateway: GatewayProcess, name: str, dtype: str,
                                  array: np.ndarray[Any, Any], binary: bool) -> None:
    client = _client(any_gateway)
    inp = httpclient.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array, binary_data=binary)
    out_name = name.replace("INPUT", "OUTPUT")
    out = httpclient.InferRequestedOutput(out_name, binary_data=binary)
    result = client.infer("identity", [inp], outputs=[out], request_id="rid-7")
    got = result.as_numpy(out_name)
    assert got is not None
    if dtype == "BYTES":
        def as_bytes(rows: list[list[object]]) -> list[list[bytes]]:
            return [[x if isinstance(x, bytes) else str(x).encode() for x in row]
                    for row in rows]

        assert as_bytes(got.tolist()) == as_bytes(array.tolist())
    else:
        np.testing.assert_array_equal(got, array)
    assert result.get_response()["id"] == "rid-7"


def test_add_sub_gzip_request_sync(any_gateway: GatewayProcess) -> None:
    client = _client(any_gateway)
    a = np.random.default_rng(1).random((4, 16), dtype=np.float32)
    b = np.ones((4, 16), dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [4, 16], "FP32"),
              httpclient.InferInput("INPUT1", [4, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    for algo in ("gzip", "deflate"):
        result = client.infer("add_sub", inputs, request_compression_algorithm=algo,
                              response_compression_algorithm=algo)
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


async def test_aio_client_gzip_response_and_metadata(any_gateway: GatewayProcess) -> None:
    client = aioclient.InferenceServerClient(url=any_gateway.hostport)
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("add_sub")
        meta = await client.get_model_metadata("add_sub")
        assert meta["name"] == "add_sub"
        config = await client.get_model_config("add_sub")
        assert config["max_batch_size"] > 0
        text = np.array([[b"abc"], [b"Zeta"]], dtype=np.object_)
        inp = aioclient.InferInput("TEXT", [2, 1], "BYTES")
        inp.set_data_from_numpy(text)
        result = await client.infer("strings", [inp], request_compression_algorithm="gzip",
                                    response_compression_algorithm="gzip", request_id="aio-1")
        assert result.as_numpy("UPPER").tolist() == [[b"ABC"], [b"ZETA"]]
        assert result.as_numpy("LENGTH").tolist() == [[3], [4]]
        assert result.get_response()["id"] == "aio-1"
    finally:
        await client.close()


def test_server_level_endpoints(any_gateway: GatewayProcess) -> None:
    client = _client(any_gateway)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "triton-gateway"
    assert "binary_tensor_data" in meta["extensions"]
    index = client.get_model_repository_index()
    names = {e["name"] for e in index}
    assert {"add_sub", "strings", "identity"} <= names
    stats = client.get_inference_statistics("add_sub")
    assert stats["model_stats"][0]["name"] == "add_sub"
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("no_such_model")


def test_error_shapes(any_gateway: GatewayProcess) -> None:
    client = _client(any_gateway)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in info.value.message()
    assert info.value.status() == "404"
    inp = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", [inp])
    assert info.value.status() == "404"
    # Triton's own error passes through unchanged (missing INPUT1).
    with pytest.raises(InferenceServerException) as info:
        client.infer("add_sub", [inp])
    assert info.value.status() == "400"
    status, body = http_get(any_gateway.url + "/v2/no/such/path")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert info.value.status() == "400"
    assert "shared memory" in info.value.message()


def test_request_id_generated_and_echoed(any_gateway: GatewayProcess) -> None:
    import urllib.request

    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                   "data": [1.0] * 16},
                                  {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32",
                                   "data": [2.0] * 16}]}).encode()
    req = urllib.request.Request(any_gateway.url + "/v2/models/add_sub/infer", data=body,
                                 headers={"X-Request-ID": "trace-abc"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["x-request-id"] == "trace-abc"
        assert json.loads(resp.read())["outputs"][0]["data"][0] == 3.0
    req = urllib.request.Request(any_gateway.url + "/v2/models/add_sub/infer", data=body)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["x-request-id"]


def test_raw_gzip_body_through_gateway(any_gateway: GatewayProcess) -> None:
    """A gzip body whose Inference-Header-Content-Length counts the uncompressed JSON."""
    import urllib.request

    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    header = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
         "parameters": {"binary_data_size": 64}},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32",
         "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}]}).encode()
    raw = header + a.tobytes() + a.tobytes()
    req = urllib.request.Request(
        any_gateway.url + "/v2/models/add_sub/infer", data=gzip.compress(raw),
        headers={"Content-Encoding": "gzip",
                 "Inference-Header-Content-Length": str(len(header))})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["outputs"][0]["data"] == (a * 2).ravel().tolist()
