"""The loop-lag estimate (jumps up at once, decays by half per half-life, bounded) and the
windowed minimum of service times that the queue's drain estimate reads."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.core.admission import WindowMin
from gateway.engine.looplag import MAX_LAG_S, LoopLag


@pytest.mark.parametrize(("observed", "at", "expected"), [
    ([(0.2, 10.0)], 10.0, 0.2),                     # seen now: all of it
    ([(0.2, 10.0)], 10.05, 0.1),                    # one half-life later: half
    ([(0.2, 10.0)], 10.1, 0.05),                    # two: a quarter
    ([(0.2, 10.0), (0.05, 10.01)], 10.01, 0.2 * 0.5 ** 0.2),   # a smaller one does not win
    ([(0.2, 10.0), (0.3, 10.05)], 10.05, 0.3),      # a larger one does, at once
    ([(-1.0, 10.0)], 10.0, 0.0),                    # early timers are not negative lag
    ([(50.0, 10.0)], 10.0, MAX_LAG_S),              # bounded
])
def test_lag_estimate(observed: list[tuple[float, float]], at: float, expected: float) -> None:
    lag = LoopLag(half_life_s=0.05)
    for lateness, now in observed:
        lag.observe(lateness, now)
    assert lag.lag_s(at) == pytest.approx(expected)


async def test_a_blocked_loop_is_measured() -> None:
    lag = LoopLag(interval_s=0.005)
    lag.start()
    try:
        await asyncio.sleep(0.02)
        time.sleep(0.15)              # the loop is stuck for 150 ms
        await asyncio.sleep(0.01)
        assert lag.worst_s >= 0.1, lag
        assert lag.lag_s() >= 0.05, lag
    finally:
        lag.stop()


@pytest.mark.parametrize(("samples", "at", "expected"), [
    ([], 0.0, 0.0),                                         # nothing seen
    ([(0.2, 0.0), (0.05, 1.0), (0.3, 2.0)], 2.0, 0.05),     # the smallest in the window
    ([(0.05, 0.0), (0.2, 6.0)], 6.0, 0.05),                 # the previous window still counts
    ([(0.05, 0.0), (0.2, 6.0)], 11.5, 0.2),                 # ... until it rotates out
    ([(0.05, 0.0)], 11.0, 0.0),                             # two windows of nothing: unknown
])
def test_window_min(samples: list[tuple[float, float]], at: float, expected: float) -> None:
    floor = WindowMin(window_s=5.0)
    for value, now in samples:
        floor.add(value, now)
    assert floor.value(at) == pytest.approx(expected)


def test_window_min_remembers_the_last_value_it_saw_after_an_idle_spell() -> None:
    floor = WindowMin(window_s=5.0)
    assert floor.last_known(0.0) == 0.0                   # never seen: unknown
    floor.add(0.3, 0.0)
    floor.add(0.1, 1.0)
    assert floor.last_known(2.0) == pytest.approx(0.1)    # in the window: the window's own
    assert floor.value(30.0) == 0.0                       # idle: the window forgot it ...
    assert floor.last_known(30.0) == pytest.approx(0.1)   # ... the last measurement did not
    floor.add(0.2, 31.0)
    assert floor.last_known(31.0) == pytest.approx(0.2)   # a new measurement replaces it
