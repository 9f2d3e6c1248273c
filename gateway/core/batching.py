"""Gateway-side batching: many small infer requests to one model become one merged request.

Rules (Triton's own dynamic-batching rules, applied before the request reaches a worker):

* Only requests with the same :class:`BatchKey` are merged: same model and version, same input
  names, datatypes, non-batch dimensions and input parameters, same request parameters (apart
  from ``binary_data_output``, which only says how a member wants its answer) and the same
  requested outputs with the same output parameters (apart from ``binary_data``). Keeping the
  requested outputs in the key means one member naming an unknown output cannot fail others.
* Never merged (:class:`NotBatchable`): models with ``max_batch_size`` 0, decoupled models,
  sequence requests, shared-memory tensors, raw bodies, scalar inputs, inputs whose first
  dimensions differ, requests larger than the model's ``max_batch_size``.
* Merge = concatenate each input's bytes along dimension 0 (BYTES elements carry their own
  lengths, so this holds for them too); every output is asked for in binary. Split = slice
  each output by rows; each member gets only the outputs it named (all when it named none),
  each in the encoding it asked for, with its own ``id``. An error fans out to every member.
* Planning is next-fit per key, most urgent member first (priority, then arrival): a batch
  is full when the next request would push it past ``max_batch_size`` rows or ``max_bytes``
  of tensor data, or when it reaches either limit. A single request above a limit travels
  alone.

When a batch that is not full closes (:func:`plan_closes`, time and the fleet as arguments):

* **full** — at once, whatever the fleet does (waiting cannot make it larger).
* **deadline** — when ``now`` reaches its earliest member deadline minus the expected
  service time of a batch (``DEADLINE_SERVICE_TIMES`` of it, a margin for its noise, and
  ``DEADLINE_MIN_MARGIN_S`` at least): later it could no longer be answered in time.
* **idle** — at once when nothing of the model is in flight (a lone caller at low load pays
  no delay), unless a batch of several members came back less than ``max_delay_ms`` ago:
  then until ``max_delay_ms`` after it (see **timer**).
* **held** — while every eligible instance of the model is busy and has a batch waiting
  behind it (the gateway's own in-flight count against ``BATCHES_PER_INSTANCE`` × the
  instances learned from the model's config), the batch keeps filling; an instance freeing
  wakes the planner. The one batch waiting per instance starts the moment the instance
  ends its execution — holding every batch until an answer came back would leave the
  instance idle for a round trip each time, which below saturation costs more latency
  than ``max_delay_ms``. Held at most ``max_delay_ms`` plus ``HOLD_SERVICE_TIMES`` service
  times (``HOLD_MIN_S`` at least), a safety bound for a count that never drops.
* **just in time** — while every instance is executing but one still has room for the
  batch that waits behind it, the batch keeps filling until shortly before the earliest
  execution is expected to end (its start — its send, or the previous answer if later —
  plus the execution time measured on batches that found the instance idle, less
  ``JUST_IN_TIME_MIN_S`` or ``JUST_IN_TIME_SHARE`` of a service time): it reaches the
  worker in time to start the moment the instance frees, as a request sent at once would,
  with every member that arrived meanwhile aboard. Bounded like **held**.
* **timer** — while an instance is free, ``max_delay_ms`` after its first member arrived or
  the last batch of several members came back, whichever is later: the callers that batch
  answered get that long to come back, so a closed loop converges to full batches instead
  of alternating between a lone request and the rest.

Free instances go to ready batches in order: most urgent member first, then the largest
batch, then the oldest. With ``wait_for_instance`` off (or no fleet to ask) the timer runs
from the first member's arrival only, whatever the instances do.

The pure core (:func:`compatibility_key`, :func:`plan_batches`, :func:`plan_closes`,
:func:`merge`, :func:`split`, :func:`render_response`) does no I/O and reads no clock.
:class:`~gateway.engine.batcher.Batcher` is the async shell: it carries out the plans, sends each
batch through an injected ``send`` coroutine and hands every member its own reply.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.core.errors import BadRequest, GatewayError, UpstreamError
from gateway.core.tensors import (
    ELEMENT_SIZE_BYTES,
    EncodedBody,
    HeadersLike,
    InferPeek,
    InferRequest,
    InferResponse,
    Parameters,
    RequestedOutput,
    Tensor,
    TensorSpec,
    bytes_element_offsets,
    decode_content,
    encode_infer_response,
    header_length_of,
    header_value,
    parse_infer_request,
    parse_infer_response,
    peek_infer_header,
    sequence_id_of,
)
from gateway.core.types import ModelKey

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN_BATCHES = 256
DEFAULT_MAX_WAITING_REQUESTS = 4096
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

FlushReason = Literal["full", "timer", "flush", "idle", "deadline", "held"]
FLUSH_REASONS: tuple[FlushReason, ...] = ("full", "timer", "flush", "idle", "deadline", "held")
# Batches at once per instance: one executing, one waiting inside the worker to start the
# moment it ends (module doc, **held**).
BATCHES_PER_INSTANCE = 2
# The batch waiting for a busy instance is sent this long before the instance is expected
# to end (at least), so that it is there when it does (module doc, **just in time**).
JUST_IN_TIME_MIN_S = 0.0015
JUST_IN_TIME_SHARE = 0.15
# A batch held for busy instances goes after max_delay plus this many service times at most
# (at least HOLD_MIN_S: the service time is unknown until a batch has come back).
HOLD_SERVICE_TIMES = 4.0
HOLD_MIN_S = 0.1
# A batch leaves when its earliest member deadline is this many service times away (the
# estimate is noisy; the dispatcher refuses a request whose time left is below it).
DEADLINE_SERVICE_TIMES = 2.0
DEADLINE_MIN_MARGIN_S = 0.05  # ... and at least this far (the service time may be unknown)
UNLIMITED_INSTANCES = 1 << 30
Headers = list[tuple[bytes, bytes]]
UpstreamReply = tuple[int, HeadersLike, bytes]


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """What a merged batch inherits from its members: the most urgent member's priority
    (lowest value) and the latest member deadline (members with an earlier one stop waiting
    for it on their own); ``tenants`` (and each member's rows) for accounting."""

    priority: int = 1
    deadline: float = float("inf")
    tenants: tuple[str | None, ...] = ()
    rows: int = 1
    member_rows: tuple[int, ...] = ()

    @classmethod
    def of(cls, members: Sequence[tuple[int, float, str | None]], rows: int,
           member_rows: Sequence[int] = ()) -> BatchMeta:
        if not members:
            return cls(rows=rows)
        return cls(priority=min(p for p, _, _ in members),
                   deadline=max(d for _, d, _ in members),
                   tenants=tuple(t for _, _, t in members), rows=rows,
                   member_rows=tuple(member_rows))

    def rows_by_tenant(self) -> tuple[tuple[str | None, int], ...]:
        """Each tenant's rows in the batch (one per member where rows are not known), the
        tenant with the most first (ties: the one whose member came first)."""
        rows: dict[str | None, int] = {}
        for i, tenant in enumerate(self.tenants):
            n = self.member_rows[i] if i < len(self.member_rows) else 1
            rows[tenant] = rows.get(tenant, 0) + max(1, n)
        order = {t: i for i, t in reversed(list(enumerate(self.tenants)))}
        return tuple(sorted(rows.items(), key=lambda kv: (-kv[1], order[kv[0]])))


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Requests with equal keys may share a batch. Fields hold canonical JSON text."""

    model: str
    version: str
    inputs: tuple[tuple[str, str, tuple[int, ...], str], ...]  # name, datatype, dims[1:], params
    parameters: str
    outputs: tuple[tuple[str, str], ...] | None  # None: the members name no outputs (all)

    @property
    def infer_path(self) -> str:
        version = f"/versions/{self.version}" if self.version else ""
        return f"/v2/models/{self.model}{version}/infer"


@dataclass(frozen=True, slots=True)
class NotBatchable:
    reason: str


@dataclass(frozen=True, slots=True)
class PendingItem:
    key: BatchKey
    rows: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Members are indices into the planned sequence, in arrival order. ``is_ready``: the batch
    can take no more members and should be sent now."""

    key: BatchKey
    members: tuple[int, ...]
    rows: int
    size_bytes: int
    is_ready: bool


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    @classmethod
    def from_error(cls, error: GatewayError) -> HttpReply:
        return cls(error.status, tuple(error.headers()), error.body())

    @classmethod
    def from_encoded(cls, encoded: EncodedBody, status: int = 200) -> HttpReply:
        return cls(status, tuple(encoded.headers()), encoded.body)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One dispatched batch, as handed to the ``on_batch`` hook."""

    key: BatchKey
    members: int
    rows: int
    size_bytes: int
    fill_ratio: float  # rows / max_batch_size
    reason: FlushReason
    oldest_wait_s: float


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    batches_sent: int
    requests_sent: int
    rows_sent: int
    failed_batches: int
    cancelled_requests: int
    rejected_requests: int
    open_batches: int
    waiting_requests: int
    in_flight_batches: int
    flushes: dict[str, int] = field(default_factory=dict)  # by FlushReason
    size_counts: tuple[tuple[int, int], ...] = ()  # (members ≤ bound, batches); last bound = rest
    mean_fill_ratio: float = 0.0
    mean_batch_size: float = 0.0
    service_time_s: float = 0.0  # expected time a batch takes (EWMA of send → reply)


@dataclass(frozen=True, slots=True)
class Waiting:
    """One member of an open batch, as the close planner sees it (monotonic seconds)."""

    rows: int
    size_bytes: int
    arrived_at: float
    priority: int = 1
    deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class FleetCounts:
    """The model's instances on its eligible workers (serving, model ready, breaker not
    open), counted by the gateway: ``busy`` requests of the model in flight there;
    ``service_time_s`` the shortest recent service time among them (0: unknown)."""

    free: int
    busy: int
    total: int
    service_time_s: float = 0.0


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What the close planner knows about the model's instances at ``now``: how many are
    free for this batcher, how many requests of the model are in flight, when the batcher's
    last batch came back (``-inf``: never) with how many members, and how long a batch is
    expected to take (0: unknown)."""

    free: int
    in_flight: int
    answered_at: float = float("-inf")
    answered: int = 0
    service_time_s: float = 0.0
    # Every instance is executing and the earliest is expected to end at this time (None:
    # an instance is idle, or nothing to go by): see **just in time** in the module doc.
    frees_at: float | None = None


