"""What a simulated model is and computes: its metadata and config, the check of a request
against it, and its answer — on the gateway's one KServe codec (:mod:`gateway.core.tensors`).

The model computes its outputs for real: output *i* is input *i* times two (``op="double"``,
the default ``simple`` model: FP32 INPUT0 [-1, 16] → OUTPUT0 = 2 × INPUT0) or unchanged
(``op="identity"``; BYTES, BOOL and BF16 tensors are always passed through), so results can
be checked. Pure: no socket, no clock.
"""

from __future__ import annotations

from typing import Any

from gateway.core.tensors import (
    EncodedBody,
    InferRequest,
    InferResponse,
    Tensor,
    encode_infer_response,
)
from gateway.sim.core import SimError, SimModel, TensorSpec

_PASSED_THROUGH = frozenset({"BYTES", "BOOL", "BF16"})


# ------------------------------------------------------------------ model descriptions

def model_metadata(model: SimModel) -> dict[str, Any]:
    batch = [-1] if model.max_batch_size > 0 else []

    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": [*batch, *t.dims]}
                for t in specs]

    return {"name": model.name, "versions": [model.version], "platform": "python",
            "inputs": tensors(model.inputs), "outputs": tensors(model.outputs)}


def model_config(model: SimModel, instances: int = 1) -> dict[str, Any]:
    """The model's config as Triton answers it; ``instances``: the worker's slots, the
    executions it runs at once (one instance group of that count)."""
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "dims": list(t.dims),
                 "data_type": "TYPE_STRING" if t.datatype == "BYTES" else f"TYPE_{t.datatype}"}
                for t in specs]

    config: dict[str, Any] = {
        "name": model.name, "platform": "", "backend": "python",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": model.max_batch_size,
        "input": tensors(model.inputs), "output": tensors(model.outputs),
        "instance_group": [{"name": model.name, "kind": "KIND_GPU", "count": max(1, instances)}],
    }
    if model.dynamic_batching or model.timeout_override or model.priority_levels:
        config["dynamic_batching"] = {}
    if model.priority_levels:
        config["dynamic_batching"]["priority_levels"] = model.priority_levels
    if model.timeout_override:
        config["dynamic_batching"]["default_queue_policy"] = {"allow_timeout_override": True}
    if model.sequence_batching:
        config["sequence_batching"] = {"max_sequence_idle_microseconds": 1000000}
    return config


# ------------------------------------------------------------------ inference

def validate(model: SimModel, req: InferRequest) -> int:
    """Check a decoded request against the model, with Triton's messages; returns its batch
    size (1 without batching). Raises :class:`SimError`."""
    by_name = {t.name: t for t in req.inputs}
    batch = 1
    for spec in model.inputs:
        tensor = by_name.pop(spec.name, None)
        if tensor is None:
            raise SimError(400, f"expected {len(model.inputs)} inputs but got "
                                f"{len(req.inputs)} inputs for model '{model.name}'")
        if tensor.datatype != spec.datatype:
            raise SimError(400, f"inference input '{spec.name}' data-type is "
                                f"'{tensor.datatype}', but model '{model.name}' expects "
                                f"'{spec.datatype}'")
        dims = tensor.shape
        if model.max_batch_size > 0:
            if not dims or dims[0] > model.max_batch_size:
                raise SimError(400, f"inference request batch-size must be <= "
                                    f"{model.max_batch_size} for '{model.name}'")
            batch = dims[0]
            dims = dims[1:]
        if len(dims) != len(spec.dims) or any(
                w not in (-1, g) for w, g in zip(spec.dims, dims, strict=True)):
            expected = [-1, *spec.dims] if model.max_batch_size > 0 else list(spec.dims)
            raise SimError(400, f"unexpected shape for input '{spec.name}' for model "
                                f"'{model.name}'. Expected {expected}, got {list(tensor.shape)}")
    if by_name:
        raise SimError(400, f"unexpected inference input '{next(iter(by_name))}' "
                            f"for model '{model.name}'")
    known = {o.name for o in model.outputs}
    for out in req.outputs:
        if out.name not in known:
            raise SimError(400, f"unexpected inference output '{out.name}' "
                                f"for model '{model.name}'")
    return batch


def compute(model: SimModel, req: InferRequest) -> dict[str, Tensor]:
    """Output i = op(input i); the default model doubles INPUT0 into OUTPUT0."""
    by_name = {t.name: t for t in req.inputs}
    results: dict[str, Tensor] = {}
    for i, spec in enumerate(model.outputs):
        source = by_name[model.inputs[min(i, len(model.inputs) - 1)].name]
        data = source.data
        if model.op == "double" and source.datatype not in _PASSED_THROUGH:
            values = source.to_numpy()
            data = (values * values.dtype.type(2)).tobytes()
        results[spec.name] = Tensor(spec.name, spec.datatype, source.shape, data)
    return results


def answer(model: SimModel, req: InferRequest) -> EncodedBody:
    """The response body: the requested outputs (all, when the request names none), each
    binary or JSON as Triton would send it."""
    results = compute(model, req)
    names = [o.name for o in req.outputs] or [o.name for o in model.outputs]
    outputs = tuple(results[name] for name in names)
    response = InferResponse(model.name, model.version, req.id, outputs)
    binary = {t.name for t in outputs if req.wants_binary(t.name, t.datatype)}
    return encode_infer_response(response, binary_outputs=binary)
