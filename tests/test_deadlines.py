"""Deadlines end to end, with the README's minimal config (``listen`` and ``workers`` only)
in front of the simulator: a bad deadline is a 400; a client's own short deadline is never
the worker's failure; a version no worker has is Triton's 404, never a retry-forever 503."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import SimProcess

BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [1.0] * 16}]}).encode()
SERVICE_MS = 60.0


@pytest.fixture(scope="module")
def minimal_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    spec = WorkerSpec(slots=4, base_ms=SERVICE_MS, per_item_ms=0.0)
    with SimFleetThread([spec, spec]) as sim:
        cfg = {"workers": [{"url": f"http://{url}"} for url in sim.urls]}   # the minimal config
        gw = GatewayProcess(cfg, Path(tmp_path_factory.mktemp("gw-deadlines")))
        gw.start()
        try:
            gw.wait_workers_ready(2)
            yield gw
        finally:
            gw.stop()


def infer(gw: GatewayProcess, headers: dict[str, str] | None = None,
          path: str = "/v2/models/simple/infer") -> httpx.Response:
    return httpx.post(gw.url + path, content=BODY, headers=headers or {}, timeout=10)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1.5"])
def test_a_deadline_that_is_not_a_positive_integer_is_a_400(minimal_gateway: GatewayProcess,
                                                            value: str) -> None:
    r = infer(minimal_gateway, {"X-Request-Timeout-Ms": value})
    assert r.status_code == 400, r.text
    assert "X-Request-Timeout-Ms" in r.json()["error"]


def test_a_clients_short_deadline_never_ejects_a_healthy_worker(
        minimal_gateway: GatewayProcess) -> None:
    gw = minimal_gateway
    assert infer(gw).status_code == 200
    with ThreadPoolExecutor(8) as pool:
        short = list(pool.map(lambda _: infer(gw, {"X-Request-Timeout-Ms": "5"}), range(20)))
    for r in short:
        assert r.status_code in (503, 504), r.text
        assert r.headers["retry-after"] and "error" in r.json()
    workers = gw.status()["workers"]
    assert [w["breaker"] for w in workers] == ["closed", "closed"], workers
    assert all(w["breaker_opened_total"] == 0 for w in workers), workers
    # both workers still take traffic
    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(lambda _: infer(gw), range(24)))
    assert all(r.status_code == 200 for r in ok)


def test_an_unknown_version_is_triton_404_not_503(minimal_gateway: GatewayProcess) -> None:
    r = infer(minimal_gateway, path="/v2/models/simple/versions/9/infer")
    assert r.status_code == 404, r.text
    assert "retry-after" not in r.headers
    assert "version 9" in r.json()["error"]
    ready = httpx.get(minimal_gateway.url + "/v2/models/simple/versions/9/ready", timeout=10)
    assert ready.status_code == 400 and "error" in ready.json()
    assert infer(minimal_gateway, path="/v2/models/simple/versions/1/infer").status_code == 200
    unknown = infer(minimal_gateway, path="/v2/models/nope/infer")
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def test_a_request_the_queue_cannot_serve_in_time_is_refused_before_its_body(
        tmp_path: Path) -> None:
    """With requests already waiting, one whose deadline the queue cannot meet is answered
    503 + Retry-After at once — decided from its headers; its body is never read."""
    with SimProcess(1, slots=1, base_ms=300.0) as sim, \
            GatewayProcess({"workers": [{"url": sim.urls[0]}]}, tmp_path) as gw:
        gw.wait_workers_ready(1)
        with ThreadPoolExecutor(12) as pool:
            # one instance of 300 ms (2 slots, learned): 10 of these wait in the gateway
            backlog = [pool.submit(infer, gw) for _ in range(12)]
            gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] >= 4
                        and gw.status()["dispatch"]["service_time_ewma_s"] > 0,
                        timeout_s=10, what="a queue, and a first answer timed")
            with httpx.Client(timeout=10) as client:
                def body_never_sent() -> Iterator[bytes]:
                    yield b"{"
                    time.sleep(2)
                    yield b"}"
                r = client.post(gw.url + "/v2/models/simple/infer", content=body_never_sent(),
                                headers={"X-Request-Timeout-Ms": "100"})
            assert all(f.result().status_code == 200 for f in backlog)
        assert r.status_code == 503, r.text
        assert "deadline cannot be met" in r.json()["error"] and r.headers["retry-after"]
        assert gw.status()["dispatch"]["refused_before_body"] >= 1


def test_after_an_idle_spell_a_request_behind_one_in_flight_is_not_refused(
        tmp_path: Path) -> None:
    """Idle for longer than the service-time window: the completion meter has decayed
    towards nothing because nobody asked. A request that then waits behind one in flight
    must be estimated from the last measured service time (300 ms), not from the decayed
    meter (which once estimated a 67 s wait and refused a 30 s deadline: CI, gRPC stream)."""
    with SimProcess(1, slots=1, base_ms=300.0) as sim, \
            GatewayProcess({"workers": [{"url": sim.urls[0]}]}, tmp_path) as gw:
        gw.wait_workers_ready(1)
        assert infer(gw).status_code == 200
        time.sleep(11.0)      # two windows of the service-time floor, and then some
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(
                lambda _: infer(gw, {"X-Request-Timeout-Ms": "8000"}), range(6)))
        refused = [r.text for r in answers if r.status_code != 200]
        assert not refused, refused


def test_the_remaining_time_goes_on_as_tritons_timeout_where_the_model_honours_it(
        tmp_path: Path) -> None:
    """A model whose queue policy allows ``timeout`` overrides gets each request's remaining
    time as ``parameters.timeout`` (JSON and binary bodies); a client's own timeout and a
    model without the policy are left alone."""
    from gateway.sim.core import SimModel
    honours = SimModel(name="honours", timeout_override=True)
    plain = SimModel(name="plain")
    with SimFleetThread([WorkerSpec(models=(honours, plain), base_ms=1.0)]) as sim, \
            GatewayProcess({"workers": [{"url": f"http://{sim.urls[0]}"}]}, tmp_path) as gw:
        gw.wait_workers_ready(1)

        def last_timeout() -> int | None:
            return sim.statistics().workers[0].last_timeout_us

        r = infer(gw, {"X-Request-Timeout-Ms": "4000"}, path="/v2/models/honours/infer")
        assert r.status_code == 200, r.text
        seen = last_timeout()
        assert seen is not None and 3_000_000 < seen <= 4_000_000, seen
        # binary tensors: the header grows, Inference-Header-Content-Length follows
        header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16],
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": 64}}]}).encode()
        r = httpx.post(gw.url + "/v2/models/honours/infer", content=header + bytes(64),
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "X-Request-Timeout-Ms": "2500"}, timeout=10)
        assert r.status_code == 200, r.text
        seen = last_timeout()
        assert seen is not None and 1_500_000 < seen <= 2_500_000, seen
        # the client's own timeout stands
        own = json.dumps({"parameters": {"timeout": 7_000_000}, "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]})
        r = httpx.post(gw.url + "/v2/models/honours/infer", content=own, timeout=10)
        assert r.status_code == 200 and last_timeout() == 7_000_000
        # a model without the policy: nothing added
        before = last_timeout()
        assert infer(gw, {"X-Request-Timeout-Ms": "900"},
                     path="/v2/models/plain/infer").status_code == 200
        assert last_timeout() == before



def test_the_priority_class_goes_on_as_tritons_priority_where_the_model_has_levels(
        tmp_path: Path) -> None:
    """A model with 3 priority levels gets the tenant's class as ``parameters.priority``
    (critical 1, standard 2, sheddable 3); a client's own value may lower it, never raise
    it."""
    from gateway.sim.core import SimModel
    model = SimModel(name="ranked", priority_levels=3)
    cfg: dict[str, Any] = {"workers": [], "admission": {"tenants": {
        "gold": {"keys": ["k-gold"], "priority": "critical"},
        "low": {"keys": ["k-low"], "priority": "sheddable"}}}}
    with SimFleetThread([WorkerSpec(models=(model,), base_ms=1.0)]) as sim:
        cfg["workers"] = [{"url": f"http://{sim.urls[0]}"}]
        with GatewayProcess(cfg, tmp_path) as gw:
            gw.wait_workers_ready(1)

            def sent(key: str | None, own: int | None = None) -> int | None:
                params = {} if own is None else {"parameters": {"priority": own}}
                body = json.dumps({**params, "inputs": [
                    {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                     "data": [1.0] * 16}]})
                headers = {"X-Api-Key": key} if key else {}
                r = httpx.post(gw.url + "/v2/models/ranked/infer", content=body,
                               headers=headers, timeout=10)
                assert r.status_code == 200, r.text
                return sim.statistics().workers[0].last_priority

            assert sent("k-gold") == 1
            assert sent(None) == 2
            assert sent("k-low") == 3
            assert sent("k-low", own=1) == 3      # a client cannot raise its class
            assert sent("k-gold", own=3) == 3     # but may lower it