@dataclass(frozen=True, slots=True)
class CloseRule:
    max_batch_size: int
    max_bytes: int
    max_delay_s: float
    send_when_idle: bool = True
    wait_for_instance: bool = True


@dataclass(frozen=True, slots=True)
class Close:
    """Send these members (indices into the key's waiting list) as one batch now."""

    key: BatchKey
    members: tuple[int, ...]
    reason: FlushReason


@dataclass(frozen=True, slots=True)
class ClosePlan:
    """The batches to send now, and when to plan again if nothing happens before
    (None: only an arrival or a freed instance can change anything)."""

    closes: tuple[Close, ...]
    wake_at: float | None


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------


def _canonical(params: Parameters, drop: str) -> str:
    if not params or (len(params) == 1 and drop in params):
        return "{}"
    return json.dumps({k: v for k, v in params.items() if k != drop}, sort_keys=True,
                      separators=(",", ":"))


def batch_rows(inputs: Sequence[Tensor] | Sequence[TensorSpec]) -> int | None:
    """The shared first dimension of all inputs; None if absent, scalar or inconsistent."""
    if not inputs or any(not t.shape for t in inputs):
        return None
    rows = {t.shape[0] for t in inputs}
    return rows.pop() if len(rows) == 1 else None


def request_rows(request: InferRequest) -> int:
    rows = batch_rows(request.inputs)
    if rows is None:
        raise BadRequest("inputs do not share a batch dimension")
    return rows


