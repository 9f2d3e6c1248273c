"""A real Prometheus server scraping a running gateway and evaluating config/prometheus/rules.yml.

Debian's ``prometheus`` binary on a free loopback port, a temporary config scraping the
gateway every second and loading the project's rules (a copy with the evaluation interval cut
to one second — nothing else changed); after traffic, Prometheus' HTTP API is queried for raw
gateway series and for recording rules' outputs, the autoscalers' signal
``gateway:desired_replicas:max`` included.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.sim.server import SimFleetThread
from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port, http_get
from tests.test_metrics_e2e import (
    SLOTS,
    WORKERS,
    Load,
    infer,
    running_gateway,
    sim_fleet,
)
from tests.tools import require_tool

ROOT = Path(__file__).parent.parent
RULES = ROOT / "config" / "prometheus" / "rules.yml"
START_TIMEOUT_S = 30.0

pytestmark = pytest.mark.tool("prometheus")


class PrometheusServer:
    """``prometheus`` with a generated config, on a free port, storage in ``workdir``."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"   # the shipped 15 s would make this test slow
        (workdir / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": ["rules.yml"],
            "scrape_configs": [{"job_name": "gateway", "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        prometheus = require_tool("prometheus")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [prometheus, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if http_get(self.url + "/-/ready", timeout_s=1.0)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready in {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        procs.stop(self.proc, 10)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (metric labels + value)."""
        status, body = http_get(f"{self.url}/api/v1/query?"
                                + urllib.parse.urlencode({"query": promql}))
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", doc
        assert doc["data"]["resultType"] == "vector", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of ``promql``, None when the vector is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_value(self, promql: str, predicate: Callable[[float], bool], timeout_s: float
                   ) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.value(promql)
            if got is not None and predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} = {got} after {timeout_s} s\n{self.log()}")
            time.sleep(0.5)

    def rules_health(self) -> list[tuple[str, str, str]]:
        status, body = http_get(self.url + "/api/v1/rules")
        assert status == 200
        groups = json.loads(body)["data"]["groups"]
        return [(r["name"], r["health"], r.get("lastError", "")) for g in groups
                for r in g["rules"]]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimFleetThread]:
    with sim_fleet() as running:
        yield running


@pytest.fixture(scope="module")
def gateway(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    with running_gateway(sim, tmp_path_factory.mktemp("prom-gw")) as gw:
        yield gw


@pytest.fixture(scope="module")
def prometheus(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [gateway.hostport])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_prometheus_scrapes_gateway_and_records_rules(gateway: GatewayProcess,
                                                      prometheus: PrometheusServer) -> None:
    prometheus.wait_value('up{job="gateway"}', lambda v: v == 1, 15)
    # known models' counters are exported at 0 before traffic, so rate() sees the first burst
    prometheus.wait_value('gateway_rejections_total{model="limited",reason="rate_limited"}',
                          lambda v: v == 0, 15)
    ok = [infer(gateway.url, "simple") for _ in range(10)]
    limited = [infer(gateway.url, "limited") for _ in range(6)]
    assert ok == [200] * 10 and limited.count(429) >= 2
    rejected = limited.count(429)

    # raw series, as scraped
    prometheus.wait_value('gateway_requests_total{model="simple",outcome="ok"}',
                          lambda v: v == 10, 15)
    prometheus.wait_value('gateway_rejections_total{model="limited",reason="rate_limited"}',
                          lambda v: v == rejected, 15)
    assert prometheus.value('sum(gateway_worker_slots)') == WORKERS * SLOTS
    assert prometheus.value(
        'gateway_request_duration_seconds_count{model="simple"}') == 10

    # recording rules, evaluated by Prometheus from the scraped series
    prometheus.wait_value('gateway:requests:rate1m{model="simple",outcome="ok"}',
                          lambda v: v > 0, 20)
    prometheus.wait_value('gateway:rejections:rate1m{model="limited",reason="rate_limited"}',
                          lambda v: v > 0, 20)
    prometheus.wait_value('gateway:rejection_ratio:rate5m{model="limited"}',
                          lambda v: 0 < v <= 1, 20)
    assert prometheus.wait_value("gateway:workers_ready:count", lambda v: True, 10) == WORKERS
    p99 = prometheus.wait_value('gateway:request_duration_seconds:p99_5m{model="simple"}',
                                lambda v: v > 0, 20)
    assert 0.1 < p99 <= 1.0   # 250 ms simulated service time, 0.25–0.5 s bucket
    headroom = prometheus.wait_value("gateway:fleet_headroom:min1m", lambda v: True, 10)
    assert headroom <= 1
    idle = prometheus.wait_value('gateway:desired_replicas:max{mode="reactive"}',
                                 lambda v: True, 10)
    assert 1 <= idle <= 2
    unhealthy = [r for r in prometheus.rules_health() if r[1] == "err"]
    assert not unhealthy, unhealthy


def test_autoscaler_query_sees_reactive_scale_out(gateway: GatewayProcess,
                                                  prometheus: PrometheusServer) -> None:
    """What KEDA/HPA read (the recording rule over gateway_desired_replicas) follows the
    worked example: two workers at ~100 % utilisation, target 0.7, N+1 → 4."""
    with Load(gateway.url, "simple", clients=3 * WORKERS * SLOTS, max_s=40) as load:
        reactive = prometheus.wait_value('gateway:desired_replicas:max{mode="reactive"}',
                                          lambda v: v == 4, 30)
        predictive = prometheus.wait_value('gateway:desired_replicas:max{mode="predictive"}',
                                           lambda v: v >= 2, 10)
        utilisation = prometheus.wait_value("gateway:fleet_utilisation:avg1m",
                                            lambda v: v > 0.3, 10)
    assert load.statuses and set(load.statuses) == {200}
    assert reactive == 4 and 2 <= predictive <= 5 and utilisation <= 1
    print(f"\nPrometheus: reactive {reactive:g}, predictive {predictive:g}, "
          f"utilisation avg1m {utilisation:.2f}")
