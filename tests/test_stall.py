"""Stalled workers (gateway.core.stall): the rule and the state machine as tables, with time
as an argument; scenario scripts of a board over a fake clock."""

from __future__ import annotations

import pytest

from gateway.core.config import StallConfig
from gateway.core.stall import (
    StallBoard,
    StallEvent,
    StallState,
    StallStatistics,
    StallTransitionError,
    is_silent,
    next_state,
    silence_threshold_s,
)

S, T, P = StallState.SERVING, StallState.STALLED, StallState.PROBING
CFG = StallConfig(service_times=4.0, min_s=0.2, cold_s=30.0, probe_after_s=1.0)


@pytest.mark.parametrize(("service_s", "lag_s", "expected"), [
    (0.050, 0.0, 0.2),       # 4 × 50 ms
    (0.010, 0.0, 0.2),       # 40 ms: the floor
    (0.500, 0.0, 2.0),
    (20.0, 0.0, 80.0),       # a model that takes 20 s a request: no ceiling
    (None, 0.0, 30.0),       # unknown: cold_s
    (0.0, 0.0, 30.0),
    (0.050, 0.1, 0.3),       # the gateway's own lateness is not the worker's silence
])
def test_silence_threshold(service_s: float | None, lag_s: float, expected: float) -> None:
    assert silence_threshold_s(service_s, CFG, lag_s) == pytest.approx(expected)


@pytest.mark.parametrize(("awaiting", "quiet_since", "others_at", "now", "silent"), [
    (2, 0.0, 0.95, 1.0, True),     # busy, quiet 1 s, others answered 50 ms ago
    (0, 0.0, 0.95, 1.0, False),    # nothing awaited: an idle worker owes nothing
    (2, 0.85, 0.95, 1.0, False),   # quiet only 150 ms < 200 ms
    (2, 0.75, 0.95, 1.0, True),
    (2, 0.0, 0.5, 1.0, False),     # nobody answered for 500 ms: the gateway or the fleet
    (2, 0.0, 0.81, 1.0, True),
    (2, 0.0, 0.75, 1.0, False),    # the others' last answer is older than the threshold
    (1, 0.0, float("-inf"), 1.0, False),   # no other worker ever answered
])
def test_is_silent(awaiting: int, quiet_since: float, others_at: float, now: float,
                   silent: bool) -> None:
    assert is_silent(awaiting=awaiting, quiet_since=quiet_since, others_answered_at=others_at,
                     now=now, threshold_s=0.2) is silent


@pytest.mark.parametrize(("state", "event", "expected"), [
    (S, StallEvent.SILENT, T),
    (S, StallEvent.ANSWER, S),
    (T, StallEvent.ANSWER, S),
    (T, StallEvent.PROBE_DUE, P),
    (P, StallEvent.ANSWER, S),
    (P, StallEvent.SILENT, T),
])
def test_transitions(state: StallState, event: StallEvent, expected: StallState) -> None:
    assert next_state(state, event) is expected


@pytest.mark.parametrize(("state", "event"), [
    (S, StallEvent.PROBE_DUE), (T, StallEvent.SILENT), (P, StallEvent.PROBE_DUE)])
def test_illegal_transitions_raise(state: StallState, event: StallEvent) -> None:
    with pytest.raises(StallTransitionError):
        next_state(state, event)


# ------------------------------------------------------------------ the board, scripted

def service_50ms(_worker: str) -> float:
    return 0.050


def board_with_traffic() -> StallBoard:
    """Workers a and b answering every 10 ms up to t = 1.0."""
    board = StallBoard(CFG)
    t = 0.0
    while t < 1.0:
        for w in ("a", "b"):
            board.sent(w, t)
            board.ended(w, t + 0.005, answered=True)
        t += 0.01
    return board