def request_size_bytes(request: InferRequest) -> int:
    return sum(len(t.data) for t in request.inputs)


def compatibility_key(model: ModelKey, request: InferRequest | InferPeek, *,
                      model_max_batch_size: int, decoupled: bool = False
                      ) -> BatchKey | NotBatchable:
    """The batch key of a request, or why it must travel alone."""
    if model_max_batch_size <= 0:
        return NotBatchable("model does not batch (max_batch_size 0)")
    if decoupled:
        return NotBatchable("decoupled model")
    if isinstance(request, InferPeek):
        if request.is_raw_body:
            return NotBatchable("raw binary body")
        if request.uses_shared_memory:
            return NotBatchable("shared-memory tensors")
    try:
        if sequence_id_of(request.parameters) is not None:
            return NotBatchable("sequence request")
    except BadRequest:
        return NotBatchable("malformed sequence_id")
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        return NotBatchable("duplicate input names")
    rows = batch_rows(request.inputs)
    if rows is None or rows == 0:
        return NotBatchable("inputs do not share a non-zero batch dimension")
    if rows > model_max_batch_size:
        return NotBatchable("batch larger than the model's max_batch_size")
    inputs = tuple(sorted((t.name, t.datatype, t.shape[1:],
                           _canonical(t.parameters, "binary_data_size"))
                          for t in request.inputs))
    outputs = (tuple(sorted((o.name, _canonical(o.parameters, "binary_data"))
                            for o in request.outputs)) if request.outputs else None)
    return BatchKey(model.name, model.version, inputs,
                    _canonical(request.parameters, "binary_data_output"), outputs)


