"""The async shell of gateway-side batching: a :class:`Batcher` per model gathers compatible
requests and sends each batch as one request (the rules — compatibility keys, when a batch
closes, merging and splitting — are the pure :mod:`gateway.core.batching`). The shell only keeps
the open batches, asks :func:`~gateway.core.batching.plan_closes` what to send on each arrival,
freed instance and wake-up, and carries the plan out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.core.batching import (
    _SIZE_BUCKETS,
    DEFAULT_MAX_OPEN_BATCHES,
    DEFAULT_MAX_WAITING_REQUESTS,
    FLUSH_REASONS,
    BatcherStatistics,
    BatchKey,
    BatchMeta,
    BatchRecord,
    CloseRule,
    FleetCounts,
    FlushReason,
    Headers,
    HttpReply,
    InstanceView,
    UpstreamReply,
    Waiting,
    instance_view,
    merge,
    plan_closes,
    replies_for,
    request_rows,
    request_size_bytes,
)
from gateway.core.config import BatchingConfig
from gateway.core.errors import GatewayError, Overloaded, UpstreamError
from gateway.core.tensors import InferRequest, encode_infer_request

log = logging.getLogger("gateway.core.batching")

Send = Callable[[BatchKey, bytes, Headers, BatchMeta], Awaitable[UpstreamReply]]




class _Member:
    __slots__ = ("arrived_at", "deadline", "future", "priority", "request", "rows",
                 "size_bytes", "tenant", "waiting")

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
        self.waiting = Waiting(self.rows, self.size_bytes, arrived_at, priority, deadline)


class Batcher:
    """Gathers compatible requests of one model and sends each batch as one request.

    ``send(key, body, headers)`` posts a merged body to ``key.infer_path`` of some worker and
    returns ``(status, headers, body)`` with the body as the worker sent it (the headers ask
    for ``accept-encoding: identity``; a body the client decompressed by itself must not keep
    its ``content-encoding`` header). It may raise a :class:`GatewayError`; any other
    exception becomes a 502 for every member. ``submit`` raises :class:`Overloaded` when the
    batcher is full or closed.

    ``fleet()`` counts the model's instances (free, busy, total) on its eligible workers;
    the owner calls :meth:`instance_freed` whenever a request of the model ends. Without
    ``fleet`` instances never run out and batches close on the timer (and when idle or
    full). When to close is decided by :func:`~gateway.core.batching.plan_closes`."""

    __slots__ = ("_answered", "_answered_at", "_batches_sent", "_cancelled", "_clock",
                 "_closed", "_execution_s", "_failed", "_fleet", "_flushes", "_max_open_batches",
                 "_max_waiting", "_on_batch", "_open", "_plan_soon", "_rejected",
                 "_requests_sent", "_rows_sent", "_send", "_sent_at", "_service_time_s",
                 "_size_counts", "_tasks", "_timer", "_timer_at", "_waiting",
                 "flush_when_idle", "max_batch_size", "max_bytes", "max_delay_s",
                 "wait_for_instance")

    def __init__(self, send: Send, *, max_batch_size: int, max_delay_ms: float,
                 max_bytes: int, max_open_batches: int = DEFAULT_MAX_OPEN_BATCHES,
                 max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS,
                 clock: Callable[[], float] | None = None,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 flush_when_idle: bool = False, wait_for_instance: bool = True,
                 fleet: Callable[[], FleetCounts | None] | None = None) -> None:
        if max_batch_size < 1 or max_bytes < 1 or max_delay_ms < 0:
            raise ValueError("max_batch_size and max_bytes must be positive, max_delay_ms >= 0")
        self._send = send
        self.flush_when_idle = flush_when_idle
        self.wait_for_instance = wait_for_instance
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_bytes = max_bytes
        self._max_open_batches = max_open_batches
        self._max_waiting = max_waiting_requests
        self._clock = clock
        self._on_batch = on_batch
        self._fleet = fleet
        self._open: dict[BatchKey, list[_Member]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0  # members whose reply is not set yet (open or in flight)
        self._answered_at = float("-inf")  # when the last batch came back, with how many
        self._answered = 0
        self._service_time_s = 0.0
        # When each batch handed to send() that has not come back was sent (oldest first),
        # and how long a batch executes when it finds the instance idle: together, when the
        # busy instance frees (batching.py).
        self._sent_at: list[float] = []
        self._execution_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._plan_soon: asyncio.Handle | None = None
        self._closed = False
        self._batches_sent = 0
        self._requests_sent = 0
        self._rows_sent = 0
        self._failed = 0
        self._cancelled = 0
        self._rejected = 0
        self._flushes: dict[str, int] = dict.fromkeys(FLUSH_REASONS, 0)
        self._size_counts = [0] * (len(_SIZE_BUCKETS) + 1)

    @classmethod
    def from_config(cls, config: BatchingConfig, send: Send, *, model_max_batch_size: int,
                    clock: Callable[[], float] | None = None,
                    on_batch: Callable[[BatchRecord], None] | None = None,
                    fleet: Callable[[], FleetCounts | None] | None = None) -> Batcher:
        limit = model_max_batch_size
        if config.max_batch_size is not None:
            limit = min(limit, config.max_batch_size) if limit > 0 else config.max_batch_size
        return cls(send, max_batch_size=max(1, limit), max_delay_ms=config.max_delay_ms,
                   max_bytes=config.max_bytes, clock=clock, on_batch=on_batch,
                   flush_when_idle=config.flush_when_idle,
                   wait_for_instance=config.wait_for_instance, fleet=fleet)

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
        self._open.setdefault(key, []).append(member)
        self._waiting += 1
        self._plan()
        try:
            return await member.future
        except asyncio.CancelledError:
            self._cancelled += 1
            self._withdraw(key, member)
            raise

    def instance_freed(self) -> None:
        """A request of the model ended, so an instance may be free: plan again once the
        current callback is over (the batch that just ended has then left ``send``)."""
        if self._plan_soon is None and self._open:
            self._plan_soon = asyncio.get_running_loop().call_soon(self._planned_soon)

    def _planned_soon(self) -> None:
        self._plan_soon = None
        self._plan()

    def flush(self, key: BatchKey | None = None) -> None:
        """Send the open batch of ``key`` (of every key when None) now."""
        for k in [key] if key is not None else list(self._open):
            members = self._open.get(k)
            if members:
                self._dispatch(k, list(members), "flush")

    def flush_due(self, now: float) -> None:
        """Send every open batch whose first member has waited ``max_delay_ms`` by ``now``."""
        for k, members in list(self._open.items()):
            if members and now - members[0].arrived_at >= self.max_delay_s:
                self._dispatch(k, list(members), "timer")

    def view(self) -> InstanceView:
        """What the close planner knows about the model's instances now."""
        counts = self._fleet() if self._fleet is not None else None
        return instance_view(counts, own_in_flight=len(self._sent_at),
                             answered_at=self._answered_at, answered=self._answered,
                             service_time_s=self._service_time_s,
                             oldest_sent=self._sent_at[0] if self._sent_at else None,
                             execution_s=self._execution_s)

    def _plan(self) -> None:
        if not self._open:
            self._set_timer(None)
            return
        rule = CloseRule(self.max_batch_size, self.max_bytes, self.max_delay_s,
                         send_when_idle=self.flush_when_idle,
                         wait_for_instance=self.wait_for_instance)
        now = self._now()
        plan = plan_closes({k: [m.waiting for m in ms] for k, ms in self._open.items()},
                           self.view(), rule, now)
        batches = [(c.key, [self._open[c.key][i] for i in c.members], c.reason)
                   for c in plan.closes]  # indices refer to the lists as planned
        for key, members, reason in batches:
            self._dispatch(key, members, reason)
        self._set_timer(plan.wake_at if self._open else None)

    def _set_timer(self, at: float | None) -> None:
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf") if at is None else at
        if at is not None:
            delay_s = max(0.0, at - self._now())
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._plan()

    def _dispatch(self, key: BatchKey, members: list[_Member], reason: FlushReason) -> None:
        """Send ``members`` (taken out of the open batch of ``key``) as one batch."""
        if not members:
            return
        open_ = self._open.get(key)
        if open_ is not None:
            taken = {id(m) for m in members}
            open_[:] = [m for m in open_ if id(m) not in taken]
            if not open_:
                del self._open[key]
        if not self._open:
            self._set_timer(None)
        rows = sum(m.rows for m in members)
        size = sum(m.size_bytes for m in members)
        self._batches_sent += 1
        self._requests_sent += len(members)
        self._rows_sent += rows
        self._flushes[reason] += 1
        self._size_counts[_size_bucket(len(members))] += 1
        if self._on_batch is not None:
            oldest = min(m.arrived_at for m in members)
            record = BatchRecord(key, len(members), rows, size, rows / self.max_batch_size,
                                 reason, self._now() - oldest)
            try:
                self._on_batch(record)
            except Exception:
                log.exception("batch metrics hook failed")
        alone = not self._sent_at
        sent = self._now()
        self._sent_at.append(sent)
        task = asyncio.get_running_loop().create_task(self._run(key, members, sent, alone))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _withdraw(self, key: BatchKey, member: _Member) -> None:
        members = self._open.get(key)
        if members is not None and member in members:
            members.remove(member)
            self._waiting -= 1
            if not members:
                del self._open[key]
            if not self._open:
                self._set_timer(None)

    async def _run(self, key: BatchKey, members: list[_Member], sent: float,
                   alone: bool) -> None:
        if all(m.future.done() for m in members):  # every caller has gone: skip the work
            self._waiting -= len(members)
            self._sent_back(sent, None, 0)
            return
        requests = [m.request for m in members]
        replies: list[HttpReply] | None = None
        sending = True
        try:
            try:
                encoded = encode_infer_request(merge(requests), binary=True)
                headers = [*encoded.headers(), (b"accept-encoding", b"identity")]
                meta = BatchMeta.of([(m.priority, m.deadline, m.tenant) for m in members],
                                    rows=sum(m.rows for m in members),
                                    member_rows=[m.rows for m in members])
                started = self._now()
                try:
                    status, reply_headers, body = await self._send(key, encoded.body,
                                                                   headers, meta)
                finally:
                    sending = False
                    self._sent_back(sent, self._now() - started, len(members), alone=alone)
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
            if sending:  # merging failed before the send
                self._sent_back(sent, None, 0)
            if replies is None:  # cancelled (batcher closing): nobody may hang
                replies = [HttpReply.from_error(UpstreamError("batcher closed"))] * len(members)
            for member, reply in zip(members, replies, strict=True):
                self._waiting -= 1
                if not member.future.done():
                    member.future.set_result(reply)

    def _sent_back(self, sent: float, took_s: float | None, members: int, *,
                   alone: bool = False) -> None:
        self._sent_at.remove(sent)
        if took_s is not None and alone:
            self._execution_s = (took_s if self._execution_s == 0.0
                                 else 0.8 * self._execution_s + 0.2 * took_s)
        if took_s is not None:
            self._answered_at = self._now()
            self._answered = members
            # The planner's expected service time: send → reply of a whole batch, queueing
            # at the worker included (what a member's deadline has to cover).
            self._service_time_s = (took_s if self._service_time_s == 0.0
                                    else 0.8 * self._service_time_s + 0.2 * took_s)

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
            service_time_s=self._service_time_s,
        )

    def __repr__(self) -> str:
        return (f"Batcher(max_batch_size={self.max_batch_size}, "
                f"max_delay_ms={self.max_delay_s * 1000:g}, max_bytes={self.max_bytes}, "
                f"open={len(self._open)}, waiting={self._waiting}, in_flight={len(self._tasks)}, "
                f"wait_for_instance={self.wait_for_instance})")


def _size_bucket(members: int) -> int:
    for index, bound in enumerate(_SIZE_BUCKETS):
        if members <= bound:
            return index
    return len(_SIZE_BUCKETS)


