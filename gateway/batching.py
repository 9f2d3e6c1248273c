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
* Planning is next-fit in arrival order per key: a batch closes when the next request would
  push it past ``max_batch_size`` rows or ``max_bytes`` of tensor data, or when it reaches
  either limit. A single request above a limit travels alone.

The pure core (:func:`compatibility_key`, :func:`plan_batches`, :func:`merge`, :func:`split`,
:func:`render_response`) does no I/O and reads no clock. :class:`Batcher` is the async shell:
it gathers members for ``max_delay_ms`` from the first member's arrival, sends each batch
through an injected ``send`` coroutine and hands every member its own reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import BatchingConfig
from gateway.errors import BadRequest, GatewayError, Overloaded, UpstreamError
from gateway.tensors import (
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
    encode_infer_request,
    encode_infer_response,
    header_length_of,
    header_value,
    parse_infer_request,
    parse_infer_response,
    peek_infer_header,
    sequence_id_of,
)
from gateway.types import ModelKey

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN_BATCHES = 256
DEFAULT_MAX_WAITING_REQUESTS = 4096
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

FlushReason = Literal["full", "timer", "flush", "idle"]
Headers = list[tuple[bytes, bytes]]
UpstreamReply = tuple[int, HeadersLike, bytes]
Send = Callable[["BatchKey", bytes, Headers, "BatchMeta"], Awaitable[UpstreamReply]]


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """What a merged batch inherits from its members: the most urgent member's priority
    (lowest value) and the latest member deadline (members with an earlier one stop waiting
    for it on their own); ``tenants`` for accounting."""

    priority: int = 1
    deadline: float = float("inf")
    tenants: tuple[str | None, ...] = ()
    rows: int = 1

    @classmethod
    def of(cls, members: Sequence[tuple[int, float, str | None]], rows: int) -> BatchMeta:
        if not members:
            return cls(rows=rows)
        return cls(priority=min(p for p, _, _ in members),
                   deadline=max(d for _, d, _ in members),
                   tenants=tuple(t for _, _, t in members), rows=rows)


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


# ---------------------------------------------------------------------------------------------
# Async shell
# ---------------------------------------------------------------------------------------------


class _Member:
    __slots__ = ("arrived_at", "deadline", "future", "priority", "request", "rows",
                 "size_bytes", "tenant")

    def __init__(self, request: InferRequest, future: asyncio.Future[HttpReply],
                 arrived_at: float, priority: int = 1, deadline: float = float("inf"),
                 tenant: str | None = None) -> None:
        self.request = request
        self.priority = priority
        self.deadline = deadline
        self.tenant = tenant
        self.rows = request_rows(request)
        self.size_bytes = request_size_bytes(request)
        self.future = future
        self.arrived_at = arrived_at


class _OpenBatch:
    __slots__ = ("members", "timer")

    def __init__(self) -> None:
        self.members: list[_Member] = []
        self.timer: asyncio.TimerHandle | None = None


