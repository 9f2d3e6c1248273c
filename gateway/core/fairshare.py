"""Fair share of the GPUs between tenants, metered in GPU-seconds (pure).

Two parts, both taking time and costs as arguments:

* :class:`CostModel` — what one request costs the GPU, learned per (worker, model,
  batch-size bucket). The gateway's own timing of each completed request gives the *shape*
  (how the cost grows with the batch): the departure-based service time, ``answered −
  max(sent, the worker's previous answer)`` (answers arrive in execution order; the body
  relay afterwards may not), which is exact for a worker that executes one request at a
  time and an underestimate where several execute at once. Triton's
  counters between two scrapes give the *scale*: ``Δnv_inference_compute_infer_duration_us ×
  Δnv_inference_exec_count / Δnv_inference_request_success`` is the GPU time the interval's
  executions took (Triton counts an execution's compute time once per request in it), i.e.
  per request ``G``; the (worker, model) scale is ``G`` over the gateway's mean estimate
  for the requests it saw complete in the interval, smoothed and clipped. A request's cost is
  estimated before dispatch (worker unknown: the mean over the workers that know the model)
  and settled after, at the learned cost of the worker that ran it.
* :class:`FairShare` — the tags of **start-time fair queuing** (Goyal, Vin and Cheng, 1996)
  over those costs, plus each tenant's meter. A request of tenant ``i`` with estimated cost
  ``c`` gets, when it becomes the head of its tenant's flow in the wait queue (or takes a
  slot without waiting), the start tag ``S = max(v − idle_credit_s, F_i)`` and moves the
  tenant's finish tag to ``F_i = S + c / w_i``; a head that leaves unserved is handed back
  (:meth:`FairShare.refund`). The wait queue serves the lowest head tag inside each
  priority band; ``v`` is the largest start tag handed a slot so far, never past the best
  tag still waiting.

Why start-time fair queuing, not a finish-time scheme (WFQ/WF²Q) or deficit round robin:

* The order of a request does not depend on its *own* cost estimate, only on its tenant's
  earlier requests, and an estimate that was wrong is corrected at settlement by moving the
  tenant's finish tag (``F_i += (actual − estimated) / w_i``). Costs are estimates here
  (learned, per bucket), so ordering by them as little as possible matters.
* Its virtual time is the tag in service — no fluid reference system to simulate, which would
  need the fleet's capacity in GPU-seconds per second, itself only an estimate.
* It is work-conserving by construction (a tenant alone always has the lowest tag), and its
  delay bound for a light tenant is one request of every other tenant ahead of it, the
  floor for executions that cannot be interrupted. Deficit round robin needs a quantum at
  least one maximal request large, and so delays a batch-1 tenant by whole quanta.
* **Idle credit is bounded**: a tenant that was idle starts at ``v − idle_credit_s``, never
  lower, however long it was away (its old finish tag is behind ``v``), so it may jump at most
  ``idle_credit_s`` GPU-seconds of other tenants' queued work, never build a burst. The
  default is no credit at all: a tenant whose queue keeps running dry would take the credit
  at every arrival and so more than its weight; a light tenant needs none, its start tag
  ``v`` is already ahead of every queued request of a busier tenant.

``v`` and the tags are global over the priority bands: the queue orders by band first, so a
tenant's critical traffic is still charged to its account.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

DEFAULT_ITEM_COST_S = 0.001   # per batch item, before anything is learned
DEFAULT_IDLE_CREDIT_S = 0.0   # virtual GPU-seconds an idle tenant may jump ahead by
DEFAULT_HALF_LIFE_S = 10.0    # the window of shares and Jain's index
MAX_COST_KEYS = 4096          # (worker, model, bucket) entries; beyond it nothing new is learned
MAX_TENANTS = 4096
SCALE_BOUNDS = (0.05, 20.0)   # the counters' correction of the gateway's timings
EWMA_ALPHA = 0.2
ACTIVE_FRACTION = 0.01        # of the largest recent share: below it a tenant is not active
MIN_LEAD_S = 0.005             # just-in-time pipelining: send this long before a unit frees
LEAD_FRACTION = 0.25          # … or this fraction of the running execution, if longer
MAX_IN_FLIGHT_TRACKED = 4096  # per worker
ANONYMOUS = "(anonymous)"     # the account of requests without a tenant (weight 1)


def tenant_label(tenant: str | None) -> str:
    return ANONYMOUS if tenant is None else tenant


def batch_bucket(batch: int) -> int:
    """Power-of-two bucket of a batch size: 1 → 0, 2 → 1, 3–4 → 2, 5–8 → 3, …"""
    return max(0, math.ceil(math.log2(max(1, batch))))


def jain_index(values: list[float]) -> float:
    """Jain's fairness index ``(Σx)² / (n·Σx²)``: 1 when all equal, 1/n when one has all;
    1 for no values (nothing to be unfair about)."""
    if not values:
        return 1.0
    total = sum(values)
    squares = sum(x * x for x in values)
    return total * total / (len(values) * squares) if squares > 0 else 1.0


# ------------------------------------------------------------------ cost

@dataclass(frozen=True, slots=True)
class CostStatistics:
    entries: int
    scales: tuple[tuple[str, str, float], ...]  # (worker, model, counters' scale)
    counter_intervals: int


class CostModel:
    """GPU-seconds per request, learned per (worker, model, batch bucket)."""

    __slots__ = ("_by_model", "_counters", "_entries", "_intervals", "_pending", "_scale",
                 "_timing", "item_cost_s")

    def __init__(self, item_cost_s: float = DEFAULT_ITEM_COST_S) -> None:
        self.item_cost_s = item_cost_s
        # (worker, model) → bucket → seconds; model → its workers (estimate() reads only those)
        self._timing: dict[tuple[str, str], dict[int, float]] = {}
        self._by_model: dict[str, set[str]] = {}
        self._entries = 0
        self._scale: dict[tuple[str, str], float] = {}
        # completions seen since the last counter interval: (count, Σ estimate)
        self._pending: dict[tuple[str, str], tuple[int, float]] = {}
        self._counters: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._intervals = 0

    def __repr__(self) -> str:
        return f"<CostModel entries={self._entries} scales={len(self._scale)}>"

    def observe(self, worker: str, model: str, batch: int, service_s: float) -> None:
        """The gateway's own timing of one completed request on ``worker``."""
        if not service_s > 0 or not math.isfinite(service_s):
            return
        bucket = batch_bucket(batch)
        wm = (worker, model)
        buckets = self._timing.get(wm)
        old = buckets.get(bucket) if buckets is not None else None
        if old is None:
            if self._entries >= MAX_COST_KEYS:
                return
            if buckets is None:
                buckets = self._timing[wm] = {}
                self._by_model.setdefault(model, set()).add(worker)
            buckets[bucket] = service_s
            self._entries += 1
        else:
            assert buckets is not None
            buckets[bucket] = old + EWMA_ALPHA * (service_s - old)
        n, total = self._pending.get(wm, (0, 0.0))
        self._pending[wm] = (n + 1, total + buckets[bucket])

    def on_counters(self, worker: str, model: str, compute_infer_us: float,
                    exec_count: float, success: float) -> None:
        """Triton's cumulative counters for (``worker``, ``model``) at one scrape."""
        wm = (worker, model)
        prev = self._counters.get(wm)
        if prev is None and len(self._counters) >= MAX_COST_KEYS:
            return
        self._counters[wm] = (compute_infer_us, exec_count, success)
        if prev is None:
            self._pending.pop(wm, None)
            return
        d_compute = compute_infer_us - prev[0]
        d_exec = exec_count - prev[1]
        d_success = success - prev[2]
        n, estimated = self._pending.pop(wm, (0, 0.0))
        if d_compute <= 0 or d_exec <= 0 or d_success <= 0 or n == 0 or estimated <= 0:
            return  # idle, restarted (counters went back) or nothing of ours: learn nothing
        per_request_s = d_compute / 1e6 * (d_exec / d_success) / d_success
        measured = per_request_s * n / estimated
        lo, hi = SCALE_BOUNDS
        measured = min(hi, max(lo, measured))
        old = self._scale.get(wm)
        self._scale[wm] = measured if old is None else old + EWMA_ALPHA * (measured - old)
        self._intervals += 1

    def cost(self, worker: str, model: str, batch: int) -> float:
        """GPU-seconds of one request of ``batch`` on ``worker``."""
        base = self._timing_for(worker, model, batch)
        if base is None:
            return self.item_cost_s * max(1, batch)
        return base * self._scale.get((worker, model), 1.0)

    def estimate(self, model: str, batch: int) -> float:
        """Before dispatch (worker unknown): the mean over the workers that know ``model``."""
        costs = [self.cost(w, model, batch) for w in self._by_model.get(model, ())]
        return sum(costs) / len(costs) if costs else self.item_cost_s * max(1, batch)

    def forget_worker(self, worker: str) -> None:
        self._timing = {k: v for k, v in self._timing.items() if k[0] != worker}
        self._entries = sum(len(b) for b in self._timing.values())
        for workers in self._by_model.values():
            workers.discard(worker)
        self._by_model = {m: ws for m, ws in self._by_model.items() if ws}
        self._scale = {k: v for k, v in self._scale.items() if k[0] != worker}
        self._pending = {k: v for k, v in self._pending.items() if k[0] != worker}
        self._counters = {k: v for k, v in self._counters.items() if k[0] != worker}

    def statistics(self) -> CostStatistics:
        return CostStatistics(
            entries=self._entries,
            scales=tuple(sorted((w, m, s) for (w, m), s in self._scale.items())),
            counter_intervals=self._intervals)

    def _timing_for(self, worker: str, model: str, batch: int) -> float | None:
        bucket = batch_bucket(batch)
        buckets = self._timing.get((worker, model))
        if not buckets:
            return None
        exact = buckets.get(bucket)
        if exact is not None:
            return exact
        # Not seen yet: the nearest known bucket, scaled by the batch ratio towards it.
        known = list(buckets.items())  # at most ~20 buckets
        b, s = min(known, key=lambda bs: abs(bs[0] - bucket))
        return s * 2.0 ** (bucket - b)


