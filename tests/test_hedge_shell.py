"""The dispatcher's hedges, in process: the gateway's service (``GatewayService``) in front of
simulated workers on the same loop (``SimFleet``), a per-try timeout of 50 ms so that every
request safe to repeat is hedged. Each race the shell must get right: the first answer wins
and the other attempt's slot comes back; a hedge's answer taken over from a stuck first
attempt; the first attempt failing while its hedge runs; the client leaving while both run;
and a sequence, never hedged."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.app.service import GatewayService
from gateway.core.config import parse_config
from gateway.core.types import ModelKey
from gateway.engine.dispatch import Call, Lease
from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleet

SERVICE_MS = 300.0


def body(sequence_id: int | None = None) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                       "data": [1.0] * 16}]}
    if sequence_id is not None:
        doc["parameters"] = {"sequence_id": sequence_id}
    return json.dumps(doc).encode()


def call(sequence_id: int | None = None) -> Call:
    return Call(method="POST", target="/v2/models/simple/infer",
                headers=[(b"content-type", b"application/json")], body=body(sequence_id),
                key=ModelKey("simple"), deadline=time.monotonic() + 10.0,
                sequence_id=None if sequence_id is None else str(sequence_id))


class Rig:
    def __init__(self, sim: SimFleet, svc: GatewayService) -> None:
        self.sim = sim
        self.svc = svc

    def counter(self, name: str) -> int:
        return int(self.svc.dispatcher.counters[name])

    def in_flight(self) -> list[int]:
        return [self.svc.fleet.workers[f"127.0.0.1:{p}"].in_flight for p in self.sim.ports]

    def received(self) -> int:
        return sum(w.infer_requests for w in self.sim.statistics().workers)

    async def finish(self, lease: Lease) -> bytes:
        data = await lease.response.read()
        self.svc.dispatcher.finish(lease)
        return data

    async def settled(self) -> None:
        """Until every slot is back (a cancelled attempt releases its slot as it ends)."""
        for _ in range(100):
            if sum(self.in_flight()) == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"slots still taken: {self.in_flight()}")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    sim = SimFleet([WorkerSpec(slots=2, base_ms=SERVICE_MS, per_item_ms=0.0)] * 3)
    await sim.start()
    cfg = parse_config({
        "workers": [{"url": u, "metrics_url": u + "/metrics"}
                    for u in (f"http://127.0.0.1:{p}" for p in sim.ports)],
        "health": {"interval_s": 0.1, "rise": 1},
        "admission": {"hedge": {"min_delay_s": 0.05, "max_delay_s": 0.05},
                      "stall": {"enabled": False},
                      "retry": {"budget_ratio": 1.0, "budget_min": 100}},
    })
    svc = GatewayService(cfg)
    runner = asyncio.create_task(svc.run())
    try:
        for _ in range(200):
            if len(list(svc.fleet.routable())) == 3:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("workers not ready")
        yield Rig(sim, svc)
    finally:
        svc.stop()
        await runner
        await svc.aclose()
        await sim.stop()


async def test_the_first_answer_wins_and_the_other_slot_comes_back(rig: Rig) -> None:
    lease = await rig.svc.dispatcher.dispatch(call())
    assert lease.response.status == 200 and lease.attempts == 2
    assert json.loads(await rig.finish(lease))["outputs"][0]["data"][0] == 2.0
    assert rig.counter("hedges") == 1
    assert rig.received() == 2                  # both ran: the hedge was sent 50 ms later
    await rig.settled()


async def test_a_stuck_attempt_is_taken_over_by_its_hedge(rig: Rig) -> None:
    rig.sim.set_fault(0, hang=True)             # accepts, never answers
    hung = f"127.0.0.1:{rig.sim.ports[0]}"
    leases = await asyncio.gather(*(rig.svc.dispatcher.dispatch(call()) for _ in range(6)))
    assert all(lease.response.status == 200 for lease in leases)
    assert all(lease.worker.id != hung for lease in leases)
    for lease in leases:
        await rig.finish(lease)
    assert rig.counter("hedges_won") >= 1       # the ones that went to the hung worker
    await rig.settled()


async def test_the_first_attempt_failing_waits_for_its_hedge(rig: Rig) -> None:
    task = asyncio.create_task(rig.svc.dispatcher.dispatch(call()))
    await asyncio.sleep(0.02)
    first = rig.in_flight().index(1)
    await asyncio.sleep(0.1)                    # the hedge is under way
    assert sum(rig.in_flight()) == 2
    rig.sim.crash(first)                        # the first attempt's connection breaks
    lease = await task
    assert lease.response.status == 200 and lease.worker.id != f"127.0.0.1:{rig.sim.ports[first]}"
    await rig.finish(lease)
    assert rig.counter("hedges_won") == 1 and rig.counter("retries") == 0
    await rig.settled()


async def test_a_client_leaving_releases_both_attempts(rig: Rig) -> None:
    task = asyncio.create_task(rig.svc.dispatcher.dispatch(call()))
    await asyncio.sleep(0.15)
    assert sum(rig.in_flight()) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await rig.settled()
    assert rig.counter("hedges_won") == 0


async def test_a_sequence_is_never_hedged(rig: Rig) -> None:
    lease = await rig.svc.dispatcher.dispatch(call(sequence_id=42))
    assert lease.response.status == 200 and lease.attempts == 1
    await rig.finish(lease)
    assert rig.counter("hedges") == 0 and rig.received() == 1