class Batcher:
    """Gathers compatible requests of one model and sends each batch as one request.

    ``send(key, body, headers)`` posts a merged body to ``key.infer_path`` of some worker and
    returns ``(status, headers, body)`` with the body as the worker sent it (the headers ask
    for ``accept-encoding: identity``; a body the client decompressed by itself must not keep
    its ``content-encoding`` header). It may raise a :class:`GatewayError`; any other
    exception becomes a 502 for every member. ``submit`` raises :class:`Overloaded` when the
    batcher is full or closed."""

    __slots__ = ("_batches_sent", "_cancelled", "_clock", "_closed", "_failed", "_flushes",
                 "_max_open_batches", "_max_waiting", "_on_batch", "_open", "_rejected",
                 "_requests_sent", "_rows_sent", "_send", "_size_counts", "_tasks", "_waiting",
                 "flush_when_idle", "max_batch_size", "max_bytes", "max_delay_s")

    def __init__(self, send: Send, *, max_batch_size: int, max_delay_ms: float,
                 max_bytes: int, max_open_batches: int = DEFAULT_MAX_OPEN_BATCHES,
                 max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
                 clock: Callable[[], float] | None = None,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 flush_when_idle: bool = False) -> None:
        if max_batch_size < 1 or max_bytes < 1 or max_delay_ms < 0:
            raise ValueError("max_batch_size and max_bytes must be positive, max_delay_ms >= 0")
        self._send = send
        self.flush_when_idle = flush_when_idle
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_bytes = max_bytes
        self._max_open_batches = max_open_batches
        self._max_waiting = max_waiting_requests
        self._clock = clock
        self._on_batch = on_batch
        self._open: dict[BatchKey, _OpenBatch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0  # members whose reply is not set yet (open or in flight)
        self._closed = False
        self._batches_sent = 0
        self._requests_sent = 0
        self._rows_sent = 0
        self._failed = 0
        self._cancelled = 0
        self._rejected = 0
        self._flushes: dict[str, int] = {"full": 0, "timer": 0, "flush": 0, "idle": 0}
        self._size_counts = [0] * (len(_SIZE_BUCKETS) + 1)

    @classmethod
    def from_config(cls, config: BatchingConfig, send: Send, *, model_max_batch_size: int,
                    clock: Callable[[], float] | None = None,
                    on_batch: Callable[[BatchRecord], None] | None = None) -> Batcher:
        limit = model_max_batch_size
        if config.max_batch_size is not None:
            limit = min(limit, config.max_batch_size) if limit > 0 else config.max_batch_size
        return cls(send, max_batch_size=max(1, limit), max_delay_ms=config.max_delay_ms,
                   max_bytes=config.max_bytes, clock=clock, on_batch=on_batch,
                   flush_when_idle=config.flush_when_idle)

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def can_accept(self, key: BatchKey) -> bool:
        if self._closed or self._waiting >= self._max_waiting:
            return False
        return key in self._open or len(self._open) < self._max_open_batches

    async def submit(self, request: InferRequest, key: BatchKey, *, priority: int = 1,
                     deadline: float = float("inf"), tenant: str | None = None) -> HttpReply:
        """Wait for a place in a batch and return this request's own reply. Cancelling the
        caller withdraws it from a batch not sent yet, or drops its result otherwise.
        ``priority``, ``deadline`` (monotonic) and ``tenant`` travel with the member; the
        merged batch is sent with :class:`BatchMeta` of its members."""
        if not self.can_accept(key):
            self._rejected += 1
            raise Overloaded("batcher full" if not self._closed else "batcher closed")
        loop = asyncio.get_running_loop()
        member = _Member(request, loop.create_future(), self._now(), priority, deadline, tenant)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _OpenBatch()
        batch.members.append(member)
        self._waiting += 1
        self._replan(key, batch)
        try:
            return await member.future
        except asyncio.CancelledError:
            self._cancelled += 1
            self._withdraw(key, member)
            raise

    def flush(self, key: BatchKey | None = None) -> None:
        """Send the open batch of ``key`` (of every key when None) now."""
        for k in [key] if key is not None else list(self._open):
            batch = self._open.get(k)
            if batch is not None:
                self._dispatch(k, batch, len(batch.members), "flush")

    def flush_due(self, now: float) -> None:
        """Send every open batch whose first member has waited ``max_delay_ms`` by ``now``."""
        for k, batch in list(self._open.items()):
            if batch.members and now - batch.members[0].arrived_at >= self.max_delay_s:
                self._dispatch(k, batch, len(batch.members), "timer")

    def _replan(self, key: BatchKey, batch: _OpenBatch) -> None:
        items = [PendingItem(key, m.rows, m.size_bytes) for m in batch.members]
        for plan in plan_batches(items, self.max_batch_size, self.max_bytes):
            if not plan.is_ready:
                break
            self._dispatch(key, batch, len(plan.members), "full")
        if (self.flush_when_idle and batch.members and not self._tasks
                and self._open.get(key) is batch):
            # Nothing of this model is in flight: waiting would only add latency (a lone
            # caller at low load). While batches are in flight, members gather for up to
            # max_delay_ms, so batches grow with load.
            self._dispatch(key, batch, len(batch.members), "idle")
            return
        self._arm_timer(key, batch)

    def _arm_timer(self, key: BatchKey, batch: _OpenBatch) -> None:
        if not batch.members or batch.timer is not None:
            return
        delay_s = max(0.0, batch.members[0].arrived_at + self.max_delay_s - self._now())
        batch.timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer, key, batch)

    def _on_timer(self, key: BatchKey, batch: _OpenBatch) -> None:
        batch.timer = None
        if self._open.get(key) is batch and batch.members:
            self._dispatch(key, batch, len(batch.members), "timer")

    def _dispatch(self, key: BatchKey, batch: _OpenBatch, count: int,
                  reason: FlushReason) -> None:
        """Send the first ``count`` members of an open batch."""
        members, batch.members = batch.members[:count], batch.members[count:]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if batch.members:
            self._arm_timer(key, batch)
        elif self._open.get(key) is batch:
            del self._open[key]
        if not members:
            return
        rows = sum(m.rows for m in members)
        size = sum(m.size_bytes for m in members)
        self._batches_sent += 1
        self._requests_sent += len(members)
        self._rows_sent += rows
        self._flushes[reason] += 1
        self._size_counts[_size_bucket(len(members))] += 1
        if self._on_batch is not None:
            record = BatchRecord(key, len(members), rows, size, rows / self.max_batch_size,
                                 reason, self._now() - members[0].arrived_at)
            try:
                self._on_batch(record)
            except Exception:
                log.exception("batch metrics hook failed")
        task = asyncio.get_running_loop().create_task(self._run(key, members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _withdraw(self, key: BatchKey, member: _Member) -> None:
        batch = self._open.get(key)
        if batch is not None and member in batch.members:
            batch.members.remove(member)
            self._waiting -= 1
            if not batch.members:
                if batch.timer is not None:
                    batch.timer.cancel()
                del self._open[key]

    async def _run(self, key: BatchKey, members: list[_Member]) -> None:
        if all(m.future.done() for m in members):  # every caller has gone: skip the work
            self._waiting -= len(members)
            return
        requests = [m.request for m in members]
        replies: list[HttpReply] | None = None
        try:
            try:
                encoded = encode_infer_request(merge(requests), binary=True)
                headers = [*encoded.headers(), (b"accept-encoding", b"identity")]
                meta = BatchMeta.of([(m.priority, m.deadline, m.tenant) for m in members],
                                    rows=sum(m.rows for m in members))
                status, reply_headers, body = await self._send(key, encoded.body, headers, meta)
                replies = replies_for(requests, status, reply_headers, body)
            except GatewayError as exc:
                replies = [HttpReply.from_error(exc)] * len(members)
            except Exception as exc:  # the send hook is foreign code: contain, never hang
                log.exception("batched send failed")
                error = UpstreamError(f"batched request failed: {type(exc).__name__}: {exc}")
                replies = [HttpReply.from_error(error)] * len(members)
            if replies[0].status != 200:
                self._failed += 1
        finally:
            if replies is None:  # cancelled (batcher closing): nobody may hang
                replies = [HttpReply.from_error(UpstreamError("batcher closed"))] * len(members)
            for member, reply in zip(members, replies, strict=True):
                self._waiting -= 1
                if not member.future.done():
                    member.future.set_result(reply)

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Refuse new members, send what is open, wait up to ``timeout_s`` for batches in
        flight, then cancel the rest (their members get a 502)."""
        self._closed = True
        self.flush()
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    def statistics(self) -> BatcherStatistics:
        bounds = [*_SIZE_BUCKETS, _SIZE_BUCKETS[-1] + 1]
        sent = self._batches_sent
        return BatcherStatistics(
            batches_sent=sent,
            requests_sent=self._requests_sent,
            rows_sent=self._rows_sent,
            failed_batches=self._failed,
            cancelled_requests=self._cancelled,
            rejected_requests=self._rejected,
            open_batches=len(self._open),
            waiting_requests=self._waiting,
            in_flight_batches=len(self._tasks),
            flushes=dict(self._flushes),
            size_counts=tuple(zip(bounds, self._size_counts, strict=True)),
            mean_fill_ratio=self._rows_sent / (sent * self.max_batch_size) if sent else 0.0,
            mean_batch_size=self._requests_sent / sent if sent else 0.0,
        )

    def __repr__(self) -> str:
        return (f"Batcher(max_batch_size={self.max_batch_size}, "
                f"max_delay_ms={self.max_delay_s * 1000:g}, max_bytes={self.max_bytes}, "
                f"open={len(self._open)}, waiting={self._waiting}, in_flight={len(self._tasks)})")


def _size_bucket(members: int) -> int:
    for index, bound in enumerate(_SIZE_BUCKETS):
        if members <= bound:
            return index
    return len(_SIZE_BUCKETS)


__all__ = [
    "BatchKey", "BatchMeta", "BatchPlan", "BatchRecord", "Batcher", "BatcherStatistics",
    "HttpReply",
    "NotBatchable", "PendingItem", "batch_rows", "compatibility_key", "error_reply", "merge",
    "plan_batches", "prepare", "render_response", "replies_for", "request_rows",
    "request_size_bytes", "split",
]