# ------------------------------------------------------------------ just-in-time pipelining

class WorkerTimeline:
    """When each worker's busy execution unit frees, from what the gateway sent it.

    The gateway keeps one request waiting *in* each worker beyond those executing (the
    learned slots), so the worker never idles for a round trip. That request is committed:
    a light tenant's request arriving after it waits for it, an execution the fair order
    cannot take back. So the waiting slot is filled **just in time**: not before the
    worker's running execution is expected to end within ``lead`` (a quarter of its cost, at
    least ``MIN_LEAD_S``); until then the request that would take it waits in the gateway's
    queue, where a later request with a better tag can still go first. A light request then
    waits for at most the execution in progress plus ``lead``.

    Per worker: the costs of the requests in flight in send order; the oldest started
    executing when it was sent or at the worker's last completion, whichever is later.
    Completions are taken in send order (exact for a worker executing one request at a
    time; an approximation with several instances, corrected at each completion).
    """

    __slots__ = ("_in_flight", "_last_done")

    def __init__(self) -> None:
        self._in_flight: dict[str, deque[tuple[float, float]]] = {}
        self._last_done: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<WorkerTimeline workers={len(self._in_flight)}>"

    def sent(self, worker: str, now: float, cost_s: float) -> None:
        q = self._in_flight.get(worker)
        if q is None:
            q = self._in_flight[worker] = deque()
        if len(q) < MAX_IN_FLIGHT_TRACKED:
            q.append((now, cost_s))

    def done(self, worker: str, now: float) -> None:
        q = self._in_flight.get(worker)
        if q:
            q.popleft()
        self._last_done[worker] = now

    def hold_s(self, worker: str, now: float, units: int) -> float:
        """How long a request should wait before taking a slot on ``worker`` that would
        leave it waiting there (``units`` requests execute at once); 0: take it now."""
        q = self._in_flight.get(worker)
        if units <= 0 or not q or len(q) < units:
            return 0.0
        sent_at, cost_s = q[0]
        started = max(sent_at, self._last_done.get(worker, sent_at))
        lead = max(MIN_LEAD_S, LEAD_FRACTION * cost_s)
        return max(0.0, started + cost_s - lead - now)

    def forget_worker(self, worker: str) -> None:
        self._in_flight.pop(worker, None)
        self._last_done.pop(worker, None)


