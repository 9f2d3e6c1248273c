"""KServe v2 gRPC messages (Triton's ``inference.GRPCInferenceService``): what the gateway
reads from them and the few it writes itself, as pure functions over bytes.

The gateway forwards requests and responses as the bytes it received; it decodes a message
only to learn what admission and routing need (model, version, id, sequence, priority,
timeout, batch size) or to answer for the whole fleet (health, server metadata, statistics,
repository index). The message classes are the ones ``tritonclient[grpc]`` ships, never
generated here; this module is the one place that imports them and protobuf.

Status mapping (the gateway's HTTP-style statuses ↔ gRPC codes), Triton's own where it has
one: 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 →
NOT_FOUND, 413/429 → RESOURCE_EXHAUSTED, 500 → INTERNAL, 501/405 → UNIMPLEMENTED,
502/503 → UNAVAILABLE, 504 → DEADLINE_EXCEEDED — and a deadline refusal (503 on HTTP: the
request cannot be answered in the time it has left) → DEADLINE_EXCEEDED, as Triton answers a
request whose deadline runs out (:func:`code_for_error`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from gateway.core.errors import BadRequest, DeadlineUnmeetable, GatewayError
from gateway.core.types import ModelKey
from gateway.fleet.aggregates import merge_stats

SERVICE = "inference.GRPCInferenceService"
FINAL_RESPONSE_PARAMETER = "triton_final_response"
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"

CODE_BY_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
STATUS_BY_CODE: dict[str, int] = {
    "OK": 200, "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
    "UNKNOWN": 500, "DATA_LOSS": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504, "ABORTED": 409,
}
# A worker's own answer that counts as its failure (the breaker learns from it), as HTTP
# 500/502/503/504 do; an error about the request itself (INVALID_ARGUMENT…) does not.
WORKER_FAILURE_CODES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"})


def failed_attempt(code: str, *, connected: bool) -> tuple[str, int | None]:
    """A failed ``ModelInfer`` attempt as the retry policy (``retrybudget.decide_retry``)
    sees an HTTP one: (stage, status). UNAVAILABLE on a channel that had no connection is
    ``connect`` — the request never left, safe to send elsewhere; UNAVAILABLE on a connected
    channel cannot be told apart from a connection that broke after the request was sent, so
    it is ``send`` (never resent); any other status is the worker's ``response``."""
    if code == "UNAVAILABLE":
        return ("send" if connected else "connect"), None
    return "response", status_for_code(code)


def code_for_status(status: int) -> str:
    return CODE_BY_STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def code_for_error(exc: GatewayError) -> str:
    """The gRPC code of the gateway's own error: by its status, except that a deadline the
    gateway cannot meet is DEADLINE_EXCEEDED, not UNAVAILABLE (which tells a client to
    retry, and with the same deadline a retry cannot help)."""
    if isinstance(exc, DeadlineUnmeetable):
        return "DEADLINE_EXCEEDED"
    return code_for_status(exc.status)


def status_for_code(code: str) -> int:
    return STATUS_BY_CODE.get(code, 500)


@dataclass(frozen=True, slots=True)
class GrpcInferFacts:
    """What admission and routing need from one ``ModelInferRequest``."""

    key: ModelKey
    request_id: str = ""
    sequence_id: str | None = None
    sequence_end: bool = False
    shared_memory: bool = False
    batch_size: int = 1
    timeout_us: int | None = None
    priority: int | None = None
    asks_empty_final: bool = False  # the client set triton_enable_empty_final_response


def _param_value(p: Any) -> bool | int | float | str | None:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)  # type: ignore[no-any-return]


def read_infer_request(raw: bytes) -> GrpcInferFacts:
    """Decode ``raw`` as a ``ModelInferRequest`` (raises BadRequest when it is not one)."""
    req = pb.ModelInferRequest()
    try:
        req.ParseFromString(raw)
    except DecodeError:
        raise BadRequest("malformed ModelInferRequest") from None
    if not req.model_name:
        raise BadRequest("ModelInferRequest names no model")
    params = req.parameters
    seq = _param_value(params["sequence_id"]) if "sequence_id" in params else None
    end = _param_value(params["sequence_end"]) if "sequence_end" in params else None
    timeout = _param_value(params["timeout"]) if "timeout" in params else None
    prio = _param_value(params["priority"]) if "priority" in params else None
    shm = any(k.startswith("shared_memory") for t in req.inputs for k in t.parameters) or any(
        k.startswith("shared_memory") for t in req.outputs for k in t.parameters)
    batch = 1
    if req.inputs and req.inputs[0].shape and req.inputs[0].shape[0] > 0:
        batch = int(req.inputs[0].shape[0])
    return GrpcInferFacts(
        key=ModelKey(req.model_name, req.model_version),
        request_id=req.id,
        sequence_id=None if seq in (None, 0, "", False) else str(seq),
        sequence_end=bool(end),
        shared_memory=shm,
        batch_size=batch,
        timeout_us=timeout if isinstance(timeout, int) and not isinstance(timeout, bool)
        and timeout > 0 else None,
        priority=prio if isinstance(prio, int) and not isinstance(prio, bool)
        and prio > 0 else None,
        asks_empty_final=EMPTY_FINAL_PARAMETER in params,
    )


