"""Fair share through the real gateway (a subprocess) in front of the simulator, with the
README's minimal config plus two tenants: a heavy tenant keeping the one worker saturated
with batch-32 requests does not starve a light tenant's batch-1 requests, and the meter
shows both tenants' GPU-seconds, shares and Jain's index on /metrics and /status.json."""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess

ADMIN_TOKEN = "fair-admin-token"
BASE_MS, PER_ITEM_MS = 2.0, 0.5   # batch 1: 2.5 ms, batch 32: 18 ms
HEAVY_MS = BASE_MS + 32 * PER_ITEM_MS


def body(batch: int) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [batch, 16],
                                   "data": [1.0] * (16 * batch)}]}).encode()


def post(url: str, payload: bytes, key: str) -> tuple[int, float]:
    request = urllib.request.Request(url, payload, {"Content-Type": "application/json",
                                                    "X-Api-Key": key}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            response.read()
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        status = int(exc.code)
    return status, time.perf_counter() - start


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with SimFleetThread([WorkerSpec(slots=1, base_ms=BASE_MS, per_item_ms=PER_ITEM_MS)]) as sims:
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "workers": [{"url": f"http://{sims.urls[0]}"}],
            "admission": {"tenants": {"light": {"keys": ["light-key"]},
                                      "heavy": {"keys": ["heavy-key"]}}},
            "admin": {"token": ADMIN_TOKEN},  # /status.json names tenants to the admin only
        }
        gw = GatewayProcess(config, Path(tmp_path_factory.mktemp("fairshare-e2e")))
        with gw:
            gw.wait_workers_ready(1)
            yield gw


def test_light_tenant_is_not_starved_and_the_meter_shows_it(gateway: GatewayProcess) -> None:
    url = f"{gateway.url}/v2/models/simple/infer"
    stop = threading.Event()
    heavy: list[tuple[int, float]] = []

    def heavy_caller() -> None:
        while not stop.is_set():
            heavy.append(post(url, body(32), "heavy-key"))

    callers = [threading.Thread(target=heavy_caller) for _ in range(12)]
    for t in callers:
        t.start()
    try:
        time.sleep(0.5)  # the heavy tenant's backlog forms in the gateway's queue
        light = []
        for _ in range(40):
            light.append(post(url, body(1), "light-key"))
            time.sleep(0.02)
    finally:
        stop.set()
        for t in callers:
            t.join()
    assert {s for s, _ in light} == {200} and {s for s, _ in heavy} == {200}
    light_p50 = statistics.median(t for _, t in light)
    heavy_p50 = statistics.median(t for _, t in heavy)
    # FIFO would put each light request behind ~12 heavy executions; fair share behind
    # the one executing and the one waiting in the worker
    assert light_p50 < heavy_p50 / 3, (light_p50, heavy_p50)

    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10) as resp:
        page = resp.read().decode()
    gpu = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
           if line.startswith("gateway_tenant_gpu_seconds_total{")}
    assert set(gpu) == {"light", "heavy"} and gpu["heavy"] > 5 * gpu["light"] > 0, gpu
    assert "gateway_fairness_jain_index " in page
    assert 'gateway_tenant_queue_wait_seconds_total{tenant="heavy"}' in page
    assert {t["tenant"] for t in gateway.status()["fair_share"]["tenants"]} == {"(hidden)"}
    request = urllib.request.Request(f"{gateway.url}/status.json",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        fair = json.loads(resp.read())["fair_share"]
    assert fair["order"] == "fair" and 0.5 <= fair["jain_index"] <= 1.0
    shares = {t["tenant"]: t["share"] for t in fair["tenants"]}
    assert shares["heavy"] > shares["light"] and sum(shares.values()) == pytest.approx(1.0)
    # the learned cost of a batch-32 request is several times that of a batch-1 one
    per_request = {t["tenant"]: t["gpu_s"] / t["requests"] for t in fair["tenants"]}
    assert per_request["heavy"] > 3 * per_request["light"], per_request


def test_gpu_second_quota_answers_429_with_retry_after(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A tenant with ``gpu_rate_limit`` (GPU-seconds per second) is refused once its
    batch-32 requests have used the bucket, while its batch-1 requests still fit."""
    with SimFleetThread([WorkerSpec(slots=1, base_ms=BASE_MS, per_item_ms=PER_ITEM_MS)]) as sims:
        config: dict[str, Any] = {
            "workers": [{"url": f"http://{sims.urls[0]}"}],
            "admission": {"tenants": {"metered": {
                "keys": ["metered-key"],
                # ~2 batch-32 requests (18 ms each) per burst, refilled over ~7 minutes
                "gpu_rate_limit": {"rate_per_s": 0.0001, "burst": 0.04}}}},
        }
        with GatewayProcess(config, Path(tmp_path_factory.mktemp("quota-e2e"))) as gw:
            gw.wait_workers_ready(1)
            url = f"{gw.url}/v2/models/simple/infer"
            statuses = [post(url, body(32), "metered-key")[0] for _ in range(6)]
            assert statuses[0] == 200 and 429 in statuses, statuses
            request = urllib.request.Request(url, body(32), {
                "Content-Type": "application/json", "X-Api-Key": "metered-key"},
                method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            refused = info.value
            assert refused.code == 429 and float(refused.headers["Retry-After"]) >= 1
            assert "tenant:metered:gpu_s" in json.loads(refused.read())["error"]


def test_gateway_made_batches_are_charged_to_their_members_tenants(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With gateway batching on, two tenants' batch-1 requests share merged batches: each
    batch's GPU time goes to the members' tenants by their rows (here about half each),
    none of it to an anonymous account."""
    with SimFleetThread([WorkerSpec(slots=1, base_ms=BASE_MS, per_item_ms=PER_ITEM_MS)]) as sims:
        config: dict[str, Any] = {
            "workers": [{"url": f"http://{sims.urls[0]}"}],
            "batching": {"enabled": True, "max_delay_ms": 2},
            "admission": {"tenants": {"a": {"keys": ["a-key"]}, "b": {"keys": ["b-key"]}}},
            "admin": {"token": ADMIN_TOKEN},
        }
        with GatewayProcess(config, Path(tmp_path_factory.mktemp("batch-fair"))) as gw:
            gw.wait_workers_ready(1)
            url = f"{gw.url}/v2/models/simple/infer"
            results: list[int] = []

            def caller(key: str) -> None:
                for _ in range(30):
                    results.append(post(url, body(1), key)[0])

            threads = [threading.Thread(target=caller, args=(k,))
                       for k in ("a-key", "b-key") * 6]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(results) == {200} and len(results) == 360
            request = urllib.request.Request(f"{gw.url}/status.json",
                                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                doc = json.loads(resp.read())
            gpu = {t["tenant"]: t["gpu_s"] for t in doc["fair_share"]["tenants"]}
            assert gpu.get("a", 0) > 0 and gpu.get("b", 0) > 0, gpu
            assert gpu.get("(anonymous)", 0.0) == 0.0 and set(gpu) == {"a", "b"}, gpu
            assert 0.5 < gpu["a"] / gpu["b"] < 2.0, gpu
            with urllib.request.urlopen(f"{gw.url}/metrics", timeout=10) as resp:
                page = resp.read().decode()
            def total(name: str) -> float:
                return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                           if line.startswith(name + "{") or line.startswith(name + " "))

            batches = total("gateway_batch_size_count")
            assert batches > 0 and total("gateway_batch_size_sum") / batches > 1.2, page