# ------------------------------------------------------------------ fair queuing

@dataclass(slots=True)
class TenantAccount:
    weight: float = 1.0
    finish_tag: float = 0.0
    gpu_s: float = 0.0          # settled, since start
    recent_gpu_s: float = 0.0   # decayed with half_life_s
    recent_at: float = 0.0
    requests: int = 0
    queued_s: float = 0.0       # total waiting for a slot
    queued_requests: int = 0


@dataclass(frozen=True, slots=True)
class TenantShare:
    tenant: str
    weight: float
    gpu_s: float
    recent_gpu_s: float
    share: float                 # of the recent GPU-seconds of all tenants
    requests: int
    queued_s: float              # total waiting for a slot, since start
    mean_queue_s: float


@dataclass(frozen=True, slots=True)
class FairShareStatistics:
    virtual_time: float
    tenants: tuple[TenantShare, ...]
    jain_index: float            # over active tenants, weight-normalised recent GPU-seconds


class FairShare:
    """Start-time fair queuing tags and the per-tenant GPU-second meter."""

    __slots__ = ("_accounts", "half_life_s", "idle_credit_s", "virtual_time")

    def __init__(self, idle_credit_s: float = DEFAULT_IDLE_CREDIT_S,
                 half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        self.idle_credit_s = idle_credit_s
        self.half_life_s = half_life_s
        self.virtual_time = 0.0
        self._accounts: dict[str, TenantAccount] = {}

    def __repr__(self) -> str:
        return f"<FairShare v={self.virtual_time:.6f} tenants={len(self._accounts)}>"

    def _account(self, tenant: str, weight: float) -> TenantAccount | None:
        acct = self._accounts.get(tenant)
        if acct is None:
            if len(self._accounts) >= MAX_TENANTS:
                return None
            acct = self._accounts[tenant] = TenantAccount(weight=weight)
        acct.weight = weight
        return acct

    def tag(self, tenant: str, weight: float, cost_s: float) -> float:
        """Start tag of a new request of ``tenant`` costing ``cost_s`` (estimated)."""
        acct = self._account(tenant, weight)
        start = max(self.virtual_time - self.idle_credit_s,
                    acct.finish_tag if acct is not None else self.virtual_time)
        if acct is not None:
            acct.finish_tag = start + cost_s / weight
        return start

    def refund(self, tenant: str, weight: float, cost_s: float) -> None:
        """A tagged request (a flow's head) left without being served (expired, gone): its
        tenant is not charged for it, so a tenant whose excess requests time out in the
        queue keeps its share (its finish tag would run ahead by work it never got)."""
        acct = self._accounts.get(tenant)
        if acct is not None:
            acct.finish_tag -= cost_s / weight

    def started(self, tag: float, next_waiting: float | None = None) -> None:
        """A request with start tag ``tag`` got its slot; ``next_waiting``: the tag of the
        best request still waiting. Virtual time never passes it: a request that starts out
        of order (two waiters woken for one slot, the worse one first) must not move every
        later arrival behind the whole queue."""
        if next_waiting is not None:
            tag = min(tag, next_waiting)
        if tag > self.virtual_time:
            self.virtual_time = tag

    def settle(self, tenant: str, weight: float, estimated_s: float, actual_s: float,
               queued_s: float, now: float) -> None:
        """A request finished: charge its actual cost, correct the finish tag by the
        estimate's error, and meter its queueing delay."""
        acct = self._account(tenant, weight)
        if acct is None:
            return
        acct.finish_tag += (actual_s - estimated_s) / weight
        self._decay(acct, now)
        acct.recent_gpu_s += actual_s
        acct.gpu_s += actual_s
        acct.requests += 1
        acct.queued_s += queued_s
        acct.queued_requests += 1

    def _decay(self, acct: TenantAccount, now: float) -> None:
        if now > acct.recent_at:
            acct.recent_gpu_s *= 0.5 ** ((now - acct.recent_at) / self.half_life_s)
            acct.recent_at = now

    def statistics(self, now: float) -> FairShareStatistics:
        for acct in self._accounts.values():
            self._decay(acct, now)
        total = sum(a.recent_gpu_s for a in self._accounts.values())
        largest = max((a.recent_gpu_s / a.weight for a in self._accounts.values()), default=0.0)
        active = [a.recent_gpu_s / a.weight for a in self._accounts.values()
                  if largest > 0 and a.recent_gpu_s / a.weight >= ACTIVE_FRACTION * largest]
        return FairShareStatistics(
            virtual_time=self.virtual_time,
            tenants=tuple(TenantShare(
                tenant=name, weight=a.weight, gpu_s=a.gpu_s, recent_gpu_s=a.recent_gpu_s,
                share=a.recent_gpu_s / total if total > 0 else 0.0, requests=a.requests,
                queued_s=a.queued_s,
                mean_queue_s=a.queued_s / a.queued_requests if a.queued_requests else 0.0)
                for name, a in sorted(self._accounts.items())),
            jain_index=jain_index(active))
