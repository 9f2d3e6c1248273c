"""Gateway-side batching of gRPC ``ModelInfer``: the HTTP batching, over protobuf.

A ``ModelInferRequest`` whose tensors travel in ``raw_input_contents`` (what
``tritonclient.grpc`` sends) holds the same little-endian bytes as Triton's binary tensor
extension (BYTES elements with their 4-byte length prefixes alike), so it can join the very
batches HTTP infer requests of the model join (``gateway.engine.batchgateway``, one batcher
per model for both listeners): :mod:`gateway.core.batching` decides the batch key (same input names,
datatypes, non-batch dimensions and parameters, same request parameters and outputs; never
sequences, shared memory, decoupled models), merges the inputs along dimension 0 and splits
the outputs by rows. This module only translates, both ways:

* :func:`read_request` — a request as the gateway's :class:`~gateway.core.tensors.InferRequest`,
  asking for its outputs in binary (gRPC carries outputs as raw bytes), or
  :class:`~gateway.core.batching.NotBatchable` when its tensors are typed ``contents`` or in
  shared memory: those travel alone, as sent.
* :func:`response_bytes` — a member's own response (its rows, its ``id``) as
  ``ModelInferResponse`` bytes.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from gateway.core.batching import NotBatchable
from gateway.core.tensors import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor

# HTTP-only transport parameters (outputs in binary): gRPC always carries raw bytes.
_HTTP_ONLY = frozenset({"binary_data_output", "binary_data", "binary_data_size"})
_INT64_MAX = 2**63 - 1


def _value(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def parameters_of(params: Any) -> Parameters:
    return {str(k): _value(v) for k, v in params.items()}


def _set_parameters(target: Any, params: Parameters) -> None:
    for k, v in params.items():
        if k in _HTTP_ONLY or v is None:
            continue
        if isinstance(v, bool):
            target[k].bool_param = v
        elif isinstance(v, int):
            if v > _INT64_MAX:
                target[k].uint64_param = v
            else:
                target[k].int64_param = v
        elif isinstance(v, float):
            target[k].double_param = v
        else:
            target[k].string_param = str(v)


def read_request(raw: bytes) -> InferRequest | NotBatchable:
    """``raw`` (a ``ModelInferRequest``) as an ``InferRequest`` that asks for every output
    in binary; or why it cannot join a batch."""
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return NotBatchable("malformed ModelInferRequest")
    if not msg.inputs or len(msg.raw_input_contents) != len(msg.inputs):
        return NotBatchable("tensor data not in raw_input_contents")
    inputs = []
    for t, data in zip(msg.inputs, msg.raw_input_contents, strict=True):
        params = parameters_of(t.parameters)
        if any(k.startswith("shared_memory") for k in params):
            return NotBatchable("shared-memory tensors")
        inputs.append(Tensor(t.name, t.datatype, tuple(int(d) for d in t.shape), bytes(data),
                             params))
    outputs = []
    for o in msg.outputs:
        params = parameters_of(o.parameters)
        if any(k.startswith("shared_memory") for k in params):
            return NotBatchable("shared-memory tensors")
        outputs.append(RequestedOutput(o.name, {**params, "binary_data": True}))
    parameters = {**parameters_of(msg.parameters), "binary_data_output": True}
    return InferRequest(msg.id, parameters, tuple(inputs), tuple(outputs))


def response_bytes(response: InferResponse) -> bytes:
    """``response`` as a serialized ``ModelInferResponse`` (outputs in
    ``raw_output_contents``)."""
    out = pb.ModelInferResponse(model_name=response.model_name,
                                model_version=response.model_version, id=response.id)
    _set_parameters(out.parameters, response.parameters)
    for t in response.outputs:
        entry = out.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        _set_parameters(entry.parameters, t.parameters)
        out.raw_output_contents.append(t.data)
    return bytes(out.SerializeToString())
