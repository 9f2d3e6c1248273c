"""A worker that dies or hangs costs the client nothing — end to end, with real processes:
the gateway (``python -m gateway serve``, minimal config) in front of simulated workers that
are each their own process (``gateway sim --workers 1``), so that one can be SIGKILLed or
SIGSTOPped (``loadtest.faults.FaultFleet``), and an open-loop client.

Bounds are loose on purpose (CI shares two cores); ``python -m loadtest.faults`` reports
the figures themselves.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.tools.procs import http_get
from loadtest.faults import FaultFleet, Sample, open_loop, pct

DEADLINE_MS = 3000


def run_load(fleet: FaultFleet, rate: float, duration_s: float,
             events: list[tuple[float, Callable[[], None]]]) -> list[Sample]:
    return asyncio.run(open_loop(fleet.gateway.port, rate, duration_s,
                                 deadline_ms=DEADLINE_MS, events=events))


def by_status(samples: list[Sample]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in samples:
        out[s.status] = out.get(s.status, 0) + 1
    return out


def test_a_killed_worker_fails_no_request(tmp_path: Path) -> None:
    """SIGKILL one worker of four under load: what was in flight on it is retried
    elsewhere (the connection broke before any answer), what was routed to it before it was
    found dead too (connection refused)."""
    with FaultFleet(tmp_path) as fleet:
        samples = run_load(fleet, 80, 6.0, [(2.0, lambda: fleet.kill(0))])
        dispatch = fleet.gateway.status()["dispatch"]
    answered = by_status(samples)
    print(f"answers {answered}; dispatch {dispatch}")
    assert answered == {200: len(samples)}, answered
    assert dispatch["retries"] >= 1, dispatch
    assert dispatch["upstream_attempts"] <= 1.2 * len(samples) + 3, dispatch


def test_a_frozen_worker_is_found_stalled_and_its_requests_answered_early(
        tmp_path: Path) -> None:
    """SIGSTOP one worker of four for 3 s: it is marked stalled in a few service times
    (/status.json, /metrics, one log line), its requests are hedged to the others — each
    answered well before its 3 s deadline — and it recovers after SIGCONT."""
    seen: list[tuple[dict[str, Any], str]] = []
    with FaultFleet(tmp_path) as fleet:
        gw = fleet.gateway
        frozen = fleet.worker_id(1)

        def look() -> None:
            _, body = http_get(gw.url + "/metrics")
            seen.append((gw.worker_status(frozen), body.decode()))

        # (routing may leave a worker idle for a while: it is found once it holds requests)
        looks: list[tuple[float, Callable[[], None]]] = [(2.4 + 0.3 * i, look)
                                                         for i in range(9)]
        samples = run_load(fleet, 80, 7.0, [(2.0, lambda: fleet.freeze(1)), *looks,
                                            (5.0, lambda: fleet.thaw(1))])

        def recovered() -> bool:
            httpx.post(gw.url + "/v2/models/simple/infer", content=_body(), timeout=10)
            return bool(gw.worker_status(frozen)["stall"] == "serving")   # a probe answered

        gw.wait_for(recovered, what="the thawed worker serving again")
        # every slot came back: the winners' at the end of their answers, the losers' (the
        # attempts on the frozen worker, cancelled) at once
        gw.wait_for(lambda: all(w["in_flight"] == 0 for w in gw.status()["workers"]),
                    timeout_s=5, what="no request in flight")
        dispatch = gw.status()["dispatch"]
        log = gw.log()
    answered = by_status(samples)
    during = [s.latency_s for s in samples if 2.0 <= s.t < 5.0]
    p99 = pct(during, 0.99)
    print(f"answers {answered}; p99 while frozen {p99} ms, max {max(during) * 1000:.0f} ms; "
          f"dispatch {dispatch}")
    assert answered == {200: len(samples)}, answered
    assert max(during) < 1.5, max(during)                 # the deadline is 3 s
    assert p99 is not None and p99 < 1000, p99
    stalled = [(status, metrics) for status, metrics in seen if status["stalled"]]
    assert stalled, [status["stall"] for status, _ in seen]
    assert all(status["stall"] in ("stalled", "probing") for status, _ in stalled)
    assert any(f'gateway_worker_stalled{{worker="{frozen}"}} 1.0' in metrics
               for _, metrics in stalled)
    assert dispatch["stalls"] >= 1 and dispatch["hedges"] >= 1, dispatch
    assert f"worker {frozen} stalled" in log and f"worker {frozen} recovered" in log, log


def _body(sequence_id: int | None = None, model_inputs: int = 16) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": [1, model_inputs],
                                       "datatype": "FP32", "data": [1.0] * model_inputs}]}
    if sequence_id is not None:
        doc["parameters"] = {"sequence_id": sequence_id, "sequence_start": True}
    return json.dumps(doc).encode()


def test_what_is_not_safe_to_repeat_is_never_repeated_on_a_killed_worker(
        tmp_path: Path) -> None:
    """Slow workers (800 ms a request); each case sends one request, kills the worker it
    went to, and counts what the others received. A request of a sequence, of a stateful
    model (sequence_batching) and of a model marked ``repeatable: false`` gets an error and
    is never sent to another worker; a plain one is answered by another worker."""
    with FaultFleet(tmp_path, workers=5, instances=1, service_ms=800,
                    sim_args=["--model", "simple", "--model", "seq", "--model", "once",
                              "--stateful", "seq"],
                    extra={"models": {"once": {"repeatable": False}}}) as fleet:
        gw = fleet.gateway
        gw.wait_for(lambda: all(len(w["models"]) == 3 for w in gw.status()["workers"]),
                    what="every model listed")
        alive = set(range(5))

        def kill_where_it_runs(model: str, body: bytes) -> tuple[int, int, int]:
            """(status, requests the other live workers received meanwhile, attempts)."""
            before = {i: _infer_count(fleet, i) for i in alive}
            answer: dict[str, int] = {}
            thread = threading.Thread(target=lambda: answer.update(status=httpx.post(
                f"{gw.url}/v2/models/{model}/infer", content=body, timeout=20,
                headers={"x-request-timeout-ms": "15000"}).status_code))
            thread.start()
            busy: list[int] = []

            def in_flight() -> bool:
                busy[:] = [i for i in alive if gw.worker_status(fleet.worker_id(i))["in_flight"]]
                return bool(busy)

            gw.wait_for(in_flight, timeout_s=5, what="the request in flight")
            victim = busy[0]
            time.sleep(0.2)
            fleet.kill(victim)
            alive.discard(victim)
            thread.join(20)
            after = {i: _infer_count(fleet, i) for i in alive}
            others = sum(after[i] - before[i] for i in alive)
            return answer["status"], others, victim

        for model, body in (("simple", _body(sequence_id=7)), ("seq", _body()),
                            ("once", _body())):
            status, others, victim = kill_where_it_runs(model, body)
            print(f"{model}: {status}, {others} request(s) on other workers")
            assert status >= 500, (model, status)
            assert others == 0, (model, others)                # no duplicate anywhere
            down = fleet.worker_id(victim)
            gw.wait_for(lambda: not gw.worker_status(down)["ready"],  # noqa: B023
                        what="the killed worker down")
        status, others, _ = kill_where_it_runs("simple", _body())
        assert status == 200 and others == 1, (status, others)  # resent, once
        assert gw.status()["dispatch"]["not_repeated"] >= 3


def _infer_count(fleet: FaultFleet, i: int) -> int:
    return int(fleet.sims[i].stats()[0]["infer_requests"])