def test_a_frozen_worker_is_stalled_after_four_service_times_then_recovers() -> None:
    board = board_with_traffic()
    board.sent("a", 1.0)                     # a freezes with two requests
    board.sent("a", 1.005)
    states = []
    for i in range(1, 40):
        now = 1.0 + i * 0.01
        board.sent("b", now)                 # b goes on answering
        board.ended("b", now + 0.001, answered=True)
        for t in board.check(now + 0.002, service_50ms, fleet_size=2):
            states.append((round(t.at - 1.0, 3), t.old, t.new))
    # silent from 1.0 (busy since), threshold 200 ms: stalled at the first check past 1.2
    assert states == [(0.202, S, T)], states
    assert not board.allows("a") and board.is_excluded("a") and board.allows("b")
    assert board.statistics().stalled == ("a",)
    # a second later a probe may go there — once nothing else awaits an answer there
    assert board.check(2.19, service_50ms, fleet_size=2) == []
    moved = board.check(2.21, service_50ms, fleet_size=2)
    assert [(t.old, t.new) for t in moved] == [(T, P)]
    assert not board.is_excluded("a") and not board.allows("a")
    board.ended("a", 2.22, answered=False)   # its two requests were hedged and cancelled
    board.ended("a", 2.22, answered=False)
    assert board.allows("a")
    board.sent("a", 2.26)                    # the probe
    assert not board.allows("a")             # one at a time
    back = board.ended("a", 2.31, answered=True)
    assert back is not None and (back.old, back.new) == (P, S)
    assert board.allows("a") and board.statistics() == StallStatistics((), 1, 1)


def test_an_unanswered_probe_stalls_it_again() -> None:
    board = board_with_traffic()
    board.sent("a", 1.0)
    board.ended("b", 1.21, answered=True)
    assert [t.new for t in board.check(1.21, service_50ms, fleet_size=2)] == [T]
    board.ended("a", 1.3, answered=False)
    assert [t.new for t in board.check(2.22, service_50ms, fleet_size=2)] == [P]
    board.sent("a", 2.23)                    # the probe goes unanswered
    board.ended("b", 2.4, answered=True)
    assert board.check(2.40, service_50ms, fleet_size=2) == []      # 170 ms: not yet
    assert [t.new for t in board.check(2.44, service_50ms, fleet_size=2)] == [T]
    assert board.stalls_total == 1           # one stall, however many probes


@pytest.mark.parametrize(("others_answer", "stalled"), [(True, True), (False, False)])
def test_a_fleet_wide_pause_stalls_nobody(others_answer: bool, stalled: bool) -> None:
    """The gateway's own pause (or every worker slow at once) is not a stall."""
    board = board_with_traffic()
    board.sent("a", 1.0)
    board.sent("b", 1.0)
    if others_answer:
        board.ended("b", 1.3, answered=True)
    moved = board.check(1.31, service_50ms, fleet_size=2)
    assert [t.worker for t in moved] == (["a"] if stalled else [])


def test_at_most_half_the_fleet_stalled() -> None:
    board = StallBoard(CFG)
    for w in "abcd":
        board.sent(w, 0.0)
        board.ended(w, 0.01, answered=True)
    for w in "abc":
        board.sent(w, 0.02)                  # three freeze
    board.sent("d", 0.5)
    board.ended("d", 0.5, answered=True)
    moved = board.check(0.51, service_50ms, fleet_size=4)
    assert len(moved) == 2 and sum(not board.allows(w) for w in "abc") == 2


def test_a_streaming_body_after_its_answer_is_not_silence() -> None:
    """Only requests awaiting their answer (head) count: a long body after it does not."""
    board = board_with_traffic()
    board.sent("a", 1.0)
    board.ended("a", 1.01, answered=True)    # the head came; the body streams for minutes
    board.ended("b", 5.0, answered=True)
    assert board.check(5.0, service_50ms, fleet_size=2) == []


def test_failures_are_no_answer_but_end_the_wait() -> None:
    board = board_with_traffic()
    board.sent("a", 1.0)
    board.ended("a", 1.001, answered=False)  # reset at once (a killed worker): nothing awaits
    board.ended("b", 1.5, answered=True)
    assert board.check(1.5, service_50ms, fleet_size=2) == []


def test_turned_off_recovers_everyone_and_forget() -> None:
    board = board_with_traffic()
    board.sent("a", 1.0)
    board.ended("b", 1.25, answered=True)
    assert len(board.check(1.25, service_50ms, fleet_size=2)) == 1
    board.reconfigure(StallConfig(enabled=False))
    moved = board.check(1.3, service_50ms, fleet_size=2)
    assert [(t.worker, t.new) for t in moved] == [("a", S)] and board.allows("a")
    board.forget("a")
    assert board.state("a") is S and board.ended("a", 2.0, answered=True) is None
