"""Drain before remove, end to end (issue 23, item 2): the closed loop's fleet
(loadtest.closedloop) in front of the real gateway and simulated workers, under open-loop
load. Workers are taken away (the config without them, SIGHUP, the gateway drains them, the
process stops once the gateway no longer lists them) and one is added after a warm-up, while
requests keep coming: not one request may fail."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from gateway.tools.gatewayproc import GatewayProcess
from loadtest.closedloop import Fleet, OpenLoop, gateway_config, scrape

pytestmark = pytest.mark.timeout(90)


def test_workers_removed_under_load_are_drained_first_and_no_request_is_lost(
        tmp_path: Path) -> None:
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    gw = GatewayProcess({}, tmp_path)
    fleet = Fleet(gw, slots=1, service_ms=150.0, warmup_s=0.5, spares=1, clock=clock)
    try:
        gw.write_config(gateway_config(fleet.start_ready(4)))
        for sim in fleet.pool:          # the spare the order below takes, started ahead
            sim.wait()
        gw.start()
        gw.wait_workers_ready(4)
        first_ids = {r.sim.id for r in fleet.replicas}
        stop = threading.Event()

        def scaler() -> None:
            # t ≈ 1.5 s: remove two; t ≈ 2.5 s: order one (ready 0.5 s later); t ≈ 4 s:
            # remove one more. Every 0.05 s: promote warm workers, stop drained ones.
            steps = {1.5: ("remove", 2), 2.5: ("order", 1), 4.0: ("remove", 1)}
            while not stop.is_set():
                s = scrape(gw.url)
                fleet.reap(set(s.in_flight))
                fleet.promote()
                for at, (what, n) in list(steps.items()):
                    if clock() >= at:
                        del steps[at]
                        if what == "remove":
                            fleet.remove(n, s.in_flight)
                        else:
                            fleet.order(n)
                time.sleep(0.05)

        thread = threading.Thread(target=scaler, daemon=True)
        thread.start()
        load = OpenLoop(gw.port, lambda t: 12.0, clock, deadline_ms=5000, seed=3)
        asyncio.run(load.run(clock(), clock() + 6.0))
        time.sleep(0.5)
        stop.set()
        thread.join(5)
    finally:
        gw.stop()
        fleet.stop()
    statuses = [a.status for a in load.answers]
    assert len(statuses) > 40
    assert all(s == 200 for s in statuses), sorted(set(statuses))
    whats = [e.what for e in fleet.events]
    assert whats.count("drain") == 3 and whats.count("order") == 1
    assert whats.count("gone") == 3, fleet.events     # every drained worker stopped
    drained = {e.worker for e in fleet.events if e.what == "drain"}
    assert len(drained & first_ids) >= 2
    assert fleet.size == 2 and fleet.ready == 2
