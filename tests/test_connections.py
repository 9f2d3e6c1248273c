"""The slow-client rules of ``gateway.core.connections`` as tables (a fake clock: ``now`` is an
argument), and the guard of ``gateway.http.guard`` over fake connections: who is closed, with
what answer, and who gives way when connections run short."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from gateway.core.config import ClientsConfig
from gateway.core.connections import (
    Phase,
    Seen,
    Track,
    Verdict,
    judge,
    resolve_max_connections,
    shed_order,
)
from gateway.core.errors import GatewayError
from gateway.http.guard import ConnectionGuard, quiet_accept_errors

LIMITS = ClientsConfig(header_timeout_s=10.0, body_timeout_s=60.0, body_grace_s=20.0,
                       body_min_rate_bytes_per_s=500, send_timeout_s=60.0)


def run(script: list[tuple[float, Seen]], limits: ClientsConfig = LIMITS
        ) -> list[tuple[Verdict, str]]:
    """Judge a connection opened at 0 at each (time, what was seen)."""
    track = Track.opened(0.0)
    out = []
    for now, seen in script:
        track, verdict, why = judge(track, seen, now, limits)
        out.append((verdict, why))
    return out


def head(at: float, received: int, request: int = 1) -> tuple[float, Seen]:
    return at, Seen(Phase.HEAD, request, received)


def body(at: float, received: int, request: int = 1) -> tuple[float, Seen]:
    return at, Seen(Phase.BODY, request, received)


@pytest.mark.parametrize(("script", "last"), [
    # nothing sent: closed without an answer at the header timeout, from the opening
    ([(5.0, Seen(Phase.NEW, 0, 0)), (9.9, Seen(Phase.NEW, 0, 0))], Verdict.KEEP),
    ([(10.0, Seen(Phase.NEW, 0, 0))], Verdict.CLOSE),
    # the first head's clock started at the opening, however many bytes trickle in
    ([(3.0, Seen(Phase.NEW, 0, 0)), head(6.0, 5), head(9.0, 9)], Verdict.KEEP),
    ([(3.0, Seen(Phase.NEW, 0, 0)), head(6.0, 5), head(10.0, 9)], Verdict.TIMEOUT),
    # a later head's clock starts when it is first seen, not at the opening
    ([(50.0, Seen(Phase.IDLE, 1, 300)), head(55.0, 301, 2), head(64.0, 309, 2)],
     Verdict.KEEP),
    ([(50.0, Seen(Phase.IDLE, 1, 300)), head(55.0, 301, 2), head(65.0, 309, 2)],
     Verdict.TIMEOUT),
    # a byte a second: within the grace, then far under 500 bytes/s
    ([body(1.0, 100), *(body(float(t), 100 + t) for t in range(2, 21))], Verdict.KEEP),
    ([body(1.0, 100), *(body(float(t), 100 + t) for t in range(2, 23))], Verdict.TIMEOUT),
    # 1 MiB at 600 bytes/s is never too slow: B bytes may take 20 s + B / 500
    ([body(1.0, 0), *(body(float(t), 600 * t) for t in range(2, 300, 7))], Verdict.KEEP),
    # the gateway not reading is not the client's slowness
    ([body(1.0, 100), (100.0, Seen(Phase.WORKING, 1, 100))], Verdict.KEEP),
    ([body(1.0, 100), (100.0, Seen(Phase.WORKING, 1, 100)), body(150.0, 100)],
     Verdict.KEEP),
    # an answer left unread
    ([(1.0, Seen(Phase.SENDING, 1, 500)), (60.9, Seen(Phase.SENDING, 1, 500))], Verdict.KEEP),
    ([(1.0, Seen(Phase.SENDING, 1, 500)), (61.0, Seen(Phase.SENDING, 1, 500))],
     Verdict.CLOSE),
    # idle and working: no deadline here
    ([(1.0, Seen(Phase.IDLE, 1, 500)), (1000.0, Seen(Phase.IDLE, 1, 500))], Verdict.KEEP),
    ([(1.0, Seen(Phase.WORKING, 1, 500)), (1000.0, Seen(Phase.WORKING, 1, 500))],
     Verdict.KEEP),
])
def test_deadlines(script: list[tuple[float, Seen]], last: Verdict) -> None:
    verdicts = run(script)
    assert [v for v, _ in verdicts[:-1]] == [Verdict.KEEP] * (len(verdicts) - 1)
    assert verdicts[-1][0] is last


@pytest.mark.parametrize(("script", "why"), [
    ([head(10.0, 3)], "request head not received within 10 s"),
    ([body(1.0, 0), body(25.0, 24)], "request body slower than 500 bytes/s"),
])
def test_a_timeout_says_why(script: list[tuple[float, Seen]], why: str) -> None:
    assert run(script)[-1] == (Verdict.TIMEOUT, why)


def test_no_rate_check_at_zero_but_a_stalled_body_still_times_out() -> None:
    limits = replace(LIMITS, body_min_rate_bytes_per_s=0)
    script = [body(1.0, 0), *(body(float(t), t) for t in range(2, 100))]
    assert all(v is Verdict.KEEP for v, _ in run(script, limits))
    # no byte for body_timeout_s
    assert run([body(1.0, 100), body(30.0, 100), body(60.9, 100)], limits)[-1][0] is \
        Verdict.KEEP
    assert run([body(1.0, 100), body(30.0, 101), body(89.9, 101)], limits)[-1][0] is \
        Verdict.KEEP
    assert run([body(1.0, 100), body(30.0, 101), body(90.0, 101)], limits)[-1] == \
        (Verdict.TIMEOUT, "no request body bytes for 60 s")


def test_shed_order_idle_then_silent_then_oldest_arriving() -> None:
    tracks = [("working", Track(Phase.WORKING, 1, 0.0, 0, 0.0, 0)),
              ("body-old", Track(Phase.BODY, 1, 1.0, 0, 1.0, 0)),
              ("new-young", Track(Phase.NEW, 0, 9.0, 0, 9.0, 0)),
              ("idle-young", Track(Phase.IDLE, 3, 8.0, 0, 8.0, 0)),
              ("head-young", Track(Phase.HEAD, 1, 7.0, 0, 7.0, 0)),
              ("sending", Track(Phase.SENDING, 1, 0.0, 0, 0.0, 0)),
              ("idle-old", Track(Phase.IDLE, 1, 2.0, 0, 2.0, 0)),
              ("new-old", Track(Phase.NEW, 0, 3.0, 0, 3.0, 0))]
    assert shed_order(tracks) == ["idle-old", "idle-young", "new-old", "new-young", "body-old",
                                  "head-young"]


@pytest.mark.parametrize(("value", "soft", "expected"), [
    ("auto", 1024, 768), ("auto", 65536, 49152), ("auto", 8, 16), (100, 1024, 100)])
def test_max_connections(value: int | str, soft: int, expected: int) -> None:
    limits = ClientsConfig(max_connections=value)  # type: ignore[arg-type]
    assert resolve_max_connections(limits, soft) == expected


# ------------------------------------------------------------------ the guard, fake connections


class FakeConnection:
    def __init__(self, phase: Phase = Phase.NEW, received: int = 0) -> None:
        self.phase = phase
        self.request = 0 if phase is Phase.NEW else 1
        self.received = received
        self.answer: int | None = None
        self.closed = False

    def seen(self) -> Seen:
        return Seen(self.phase, self.request, self.received)

    def answer_and_close(self, error: GatewayError) -> None:
        self.answer = error.status
        self.closed = True

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def guard_with(limits: ClientsConfig) -> tuple[ConnectionGuard, FakeClock]:
    clock = FakeClock()
    return ConnectionGuard(lambda: limits, open_files=1024, clock=clock), clock


def test_the_guard_answers_timeouts_and_closes() -> None:
    guard, clock = guard_with(LIMITS)
    silent, slow_head, slow_body, busy = (FakeConnection() for _ in range(4))
    for conn in (silent, slow_head, slow_body, busy):
        guard.opened(conn)
    slow_head.phase, slow_head.request, slow_head.received = Phase.HEAD, 1, 1
    slow_body.phase, slow_body.request, slow_body.received = Phase.BODY, 1, 80
    busy.phase, busy.request = Phase.WORKING, 1
    for t in range(1, 31):
        clock.now = float(t)
        slow_head.received += 1
        slow_body.received += 1
        guard.tick()
    assert (silent.closed, silent.answer) == (True, None)
    assert (slow_head.closed, slow_head.answer) == (True, 408)
    assert (slow_body.closed, slow_body.answer) == (True, 408)
    assert not busy.closed
    stats = guard.statistics()
    assert (stats.closed_silent, stats.closed_head_timeout, stats.closed_body_timeout,
            stats.open_connections) == (1, 1, 1, 1)


def test_idle_connections_give_way_above_the_high_water_mark() -> None:
    guard, clock = guard_with(replace(LIMITS, max_connections=10, idle_high_water=0.5))
    idle = [FakeConnection(Phase.IDLE) for _ in range(3)]
    busy = [FakeConnection(Phase.WORKING) for _ in range(2)]
    for conn in [*idle, *busy]:
        guard.opened(conn)
    clock.now = 1.0
    guard.tick()  # the idle ones are seen idle
    idle[2].phase = Phase.WORKING  # busy again since: not idle any more
    for _ in range(3):
        clock.now += 0.01
        guard.opened(FakeConnection())
    assert [c.closed for c in idle] == [True, True, False]
    assert not any(c.closed for c in busy)
    assert guard.statistics().shed_idle == 2


def test_at_the_limit_the_oldest_slow_request_makes_room_never_the_work() -> None:
    guard, clock = guard_with(replace(LIMITS, max_connections=4))
    work = [FakeConnection(Phase.WORKING), FakeConnection(Phase.SENDING)]
    slow = [FakeConnection(Phase.HEAD, 1), FakeConnection(Phase.BODY, 80)]
    for conn in [*work, slow[0]]:
        guard.opened(conn)
    clock.now = 1.0
    guard.opened(slow[1])
    clock.now = 2.0
    guard.tick()
    newcomer = FakeConnection()
    guard.opened(newcomer)  # five: the oldest head gives way, answered 503
    assert (slow[0].closed, slow[0].answer) == (True, 503)
    assert not newcomer.closed
    clock.now = 3.0
    guard.tick()
    guard.opened(FakeConnection())  # five again: the newcomer sent nothing, it goes first
    assert (newcomer.closed, newcomer.answer) == (True, None)
    guard.opened(FakeConnection())
    assert slow[1].answer == 503
    last = FakeConnection()
    clock.now = 4.0
    guard.tick()
    for c in [FakeConnection() for _ in range(2)]:
        c.phase = Phase.WORKING
        guard.opened(c)
    guard.opened(last)  # nothing left to close: the newcomer itself is refused
    assert (last.closed, last.answer) == (True, 503)
    assert not any(c.closed for c in work)
    assert guard.statistics().refused_at_limit >= 1


def test_asyncios_accept_failures_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        for _ in range(5):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    lines = [r for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info