def prepare(model: ModelKey, body: bytes, header_length: int | None, *,
            model_max_batch_size: int, decoupled: bool = False
            ) -> tuple[InferRequest, BatchKey] | NotBatchable:
    """For the proxy: peek at a (content-decoded) infer body and, only when it may be
    batched, decode it. A malformed batchable body raises :class:`BadRequest`."""
    early = compatibility_key(model, peek_infer_header(body, header_length),
                              model_max_batch_size=model_max_batch_size, decoupled=decoupled)
    if isinstance(early, NotBatchable):
        return early
    # The peek's key is the request's key: both read the same header fields.
    return parse_infer_request(body, header_length), early


def plan_batches(pending: Sequence[PendingItem], max_batch_size: int,
                 max_bytes: int) -> list[BatchPlan]:
    """Group pending requests (in arrival order) into batches, next-fit per key.

    No batch of two or more members exceeds ``max_batch_size`` rows or ``max_bytes``; a
    request above a limit on its own forms a batch alone. Every batch but the last of each
    key is ready; the last is ready when it has reached a limit. Batches are listed in the
    order they were opened."""
    plans: list[list[int]] = []
    sums: list[tuple[int, int]] = []
    open_by_key: dict[BatchKey, int] = {}
    for index, item in enumerate(pending):
        slot = open_by_key.get(item.key)
        if slot is not None:
            rows, size = sums[slot]
            if rows + item.rows <= max_batch_size and size + item.size_bytes <= max_bytes:
                plans[slot].append(index)
                sums[slot] = (rows + item.rows, size + item.size_bytes)
                continue
        open_by_key[item.key] = len(plans)
        plans.append([index])
        sums.append((item.rows, item.size_bytes))
    last = set(open_by_key.values())
    out = []
    for slot, members in enumerate(plans):
        rows, size = sums[slot]
        full = rows >= max_batch_size or size >= max_bytes
        out.append(BatchPlan(pending[members[0]].key, tuple(members), rows, size,
                             is_ready=full or slot not in last))
    return out


