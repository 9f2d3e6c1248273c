"""The turnstile lets at most ``per_turn`` requests start per loop turn, FIFO."""

from __future__ import annotations

import asyncio

from gateway.http.turnstile import Turnstile


async def test_at_most_per_turn_start_in_one_turn_and_order_is_kept() -> None:
    gate = Turnstile(per_turn=3)
    order: list[int] = []
    turn = 0
    turns: list[int] = []

    async def ticker() -> None:
        nonlocal turn
        for _ in range(20):
            await asyncio.sleep(0)
            turn += 1

    async def request(i: int) -> None:
        await gate.enter()
        order.append(i)
        turns.append(turn)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(request(i) for i in range(10)))
    await tick
    assert order == list(range(10))
    per_turn = {t: turns.count(t) for t in set(turns)}
    assert max(per_turn.values()) <= 3
    assert len(per_turn) >= 4  # 10 requests over at least ceil(10 / 3) turns
    assert gate.waiting == 0 and gate.waited_total == 7


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    gate = Turnstile(per_turn=1)
    first, second, third = (asyncio.create_task(gate.enter()) for _ in range(3))
    await asyncio.sleep(0)  # all three ran once: the first got in, two wait
    assert first.done() and gate.waiting == 2
    second.cancel()
    await asyncio.wait_for(third, 1)  # not blocked by the cancelled one
    assert second.cancelled() and gate.waiting == 0