# Appended to a serialized ModelInferRequest, this sets one more map entry: protobuf merges
# concatenated messages, so the request's own bytes are not re-encoded.
ASK_EMPTY_FINAL = bytes(pb.ModelInferRequest(parameters={
    EMPTY_FINAL_PARAMETER: pb.InferParameter(bool_param=True)}).SerializeToString())


@dataclass(frozen=True, slots=True)
class StreamResponseKind:
    final: bool        # the request it answers is done
    empty_final: bool  # only a marker that it is done (no outputs)


def read_stream_response(raw: bytes) -> StreamResponseKind:
    """Whether a ``ModelStreamInferResponse`` ends its request: an error, a response that
    says ``triton_final_response: true``, or one that does not say (not decoupled); and
    whether it is the empty marker a decoupled model sends when asked to."""
    resp = pb.ModelStreamInferResponse()
    try:
        resp.ParseFromString(raw)
    except DecodeError:
        return StreamResponseKind(True, False)
    if resp.error_message:
        return StreamResponseKind(True, False)
    infer = resp.infer_response
    params = infer.parameters
    if FINAL_RESPONSE_PARAMETER not in params:
        return StreamResponseKind(True, False)
    final = bool(params[FINAL_RESPONSE_PARAMETER].bool_param)
    return StreamResponseKind(final, final and not infer.outputs
                              and not infer.raw_output_contents)


def stream_error(message: str, facts: GrpcInferFacts | None) -> bytes:
    """An in-stream error for one request (the stream itself goes on), as Triton sends."""
    resp = pb.ModelStreamInferResponse(error_message=message)
    if facts is not None:
        resp.infer_response.model_name = facts.key.name
        resp.infer_response.model_version = facts.key.version
        resp.infer_response.id = facts.request_id
    return bytes(resp.SerializeToString())


# the gateway's own answers -------------------------------------------------------------
def server_live(live: bool) -> bytes:
    return bytes(pb.ServerLiveResponse(live=live).SerializeToString())


def server_ready(ready: bool) -> bytes:
    return bytes(pb.ServerReadyResponse(ready=ready).SerializeToString())


def model_ready(ready: bool) -> bytes:
    return bytes(pb.ModelReadyResponse(ready=ready).SerializeToString())


def server_metadata(name: str, version: str, extensions: Iterable[str]) -> bytes:
    return bytes(pb.ServerMetadataResponse(name=name, version=version,
                                           extensions=list(extensions)).SerializeToString())


def _parse(cls: Any, raw: bytes, what: str) -> Any:
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        raise BadRequest(f"malformed {what}") from None
    return msg


def read_model_key(raw: bytes, request_type: str) -> ModelKey:
    """Model name and version of a ModelReady/ModelMetadata/ModelConfig/ModelStatistics
    request (the name may be empty for statistics: every model)."""
    msg = _parse(getattr(pb, request_type), raw, request_type)
    return ModelKey(str(msg.name), str(msg.version))


def read_repository_model(raw: bytes, request_type: str) -> str:
    msg = _parse(getattr(pb, request_type), raw, request_type)
    return str(msg.model_name)


def read_index_ready_only(raw: bytes) -> bool:
    msg = _parse(pb.RepositoryIndexRequest, raw, "RepositoryIndexRequest")
    return bool(msg.ready)


def merge_statistics(payloads: Iterable[bytes]) -> bytes:
    """Sum ``ModelStatisticsResponse`` messages from every worker, by the same rules as the
    HTTP statistics (``gateway.fleet.aggregates.merge_stats``)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for raw in payloads:
        resp = _parse(pb.ModelStatisticsResponse, raw, "ModelStatisticsResponse")
        for entry in resp.model_stats:
            merge_stats(merged, json_format.MessageToDict(entry,
                                                           preserving_proto_field_name=True))
    out = pb.ModelStatisticsResponse()
    for entry in merged.values():
        json_format.ParseDict(entry, out.model_stats.add(), ignore_unknown_fields=True)
    return bytes(out.SerializeToString())


def merge_repository_index(payloads: Iterable[bytes], probed: Iterable[str], *,
                           ready_only: bool) -> bytes:
    """The union of ``RepositoryIndexResponse`` messages (a READY entry wins), plus models
    known only by probing (PyTriton's index lists none of its models)."""
    union: dict[tuple[str, str], Any] = {}
    for raw in payloads:
        resp = _parse(pb.RepositoryIndexResponse, raw, "RepositoryIndexResponse")
        for m in resp.models:
            k = (str(m.name), str(m.version))
            if k not in union or m.state == "READY":
                union[k] = m
    listed = {name for name, _ in union}
    for name in probed:
        if name not in listed:
            union[(name, "")] = pb.RepositoryIndexResponse.ModelIndex(name=name, state="READY")
            listed.add(name)
    out = pb.RepositoryIndexResponse()
    for k in sorted(union):
        if not ready_only or union[k].state == "READY":
            out.models.add().CopyFrom(union[k])
    return bytes(out.SerializeToString())
