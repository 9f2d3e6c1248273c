"""/status of the real gateway (a subprocess) in front of a loaded mixed fleet — two real
Triton servers (CPU, no GPU) and two simulated GPU workers, one of them failing every
request — rendered by headless Chromium: what a person sees after some traffic, rate-limit
rejections and an opened breaker."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.sim.core import Faults, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.local import TritonFleet
from tests.conftest import fleet_config
from tests.test_status_page import CHROMIUM, chromium, parse

pytestmark = pytest.mark.tool(*CHROMIUM)

TENANT_KEY = "e2e-acme-key"
ADD_SUB = {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
                      for n in ("INPUT0", "INPUT1")]}
SIMPLE = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                      "data": [1.0] * 16}]}


def post(url: str, body: dict[str, Any], key: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


@pytest.fixture(scope="module")
def loaded(triton_fleet: TritonFleet, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[GatewayProcess, list[str], dict[int, int]]]:
    specs = [WorkerSpec(memory_total_bytes=24 * 1024**3),
             WorkerSpec(faults=Faults(error_rate=1.0))]
    with SimFleetThread(specs) as sims:
        workers: list[dict[str, Any]] = [
            {"url": w.http_url, "metrics_url": w.metrics_url, "name": w.name}
            for w in triton_fleet.workers]
        workers += [{"url": f"http://{u}", "metrics_url": f"http://{u}/metrics",
                     "name": f"sim-{i}", "pool": "sim"} for i, u in enumerate(sims.urls)]
        config = fleet_config(triton_fleet, workers=workers, admission={
            "tenants": {"acme": {"keys": [TENANT_KEY],
                                 "rate_limit": {"rate_per_s": 2.0, "burst": 4.0}}},
            "global_limit": {"rate_per_s": 500.0, "burst": 200.0},
            "breaker": {"consecutive_failures": 3, "open_s": 60.0, "max_ejected_fraction": 0.5},
        })
        gw = GatewayProcess(config, Path(tmp_path_factory.mktemp("status-e2e")))
        gw.start()
        try:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 4, timeout_s=30,
                        what="all four workers ready")
            ids = [w["id"] for w in gw.status()["workers"]]
            codes: dict[int, int] = {}
            with ThreadPoolExecutor(8) as pool:
                jobs = [pool.submit(post, f"{gw.url}/v2/models/simple/infer", SIMPLE)
                        for _ in range(30)]
                jobs += [pool.submit(post, f"{gw.url}/v2/models/add_sub/infer", ADD_SUB)
                         for _ in range(40)]
                jobs += [pool.submit(post, f"{gw.url}/v2/models/add_sub/infer", ADD_SUB,
                                     TENANT_KEY) for _ in range(20)]
                for job in jobs:
                    code = job.result()
                    codes[code] = codes.get(code, 0) + 1
            yield gw, ids, codes
        finally:
            gw.stop()


def test_traffic_was_served_and_shed(loaded: tuple[GatewayProcess, list[str], dict[int, int]],
                                     ) -> None:
    gw, _, codes = loaded
    assert codes.get(200, 0) >= 40 and codes.get(429, 0) >= 10, codes
    status = gw.status()
    breakers = {w["id"]: w["breaker"] for w in status["workers"]}
    assert sorted(breakers.values()).count("closed") == 3, breakers
    # Read without the admin token: tenant names are hidden (test_logs_exposure has both).
    assert {row["name"] for row in status["limits"]} == {"global", "tenant:(hidden)"}


def test_status_page_shows_the_live_fleet(
        loaded: tuple[GatewayProcess, list[str], dict[int, int]]) -> None:
    gw, ids, _ = loaded
    dom = chromium(gw.url + "/status", "--dump-dom")
    page = parse(dom)
    head, *rows = page.rows["workers"]
    assert head[:4] == ["Worker", "Pool", "State", "Breaker"]
    status = {w["id"]: w for w in gw.status()["workers"]}
    # The cell shows the id, then the configured name beneath it.
    shown = {wid + (status[wid]["name"] if status[wid]["name"] != wid else ""): wid
             for wid in ids}
    by_id = {shown[row[0]]: dict(zip(head, row, strict=True)) for row in rows}
    assert set(by_id) == set(ids)
    triton = [by_id[i] for i in ids if status[i]["pool"] == "default"]
    sims = [by_id[i] for i in ids if status[i]["pool"] == "sim"]
    assert len(triton) == 2 and len(sims) == 2
    assert all(row["GPU memory free / total"] == "no GPU" for row in triton)
    assert all(row["Breaker"] == "closed" for row in triton)
    assert all("add_sub" in row["Models"] for row in triton)
    assert sorted(row["Breaker"] for row in sims) == ["closed", "open"]
    healthy = next(row for row in sims if row["Breaker"] == "closed")
    assert healthy["GPU memory free / total"].endswith("/ 24.0 GiB")
    assert "simple" in healthy["Models"]
    head, *limits = page.rows["limits"]
    assert head == ["Name", "Scope", "Rate", "Burst", "Available tokens"]
    assert [row[:4] for row in limits] == [["global", "local", "500 /s", "200"],
                                           ["tenant:(hidden)", "local", "2.0 /s", "4"]]
    head, *rejections = page.rows["rejections"]
    assert head == ["Time", "Model", "Reason", "Status"]
    assert rejections and all(r[1:] == ["add_sub", "rate_limited", "429"] for r in rejections)
    text = page.text()
    assert "Workers ready 4 / 4" in text and "gateway unreachable" not in text


def test_screenshot_of_the_live_page(
        loaded: tuple[GatewayProcess, list[str], dict[int, int]], tmp_path: Path) -> None:
    """A screenshot of the real page for a person to look at (/tmp/status-e2e.png)."""
    gw, _, _ = loaded
    shot = tmp_path / "status.png"
    chromium(gw.url + "/status", f"--screenshot={shot}", "--window-size=1400,900",
             "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000
    shutil.copy(shot, Path(tempfile.gettempdir()) / "status-e2e.png")