def instance_view(counts: FleetCounts | None, *, own_in_flight: int, answered_at: float,
                  answered: int, service_time_s: float, oldest_sent: float | None = None,
                  execution_s: float = 0.0) -> InstanceView:
    """Combine the fleet's counts with the batcher's own batches in flight: a batch already
    sent may not have reached a worker yet (it waits for the dispatcher), but it will take
    an instance. ``counts`` None (no fleet to ask): instances never run out. ``counts``
    counts places (``BATCHES_PER_INSTANCE`` per instance). ``oldest_sent``: when the
    batcher's oldest batch in flight was sent; ``execution_s``: how long a batch executes
    (measured on batches that found the instance idle; 0 unknown) — together, when the
    earliest instance frees, where every instance is executing."""
    if counts is None:
        return InstanceView(UNLIMITED_INSTANCES, own_in_flight, answered_at, answered,
                            service_time_s)
    free = max(0, min(counts.free, counts.total - own_in_flight))
    busy = max(counts.busy, own_in_flight)
    instances = max(1, counts.total // BATCHES_PER_INSTANCE)
    frees_at = None
    if busy >= instances and oldest_sent is not None and execution_s > 0:
        # the oldest batch started when it was sent, or when the one before it came back
        frees_at = max(oldest_sent, answered_at) + execution_s
    return InstanceView(free, busy, answered_at, answered,
                        max(service_time_s, counts.service_time_s), frees_at)


def _pack(waiting: Sequence[Waiting], max_batch_size: int,
          max_bytes: int) -> list[tuple[list[int], int, int]]:
    """Next-fit over the members in priority order: (members, rows, bytes) per batch."""
    order = sorted(range(len(waiting)),
                   key=lambda i: (waiting[i].priority, waiting[i].arrived_at, i))
    chunks: list[tuple[list[int], int, int]] = []
    members: list[int] = []
    rows = size = 0
    for i in order:
        w = waiting[i]
        if members and (rows + w.rows > max_batch_size or size + w.size_bytes > max_bytes):
            chunks.append((members, rows, size))
            members, rows, size = [], 0, 0
        members.append(i)
        rows += w.rows
        size += w.size_bytes
    if members:
        chunks.append((members, rows, size))
    return chunks


def plan_closes(open_batches: Mapping[BatchKey, Sequence[Waiting]], view: InstanceView,
                rule: CloseRule, now: float) -> ClosePlan:
    """Which open batches to send at ``now`` (the rules are in the module docstring)."""
    closes: list[Close] = []
    free = view.free
    in_flight = view.in_flight
    # The callers a batch of several has just answered are likely to come back (a closed
    # loop): while an instance is free, wait max_delay for them rather than send whoever
    # returns first alone and hold the rest for a whole execution.
    recall_from = (view.answered_at if rule.wait_for_instance and view.answered >= 2
                   else float("-inf"))
    recalling = now < recall_from + rule.max_delay_s
    margin_s = max(DEADLINE_MIN_MARGIN_S, DEADLINE_SERVICE_TIMES * view.service_time_s)
    # (priority, -rows, first arrival, due, members, key) of the batches that are not full
    partial: list[tuple[int, int, float, float, tuple[int, ...], BatchKey]] = []
    for key, waiting in open_batches.items():
        chunks = _pack(waiting, rule.max_batch_size, rule.max_bytes)
        for index, (members, rows, size) in enumerate(chunks):
            mine = [waiting[i] for i in members]
            due = min(m.deadline for m in mine) - margin_s
            reason: FlushReason | None = None
            if (index < len(chunks) - 1 or rows >= rule.max_batch_size
                    or size >= rule.max_bytes):
                reason = "full"
            elif now >= due:
                reason = "deadline"
            if reason is None:
                partial.append((min(m.priority for m in mine), -rows,
                                min(m.arrived_at for m in mine), due, tuple(members), key))
                continue
            closes.append(Close(key, tuple(members), reason))
            free -= 1
            in_flight += 1
    wake_at = float("inf")
    partial.sort(key=lambda p: p[:3])
    for _, _, first, due, members_, key in partial:
        if in_flight <= 0 and (free <= 0 or (rule.send_when_idle and not recalling)):
            closes.append(Close(key, members_, "idle"))
        elif rule.wait_for_instance and (free <= 0 or view.frees_at is not None):
            hold_until = first + rule.max_delay_s + max(
                HOLD_MIN_S, HOLD_SERVICE_TIMES * view.service_time_s)
            if free > 0 and view.frees_at is not None:
                # A place waits behind a busy instance: go just in time for its end.
                hold_until = min(hold_until, max(first, view.frees_at - max(
                    JUST_IN_TIME_MIN_S, JUST_IN_TIME_SHARE * view.service_time_s)))
            if now < hold_until:
                wake_at = min(wake_at, hold_until, due)
                continue
            closes.append(Close(key, members_, "held"))
        else:
            ready_at = max(first, recall_from) + rule.max_delay_s
            if in_flight <= 0 and rule.send_when_idle and recalling:  # idle once it ends
                ready_at = min(ready_at, recall_from + rule.max_delay_s)
            if now < ready_at:
                wake_at = min(wake_at, ready_at, due)
                continue
            closes.append(Close(key, members_, "timer"))
        free -= 1
        in_flight += 1
    return ClosePlan(tuple(closes), wake_at if wake_at != float("inf") else None)


def merge(requests: Sequence[InferRequest]) -> InferRequest:
    """One request whose inputs are the members' inputs concatenated along dimension 0, in
    member order, asking for every output in binary. Members must share a batch key."""
    if not requests:
        raise ValueError("merge needs at least one request")
    first = requests[0]
    by_name = [{t.name: t for t in r.inputs} for r in requests]
    inputs = []
    for template in first.inputs:
        parts = []
        for member in by_name:
            part = member.get(template.name)
            if (part is None or part.datatype != template.datatype
                    or part.shape[1:] != template.shape[1:] or not part.shape):
                raise BadRequest(f"input '{template.name}' differs between batch members")
            parts.append(part)
        rows = sum(p.shape[0] for p in parts)
        inputs.append(Tensor(template.name, template.datatype, (rows, *template.shape[1:]),
                             b"".join(p.data for p in parts), template.parameters))
    params: Parameters = {k: v for k, v in first.parameters.items() if k != "binary_data_output"}
    outputs: tuple[RequestedOutput, ...] = ()
    if first.outputs:
        outputs = tuple(RequestedOutput(o.name, {**{k: v for k, v in o.parameters.items()
                                                    if k != "binary_data"},
                                                 "binary_data": True})
                        for o in first.outputs)
    else:
        params["binary_data_output"] = True
    return InferRequest("", params, tuple(inputs), outputs)


def _row_cuts(output: Tensor, member_rows: Sequence[int]) -> list[int]:
    """Byte offsets that cut ``output`` into the members' rows (len(member_rows) + 1)."""
    total = sum(member_rows)
    if not output.shape or output.shape[0] != total:
        raise UpstreamError(f"output '{output.name}' has shape {list(output.shape)}; the batch "
                            f"has {total} rows")
    per_row = math.prod(output.shape[1:])
    row_starts = [0, *itertools.accumulate(member_rows)]
    if output.datatype == "BYTES":
        try:
            offsets = bytes_element_offsets(output.data, output.name)
        except BadRequest as exc:
            raise UpstreamError(exc.message) from None
        if len(offsets) - 1 != total * per_row:
            raise UpstreamError(f"output '{output.name}' has {len(offsets) - 1} elements; "
                                f"shape needs {total * per_row}")
        return [offsets[r * per_row] for r in row_starts]
    row_bytes = per_row * ELEMENT_SIZE_BYTES[output.datatype]
    if len(output.data) != total * row_bytes:
        raise UpstreamError(f"output '{output.name}' has {len(output.data)} bytes; shape needs "
                            f"{total * row_bytes}")
    return [r * row_bytes for r in row_starts]


def split(merged: InferResponse, members: Sequence[InferRequest]) -> list[InferResponse]:
    """Each member's own response: its rows of the outputs it named (all when it named none;
    in the response's order), its own ``id``. Raises :class:`UpstreamError` if the response
    does not fit the batch."""
    member_rows = [request_rows(m) for m in members]
    pieces: dict[str, list[Tensor]] = {}
    for out in merged.outputs:
        cuts = _row_cuts(out, member_rows)
        pieces[out.name] = [
            Tensor(out.name, out.datatype, (rows, *out.shape[1:]), out.data[a:b], out.parameters)
            for rows, a, b in zip(member_rows, cuts, cuts[1:], strict=False)
        ]
    responses = []
    for index, member in enumerate(members):
        # Members of one batch named the same outputs (they share a key), so the worker's own
        # choice and order of outputs for the merged request is what each would have got.
        wanted = {o.name for o in member.outputs}
        outputs = tuple(pieces[out.name][index] for out in merged.outputs
                        if not wanted or out.name in wanted)
        responses.append(InferResponse(merged.model_name, merged.model_version, member.id,
                                       outputs, merged.parameters))
    return responses


def render_response(member: InferRequest, response: InferResponse) -> HttpReply:
    """The response encoded as the member asked: binary for outputs with ``binary_data`` or
    under ``binary_data_output``, JSON otherwise."""
    binary = {t.name for t in response.outputs if member.wants_binary(t.name, t.datatype)}
    return HttpReply.from_encoded(encode_infer_response(response, binary_outputs=binary))


def error_reply(status: int, body: bytes) -> HttpReply:
    """An upstream error for every member: Triton's ``{"error": ...}`` passed on as is, any
    other body wrapped in that shape."""
    try:
        doc = json.loads(body)
        valid = isinstance(doc, dict) and isinstance(doc.get("error"), str)
    except ValueError:
        valid = False
    if not valid:
        text = body[:200].decode("utf-8", "replace")
        body = json.dumps({"error": f"upstream answered {status}: {text}"}).encode()
    return HttpReply(status, ((b"content-type", b"application/json"),), body)


def replies_for(members: Sequence[InferRequest], status: int, headers: HeadersLike,
                body: bytes) -> list[HttpReply]:
    """Turn the upstream's answer to a merged request into one reply per member."""
    if status != 200:
        return [error_reply(status, body)] * len(members)
    try:
        body = decode_content(body, header_value(headers, "content-encoding"),
                              max_bytes=DEFAULT_MAX_RESPONSE_BYTES)
        merged = parse_infer_response(body, header_length_of(headers))
        responses = split(merged, members)
    except UpstreamError as exc:
        return [HttpReply.from_error(exc)] * len(members)
    except GatewayError as exc:
        return [HttpReply.from_error(UpstreamError(f"bad batched response: {exc.message}"))
                ] * len(members)
    return [render_response(m, r) for m, r in zip(members, responses, strict=True)]


__all__ = [
    "BatchKey", "BatchMeta", "BatchPlan", "BatchRecord", "BatcherStatistics", "Close",
    "ClosePlan", "CloseRule", "FleetCounts", "HttpReply", "InstanceView", "NotBatchable",
    "PendingItem", "Waiting", "batch_rows", "compatibility_key", "error_reply",
    "instance_view", "merge", "plan_batches", "plan_closes", "prepare", "render_response",
    "replies_for", "request_rows", "request_size_bytes", "split",
]
