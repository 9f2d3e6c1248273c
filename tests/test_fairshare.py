"""Fair share (pure): start-time fair queuing over the wait queue, the GPU-second cost model
and the tenant meter, with time and costs as arguments."""

from __future__ import annotations

import random

import pytest

from gateway.core.fairshare import (
    ANONYMOUS,
    MAX_COST_KEYS,
    SCALE_BOUNDS,
    CostModel,
    FairShare,
    WorkerTimeline,
    batch_bucket,
    jain_index,
    tenant_label,
)
from gateway.core.waitqueue import Ticket, WaitQueue


@pytest.mark.parametrize(("batch", "bucket"), [
    (0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (32, 5), (33, 6),
])
def test_batch_bucket(batch: int, bucket: int) -> None:
    assert batch_bucket(batch) == bucket


@pytest.mark.parametrize(("values", "expected"), [
    ([], 1.0), ([0.0, 0.0], 1.0), ([1.0, 1.0, 1.0], 1.0), ([1.0, 0.0], 0.5),
    ([1.0, 0.0, 0.0, 0.0], 0.25), ([3.0, 1.0], 16 / 20),
])
def test_jain_index(values: list[float], expected: float) -> None:
    assert jain_index(values) == pytest.approx(expected)


def test_anonymous_has_its_own_label() -> None:
    assert tenant_label(None) == ANONYMOUS
    assert tenant_label("a") == "a"


# ------------------------------------------------------------------ fair queuing

def _serve(fair: FairShare, q: WaitQueue, now: float) -> tuple[str, float, float]:
    """One slot frees: the best ticket starts. Returns (tenant, tag, cost)."""
    ticket = q.pop(now)
    assert ticket is not None
    q.remove(ticket)
    fair.started(ticket.tag)
    assert ticket.tenant is not None
    return ticket.tenant, ticket.tag, ticket.cost_s


def _push(fair: FairShare, q: WaitQueue, tenant: str, weight: float, cost: float,
          now: float = 0.0, priority: int = 1) -> None:
    tag = fair.tag(tenant, weight, cost)
    q.push(priority, 1e9, now, "m", tag=tag, tenant=tenant, cost_s=cost)


def test_light_request_goes_ahead_of_a_heavy_backlog() -> None:
    fair, q = FairShare(idle_credit_s=0.0), WaitQueue()
    for _ in range(10):
        _push(fair, q, "heavy", 1.0, 0.032)
    assert _serve(fair, q, 0)[0] == "heavy"   # in service: cannot be interrupted
    _push(fair, q, "light", 1.0, 0.001)
    # start tag = v = the heavy in service's tag: ahead of every queued heavy
    assert _serve(fair, q, 0)[0] == "light"


def test_idle_credit_lets_a_returning_tenant_jump_the_request_at_v_only() -> None:
    fair, q = FairShare(idle_credit_s=0.01), WaitQueue()
    for _ in range(5):
        _push(fair, q, "heavy", 1.0, 0.032)
    _serve(fair, q, 0)
    _serve(fair, q, 0)  # v = 0.032
    assert fair.tag("light", 1.0, 0.001) == pytest.approx(0.022)  # v − credit, however idle


def test_idle_time_earns_no_credit_beyond_the_bound() -> None:
    fair = FairShare(idle_credit_s=0.05)
    fair.started(100.0)  # others were served for a long time while "a" was idle
    assert fair.tag("a", 1.0, 1.0) == pytest.approx(99.95)
    assert fair.tag("a", 1.0, 1.0) == pytest.approx(100.95)  # its own finish tag from now on


def test_a_tenant_alone_gets_every_slot() -> None:
    fair, q = FairShare(), WaitQueue()
    for _ in range(20):
        _push(fair, q, "only", 1.0, 0.01)
    served = [_serve(fair, q, 0)[0] for _ in range(20)]
    assert served == ["only"] * 20 and len(q) == 0


def test_bands_come_first_then_tags() -> None:
    fair, q = FairShare(idle_credit_s=0.0), WaitQueue()
    _push(fair, q, "a", 1.0, 1.0, priority=2)   # sheddable, tag 0
    _push(fair, q, "b", 1.0, 5.0, priority=1)   # standard
    _push(fair, q, "b", 1.0, 5.0, priority=1)   # standard, tag 5
    assert [_serve(fair, q, 0)[0] for _ in range(3)] == ["b", "b", "a"]


def _backlogged(weights: dict[str, float], costs: dict[str, float], steps: int,
                seed: int = 1) -> dict[str, float]:
    """Every tenant keeps 8 requests queued; one slot serves ``steps`` of them; the GPU-
    seconds each tenant got."""
    fair, q = FairShare(), WaitQueue()
    rng = random.Random(seed)
    got = dict.fromkeys(weights, 0.0)
    for t in weights:
        for _ in range(8):
            _push(fair, q, t, weights[t], costs[t] * rng.uniform(0.8, 1.2))
    now = 0.0
    for _ in range(steps):
        tenant, _, cost = _serve(fair, q, now)
        now += cost
        got[tenant] += cost
        fair.settle(tenant, weights[tenant], cost, cost, 0.0, now)
        _push(fair, q, tenant, weights[tenant], costs[tenant] * rng.uniform(0.8, 1.2), now)
    return got


@pytest.mark.parametrize(("weights", "costs"), [
    ({"a": 1.0, "b": 1.0}, {"a": 0.001, "b": 0.032}),   # batch 1 vs batch 32
    ({"a": 3.0, "b": 1.0}, {"a": 0.032, "b": 0.032}),
    ({"a": 3.0, "b": 1.0}, {"a": 0.001, "b": 0.032}),
    ({"a": 1.0, "b": 2.0, "c": 5.0}, {"a": 0.004, "b": 0.010, "c": 0.020}),
])
def test_backlogged_tenants_get_gpu_seconds_in_proportion_to_weight(
        weights: dict[str, float], costs: dict[str, float]) -> None:
    got = _backlogged(weights, costs, steps=4000)
    total = sum(got.values())
    for t, w in weights.items():
        assert got[t] / total == pytest.approx(w / sum(weights.values()), abs=0.02)


def test_settlement_moves_the_finish_tag_by_the_estimate_error() -> None:
    fair = FairShare(idle_credit_s=0.0)
    assert fair.tag("a", 2.0, 0.010) == 0.0           # F = 0.005
    fair.settle("a", 2.0, estimated_s=0.010, actual_s=0.030, queued_s=0.0, now=1.0)
    assert fair.tag("a", 2.0, 0.010) == pytest.approx(0.015)  # F moved by 0.020 / 2


def test_statistics_shares_jain_and_queueing_delay() -> None:
    fair = FairShare(half_life_s=10.0)
    fair.settle("a", 3.0, 0.0, 3.0, queued_s=0.2, now=0.0)
    fair.settle("b", 1.0, 0.0, 1.0, queued_s=0.4, now=0.0)
    fair.settle("b", 1.0, 0.0, 0.0, queued_s=0.0, now=0.0)
    st = fair.statistics(now=10.0)  # one half-life later
    a, b = st.tenants
    assert (a.tenant, b.tenant) == ("a", "b")
    assert a.recent_gpu_s == pytest.approx(1.5) and a.gpu_s == 3.0
    assert a.share == pytest.approx(0.75) and b.share == pytest.approx(0.25)
    assert st.jain_index == pytest.approx(1.0)  # 3:1 on weights 3:1 is fair
    assert b.mean_queue_s == pytest.approx(0.2) and b.requests == 2
    fair.settle("c", 1.0, 0.0, 2.0, queued_s=0.0, now=10.0)  # c: twice b's normalised use
    assert fair.statistics(now=10.0).jain_index < 0.95


# ------------------------------------------------------------------ costs

def test_cost_before_anything_is_learned_goes_by_batch() -> None:
    costs = CostModel(item_cost_s=0.001)
    assert costs.estimate("m", 1) == pytest.approx(0.001)
    assert costs.estimate("m", 32) == pytest.approx(0.032)


def test_gateway_timing_per_bucket_and_nearest_bucket_fallback() -> None:
    costs = CostModel()
    costs.observe("w1", "m", 1, 0.002)
    costs.observe("w1", "m", 32, 0.020)
    assert costs.cost("w1", "m", 1) == pytest.approx(0.002)
    assert costs.cost("w1", "m", 30) == pytest.approx(0.020)  # same bucket (17–32)
    assert costs.cost("w1", "m", 64) == pytest.approx(0.040)  # one bucket up: doubled
    assert costs.cost("w1", "m", 2) == pytest.approx(0.004)   # nearest is bucket 0
    costs.observe("w2", "m", 1, 0.004)
    assert costs.estimate("m", 1) == pytest.approx(0.003)      # mean over the workers


def test_triton_counters_scale_the_gateway_timings() -> None:
    costs = CostModel()
    costs.on_counters("w", "m", compute_infer_us=0, exec_count=0, success=0)
    for _ in range(10):
        costs.observe("w", "m", 1, 0.002)  # the gateway's timing includes the network
    # Triton: 10 requests, 10 executions, 10 ms of compute → 1 ms each
    costs.on_counters("w", "m", compute_infer_us=10_000, exec_count=10, success=10)
    assert costs.cost("w", "m", 1) == pytest.approx(0.001)
    assert costs.statistics().counter_intervals == 1


def test_counters_of_merged_executions_and_of_a_shared_worker() -> None:
    costs = CostModel()
    costs.on_counters("w", "m", 0, 0, 0)
    for _ in range(4):
        costs.observe("w", "m", 1, 0.001)
    # 8 requests (half of them another gateway's) in 2 executions of 4 ms; each request
    # counts its execution's 4 ms: 32 ms of per-request compute, 8 ms of GPU time
    costs.on_counters("w", "m", compute_infer_us=32_000, exec_count=2, success=8)
    assert costs.cost("w", "m", 1) == pytest.approx(0.001)   # 8 ms / 8 requests


@pytest.mark.parametrize(("compute", "execs", "success"), [
    (0, 0, 0),            # idle interval
    (5_000, 5, 2),        # counters went back (a restart): learn nothing
])
def test_counter_intervals_that_teach_nothing(compute: int, execs: int, success: int) -> None:
    costs = CostModel()
    costs.on_counters("w", "m", 10_000, 10, 10)
    costs.observe("w", "m", 1, 0.002)
    costs.on_counters("w", "m", compute + (10_000 if compute == 0 else 0),
                      execs + (10 if execs == 0 else 0), success + (10 if success == 0 else 0))
    assert costs.cost("w", "m", 1) == pytest.approx(0.002)


def test_scale_is_clipped_and_forget_worker_drops_everything() -> None:
    costs = CostModel()
    costs.on_counters("w", "m", 0, 0, 0)
    costs.observe("w", "m", 1, 1.0)
    costs.on_counters("w", "m", 1, 1, 1)  # 1 µs measured vs 1 s timed
    assert costs.cost("w", "m", 1) == pytest.approx(SCALE_BOUNDS[0])
    costs.forget_worker("w")
    assert costs.statistics().entries == 0 and costs.statistics().scales == ()


# ------------------------------------------------------------------ just-in-time pipelining

@pytest.mark.parametrize(("sends", "dones", "now", "units", "hold"), [
    ([], [], 0.0, 1, 0.0),                              # idle worker: take the slot
    ([(0.0, 0.034)], [], 0.0, 2, 0.0),                  # a unit is free
    ([(0.0, 0.034)], [], 0.0, 1, 0.034 - 0.0085),       # waiting slot: until end − lead
    ([(0.0, 0.034)], [], 0.030, 1, 0.0),                # within the lead: now
    ([(0.0, 0.003)], [], 0.0, 1, 0.0),                  # shorter than the minimum lead
    # the second request started at the first one's completion (0.040), not when sent
    ([(0.0, 0.034), (0.001, 0.034)], [0.040], 0.040, 1, 0.034 - 0.0085),
    ([(0.0, 0.034)], [], 0.0, 0, 0.0),                  # units unknown: never hold
])
def test_worker_timeline_hold(sends: list[tuple[float, float]], dones: list[float],
                              now: float, units: int, hold: float) -> None:
    timeline = WorkerTimeline()
    for at, cost in sends:
        timeline.sent("w", at, cost)
    for at in dones:
        timeline.done("w", at)
    assert timeline.hold_s("w", now, units) == pytest.approx(hold)


def test_worker_timeline_forgets_and_tolerates_unmatched_completions() -> None:
    timeline = WorkerTimeline()
    timeline.done("w", 1.0)            # nothing in flight: no error
    timeline.sent("w", 1.0, 0.5)
    timeline.forget_worker("w")
    assert timeline.hold_s("w", 1.0, 1) == 0.0


def test_virtual_time_never_passes_the_best_waiting_tag() -> None:
    fair, q = FairShare(idle_credit_s=0.0), WaitQueue()
    for _ in range(50):
        _push(fair, q, "heavy", 1.0, 0.032)   # tags 0, 0.032, … 1.568
    # the last heavy request starts out of order (woken together with a better waiter)
    fair.started(1.568, q.next_tag())
    assert fair.virtual_time == 0.0
    _push(fair, q, "light", 1.0, 0.001)       # still goes ahead of the heavy backlog
    assert _serve(fair, q, 0)[0] == "heavy"   # tag 0 (a tie: the earlier arrival)
    assert _serve(fair, q, 0)[0] == "light"


def test_next_tag_skips_removed_waiters() -> None:
    q = WaitQueue()
    assert q.next_tag() is None
    a = q.push(1, 9, 0, tag=0.5)
    q.push(1, 9, 0, tag=0.7)
    q.remove(a)
    assert q.next_tag() == 0.7


def test_a_request_that_leaves_unserved_is_refunded() -> None:
    fair = FairShare(idle_credit_s=0.0)
    assert fair.tag("a", 2.0, 0.010) == 0.0
    assert fair.tag("a", 2.0, 0.010) == pytest.approx(0.005)   # queued behind the first
    fair.refund("a", 2.0, 0.010)                                # the second expired
    assert fair.tag("a", 2.0, 0.010) == pytest.approx(0.005)   # its place is free again
    fair.refund("nobody", 1.0, 1.0)                             # unknown tenant: no-op


# ------------------------------------------------------------------ tags given at the head

def _tagged_queue(fair: FairShare, weights: dict[str, float]) -> WaitQueue:
    def tagger(t: Ticket) -> float:
        assert t.tenant is not None
        return fair.tag(t.tenant, weights[t.tenant], t.cost_s)

    def untag(t: Ticket) -> None:
        assert t.tenant is not None
        fair.refund(t.tenant, weights[t.tenant], t.cost_s)

    return WaitQueue(tagger=tagger, untag=untag)


def test_only_heads_are_tagged_and_a_flow_is_first_come_first_served() -> None:
    fair = FairShare()
    q = _tagged_queue(fair, {"a": 1.0, "b": 1.0})
    a1 = q.push(1, 9, 0, tenant="a", cost_s=1.0)
    a2 = q.push(1, 9, 0, tenant="a", cost_s=1.0)
    b1 = q.push(1, 9, 0, tenant="b", cost_s=1.0)
    assert (a1.tagged, a2.tagged, b1.tagged) == (True, False, True)
    first = q.pop(0)
    assert first is a1
    q.remove(a1)               # served: a2 becomes a's head, tagged now (after a1's 1.0)
    fair.started(a1.tag, q.next_tag())
    assert a2.tagged and a2.tag == pytest.approx(1.0)
    assert q.pop(0) is b1      # b's head (tag 0) goes before a2 (tag 1)


def test_requests_expiring_behind_the_head_cost_their_tenant_nothing() -> None:
    fair = FairShare()
    q = _tagged_queue(fair, {"a": 1.0})
    q.push(1, 9, 0, tenant="a", cost_s=1.0)
    for _ in range(5):
        q.push(1, 0.5, 0, tenant="a", cost_s=1.0)   # expire before reaching the head
    head = q.pop(1.0)
    assert head is not None
    q.remove(head)
    assert q.pop(1.0) is None and len(q) == 0
    assert fair.tag("a", 1.0, 1.0) == pytest.approx(1.0)  # charged for the head only


def test_a_head_that_leaves_unserved_is_handed_back() -> None:
    fair = FairShare()
    q = _tagged_queue(fair, {"a": 1.0})
    head = q.push(1, 9, 0, tenant="a", cost_s=1.0)
    nxt = q.push(1, 9, 0, tenant="a", cost_s=1.0)
    assert q.pop(0) is head
    q.remove(head, served=False)                    # its caller gave up
    assert nxt.tagged and nxt.tag == pytest.approx(0.0)


def _overloaded(weights: dict[str, float], steps: int, tagged_at_head: bool) -> dict[str, float]:
    """Both tenants overload one slot 1.5× each (cost 1, deadline 5 units): most requests
    expire in the queue. GPU time each tenant got."""
    fair = FairShare()
    q = _tagged_queue(fair, weights) if tagged_at_head else WaitQueue()
    got = dict.fromkeys(weights, 0.0)
    now = 0.0
    for step in range(steps):
        for t in weights:
            for _ in range(1 + step % 2):      # 1.5 arrivals per unit of time
                if tagged_at_head:
                    q.push(1, now + 5, now, tenant=t, cost_s=1.0)
                else:  # tagged on arrival, the scheme this replaces
                    q.push(1, now + 5, now, tag=fair.tag(t, weights[t], 1.0), tenant=t)
        ticket = q.pop(now)
        if ticket is not None:
            q.remove(ticket)
            fair.started(ticket.tag, q.next_tag())
            assert ticket.tenant is not None
            got[ticket.tenant] += 1.0
        now += 1.0
    return got


def test_weighted_shares_hold_when_most_requests_expire() -> None:
    got = _overloaded({"a": 3.0, "b": 1.0}, steps=2000, tagged_at_head=True)
    assert got["a"] / sum(got.values()) == pytest.approx(0.75, abs=0.02)
    # tagged on arrival, expired requests still push their tenant's tags ahead
    skewed = _overloaded({"a": 3.0, "b": 1.0}, steps=2000, tagged_at_head=False)
    assert abs(skewed["a"] / sum(skewed.values()) - 0.75) > 0.05


def test_cost_entries_are_bounded_and_forget_worker_frees_them() -> None:
    costs = CostModel(item_cost_s=0.001)
    for i in range(MAX_COST_KEYS):
        costs.observe(f"w{i}", "m", 1, 0.002)
    costs.observe("late", "m", 1, 0.5)                 # full: nothing new is learned
    assert costs.statistics().entries == MAX_COST_KEYS
    assert costs.cost("late", "m", 1) == pytest.approx(0.001)
    costs.observe("w0", "m", 1, 0.012)                 # known entries still learn
    assert costs.cost("w0", "m", 1) == pytest.approx(0.004)
    costs.forget_worker("w1")
    costs.observe("late", "m", 1, 0.5)
    assert costs.cost("late", "m", 1) == pytest.approx(0.5)
