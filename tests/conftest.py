"""Shared fixtures: a real Triton fleet (nvidia-pytriton) and gateways in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.local import TritonFleet
from tests.tools import require_tool

MODELS = ("add_sub", "strings", "identity", "overhead")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tool(*names): needs one of these programs; fails (never skips) without it")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a test marked ``tool`` before its fixtures start fleets it could not use."""
    for mark in item.iter_markers("tool"):
        require_tool(*mark.args)


@pytest.fixture(scope="session")
def triton_fleet() -> Iterator[TritonFleet]:
    """Two real Triton servers (CPU, pytriton) shared by the whole session."""
    fleet = TritonFleet(2, service_times_ms=[1.0, 2.0])
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def fleet_config(fleet: TritonFleet, **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "workers": [{"url": w.http_url, "metrics_url": w.metrics_url} for w in fleet.workers],
        "models": {m: {} for m in MODELS},
        "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
        "scrape": {"interval_s": 0.5},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="session")
def triton_gateway(triton_fleet: TritonFleet,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway in front of the shared fleet (do not kill workers through this one)."""
    gw = GatewayProcess(fleet_config(triton_fleet), Path(tmp_path_factory.mktemp("gw")))
    gw.start()
    gw.wait_workers_ready(2)
    try:
        yield gw
    finally:
        gw.stop()
