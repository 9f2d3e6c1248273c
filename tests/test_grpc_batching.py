"""``gateway.core.batching_grpc``: a ModelInferRequest read as the gateway's InferRequest (which
``gateway.core.batching`` keys, merges and splits), and a member's response written back."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.core.batching import NotBatchable, compatibility_key, merge, split
from gateway.core.batching_grpc import read_request, response_bytes
from gateway.core.tensors import InferRequest, InferResponse, Tensor
from gateway.core.types import ModelKey

MODEL = ModelKey("m")


def request(rows: int, *, rid: str = "", value: float = 0.0) -> pb.ModelInferRequest:
    data = np.full((rows, 2), value, dtype=np.float32)
    text = b"".join(len(w).to_bytes(4, "little") + w for w in [b"ab", b""] * rows)
    msg = pb.ModelInferRequest(model_name="m", id=rid)
    msg.parameters["note"].string_param = "x"
    msg.inputs.add(name="A", datatype="FP32", shape=[rows, 2])
    msg.inputs.add(name="S", datatype="BYTES", shape=[rows, 2])
    msg.raw_input_contents.extend([data.tobytes(), text])
    return msg


def read(msg: pb.ModelInferRequest) -> InferRequest:
    got = read_request(msg.SerializeToString())
    assert isinstance(got, InferRequest)
    return got


def test_raw_contents_become_tensors_that_batch_together() -> None:
    one, two = read(request(1, rid="a")), read(request(2, rid="b", value=1.0))
    assert [t.shape for t in one.inputs] == [(1, 2), (1, 2)]
    assert one.id == "a" and one.parameters["note"] == "x"
    assert one.parameters["binary_data_output"] is True  # replies come back as raw bytes
    keys = {compatibility_key(MODEL, r, model_max_batch_size=8) for r in (one, two)}
    assert len(keys) == 1 and not isinstance(keys.pop(), NotBatchable)
    merged = merge([one, two])
    assert merged.inputs[0].shape == (3, 2)
    assert merged.inputs[0].data == one.inputs[0].data + two.inputs[0].data


@pytest.mark.parametrize("spoil", ["typed contents", "shared memory", "not protobuf"])
def test_what_cannot_join_a_batch(spoil: str) -> None:
    msg = request(1)
    if spoil == "typed contents":
        del msg.raw_input_contents[:]
        msg.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    elif spoil == "shared memory":
        msg.inputs[0].parameters["shared_memory_region"].string_param = "r"
    raw = b"\xff\xff" if spoil == "not protobuf" else msg.SerializeToString()
    assert isinstance(read_request(raw), NotBatchable)


def test_a_members_split_response_round_trips() -> None:
    members = [read(request(1, rid="a")), read(request(2, rid="b"))]
    out = np.arange(6, dtype=np.int64).reshape(3, 2)
    merged = InferResponse("m", "1", "", (Tensor("OUT", "INT64", (3, 2), out.tobytes()),),
                           {"p": 7})
    raws = [response_bytes(r) for r in split(merged, members)]
    second = pb.ModelInferResponse.FromString(raws[1])
    assert (second.model_name, second.model_version, second.id) == ("m", "1", "b")
    assert second.parameters["p"].int64_param == 7
    assert list(second.outputs[0].shape) == [2, 2]
    got = np.frombuffer(second.raw_output_contents[0], dtype=np.int64).reshape(2, 2)
    np.testing.assert_array_equal(got, out[1:])
