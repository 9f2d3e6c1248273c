"""The wait queue, the sticky table and the retry decision: pure parts of the dispatcher,
tested with time as an argument."""

from __future__ import annotations

import pytest

from gateway.core.retrybudget import RetryVerdict, decide_retry
from gateway.core.sticky import StickyTable
from gateway.core.types import WorkerId
from gateway.core.waitqueue import QueueFull, WaitQueue


def _drain(q: WaitQueue, now: float) -> list[int]:
    out = []
    while (t := q.pop(now)) is not None:
        out.append(t.seq)
        q.remove(t)
    return out


@pytest.mark.parametrize(("arrivals", "expected"), [
    # (priority, deadline) in arrival order → seq order served
    ([(1, 9), (1, 9), (1, 9)], [0, 1, 2]),              # FIFO inside a class
    ([(2, 9), (1, 9), (0, 9)], [2, 1, 0]),              # critical before standard before shed
    ([(1, 9), (0, 9), (1, 9), (0, 9)], [1, 3, 0, 2]),
    ([(1, 0.5), (1, 9)], [1]),                          # expired at now=1: never woken
    ([(0, 0.5), (2, 9)], [1]),
])
def test_pop_order(arrivals: list[tuple[int, float]], expected: list[int]) -> None:
    q = WaitQueue()
    for prio, deadline in arrivals:
        q.push(prio, deadline, now=0.0)
    assert _drain(q, now=1.0) == expected
    assert len(q) == 0


def test_removed_tickets_are_skipped_and_not_counted() -> None:
    q = WaitQueue()
    a = q.push(1, 10, 0)
    b = q.push(1, 10, 0)
    assert q.remove(a) is True
    assert q.remove(a) is False
    assert len(q) == 1
    assert q.pop(1) is b


def test_requeue_keeps_place() -> None:
    q = WaitQueue()
    a = q.push(1, 10, 0)
    q.push(1, 10, 0)
    woken = q.pop(1)
    assert woken is a
    q.requeue(a)  # the slot went to someone else: back in its old place
    assert q.pop(1) is a


def test_two_slots_freed_before_the_woken_waiter_runs_wake_two_waiters_of_one_flow() -> None:
    """One flow (no tenants). Two answers read in one turn of the event loop free two slots
    before the first woken waiter has run: the second pop must find the next waiter (it
    found none, and the slot stayed empty until the next completion — in a herd, for good)."""
    q = WaitQueue()
    a, b, c = (q.push(1, 10, 0) for _ in range(3))
    assert q.pop(1) is a
    assert q.pop(1) is b                     # a is still out: b is woken for the second slot
    q.remove(a)                              # a took its slot
    q.requeue(b)                             # b's slot went elsewhere: back in its place
    assert len(q) == 2
    assert q.pop(1) is b                     # ahead of c
    q.remove(b)
    assert q.pop(1) is c
    q.remove(c)
    assert q.pop(1) is None and len(q) == 0


def test_a_head_taken_back_before_a_second_pop_keeps_the_flow_intact() -> None:
    q = WaitQueue()
    a, b = q.push(1, 10, 0), q.push(1, 10, 0)
    assert q.pop(1) is a
    q.requeue(a)                             # back before anyone else asked
    assert [q.pop(1), q.pop(1)] == [a, b]    # a first again; then b, a being out
    assert q.statistics().length == 2


def test_ahead_of_counts_live_waiters_of_equal_or_better_priority() -> None:
    q = WaitQueue()
    q.push(0, 10, 0)
    q.push(1, 10, 0)
    s = q.push(2, 10, 0)
    assert (q.ahead_of(0), q.ahead_of(1), q.ahead_of(2)) == (1, 2, 3)
    q.remove(s)
    assert q.ahead_of(2) == 2
    assert q.statistics().by_priority == ((0, 1), (1, 1))


def test_expired_counted_and_backstop_bound() -> None:
    q = WaitQueue(max_length=2)
    q.push(1, 1.0, 0)
    q.push(1, 5.0, 0)
    with pytest.raises(QueueFull):
        q.push(1, 5.0, 0)
    assert q.pop(2.0) is not None
    assert q.statistics().expired_total == 1


def test_heap_compacts_when_most_callers_gave_up() -> None:
    q = WaitQueue()
    tickets = [q.push(1, 10, 0) for _ in range(1000)]
    for t in tickets[:-1]:
        q.remove(t)
    q.push(1, 10, 0)
    assert len(q) == 2
    assert len(q._heap) <= 130


def test_sticky_table_pins_ends_and_is_bounded() -> None:
    t = StickyTable(max_sequences=2)
    t.record("a", WorkerId("w1"), end=False)
    t.record("b", WorkerId("w2"), end=False)
    assert t.worker_for("a") == "w1"
    t.record("a", WorkerId("w1"), end=False)      # a's next request: a is recent again
    t.record("c", WorkerId("w1"), end=False)      # evicts the least recently used: b
    assert t.worker_for("b") is None and t.evicted_total == 1
    t.record("a", WorkerId("w1"), end=True)       # sequence_end closes it
    assert t.worker_for("a") is None
    assert t.forget_worker(WorkerId("w1")) == 1
    assert len(t) == 0 and t.worker_for(None) is None


@pytest.mark.parametrize(("stage", "status", "attempts", "budget", "verdict"), [
    ("connect", None, 1, True, RetryVerdict.RETRY),
    ("response", 503, 1, True, RetryVerdict.RETRY),
    ("response", 500, 1, True, RetryVerdict.NOT_SAFE),
    ("send", None, 1, True, RetryVerdict.NOT_SAFE),
    ("connect", None, 3, True, RetryVerdict.ATTEMPTS_EXHAUSTED),
    ("connect", None, 1, False, RetryVerdict.BUDGET_EXHAUSTED),
    ("response", 500, 3, False, RetryVerdict.NOT_SAFE),   # safety is judged first
])
def test_decide_retry(stage: str, status: int | None, attempts: int, budget: bool,
                      verdict: RetryVerdict) -> None:
    assert decide_retry(stage, status, attempts=attempts, max_attempts=3,
                        budget_allows=budget) is verdict


def test_others_finds_waiters_of_other_models_behind_a_blocked_head() -> None:
    """One flow (no tenants): model a's waiters at the front cannot use a slot of model b's;
    ``others`` reaches b's waiter behind them, in order, leaving everyone in place."""
    q = WaitQueue()
    a1 = q.push(1, 10.0, 0.0, "a")
    a2 = q.push(1, 10.0, 0.0, "a")
    b1 = q.push(1, 10.0, 0.0, "b")
    expired = q.push(1, 0.5, 0.0, "c")
    c1 = q.push(0, 10.0, 0.0, "c")     # a better class comes first
    assert list(q.others(1.0, "a", 32)) == [c1, b1]
    assert list(q.others(1.0, "a", 2)) == [c1]          # the scan is bounded
    assert expired not in list(q.others(1.0, "b", 32))
    q.requeue(b1)            # b1 was never the head: it keeps its place in the flow
    q.remove(b1)
    assert len(q) == 4
    assert [q.pop(1.0) for _ in range(2)] == [c1, a1]
    q.remove(c1)
    q.remove(a1)
    assert q.pop(1.0) is a2
