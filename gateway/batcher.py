"""The async shell of gateway-side batching: a :class:`Batcher` per model gathers compatible
requests and sends each batch as one request (the rules — compatibility keys, planning,
merging and splitting — are the pure :mod:`gateway.batching`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.batching import (
    _SIZE_BUCKETS,
    DEFAULT_MAX_OPEN_BATCHES,
    DEFAULT_MAX_WAITING_REQUESTS,
    BatcherStatistics,
    BatchKey,
    BatchMeta,
    BatchRecord,
    FlushReason,
    Headers,
    HttpReply,
    PendingItem,
    UpstreamReply,
    merge,
    plan_batches,
    replies_for,
    request_rows,
    request_size_bytes,
)
from gateway.config import BatchingConfig
from gateway.errors import GatewayError, Overloaded, UpstreamError
from gateway.tensors import InferRequest, encode_infer_request

log = logging.getLogger("gateway.batching")

Send = Callable[[BatchKey, bytes, Headers, BatchMeta], Awaitable[UpstreamReply]]




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


