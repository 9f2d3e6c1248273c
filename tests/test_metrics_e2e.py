"""The gateway's /metrics end to end: a real gateway subprocess in front of the simulator.
(And ``gateway plan --from-locust`` on a real Locust run through the same gateway.)

Traffic of every kind (served, rate-limited, batched, queued, 404s with random model names),
then the exposition is parsed with prometheus-client's own parser and checked: per-worker
gauges against what the simulated GPUs report, per-model counters by outcome and reason,
histograms, fleet gauges, bounded label values, and the desired-replica signals — the HPA
worked example included: two workers pushed to ~100 % utilisation with a 0.7 target and N+1
ask for ceil(2 × 1.0 / 0.7) + 1 = 4 replicas.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.sim.core import GIB, SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess, http_get
from tests.test_scaling_config import GATEWAY_HISTOGRAMS, GATEWAY_METRICS

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # loadtest/ is not an installed package
    sys.path.insert(0, str(ROOT))

from loadtest.run import run_locust, summarise  # noqa: E402

SERVICE_MS = 250.0          # slow workers: a few clients fill every slot
SLOTS = 4
WORKERS = 2
TARGET = 0.7
MEMORY_TOTAL = 16 * GIB
MEMORY_BASE_USED = 2 * GIB
SIM_MODELS = (SimModel(name="simple"), SimModel(name="limited"), SimModel(name="batched"))
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [1.0] * 16}]}).encode()


# --- helpers (also used by test_prometheus_e2e) ---------------------------------------------


def sim_fleet(workers: int = WORKERS, service_ms: float = SERVICE_MS) -> SimFleetThread:
    spec = WorkerSpec(slots=SLOTS, base_ms=service_ms, per_item_ms=0.0,
                      memory_total_bytes=MEMORY_TOTAL, memory_base_used_bytes=MEMORY_BASE_USED,
                      models=SIM_MODELS)
    return SimFleetThread([spec] * workers)


def gateway_config(sim: SimFleetThread, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "workers": [{"url": f"http://127.0.0.1:{port}",
                     "metrics_url": f"http://127.0.0.1:{port}/metrics", "slots": SLOTS}
                    for port in sim.ports],
        "models": {
            "simple": {},
            "limited": {"rate_limit": {"rate_per_s": 1, "burst": 2}},
            "batched": {"batching": {"enabled": True, "max_delay_ms": 50}},
        },
        "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
        "scrape": {"interval_s": 0.5},
        "capacity": {"target_utilisation": TARGET, "redundancy": 1, "lead_time_s": 5,
                     "history_step_s": 1, "min_replicas": 1},
    }
    cfg.update(extra)
    return cfg


def infer(base_url: str, model: str, timeout_s: float = 10.0,
          headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(f"{base_url}/v2/models/{model}/infer", data=BODY,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def scrape(base_url: str) -> list[Sample]:
    status, body = http_get(base_url + "/metrics")
    assert status == 200
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    return [s.value for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def one(samples: list[Sample], name: str, **labels: str) -> float:
    found = values(samples, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


class Load:
    """``clients`` closed-loop clients sending ``model`` requests until stopped (bounded)."""

    def __init__(self, base_url: str, model: str, clients: int, max_s: float = 60.0) -> None:
        self.base_url, self.model, self.clients, self.max_s = base_url, model, clients, max_s
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self._pool = ThreadPoolExecutor(clients)

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(infer(self.base_url, self.model))
            except OSError:
                self.statuses.append(0)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            self._pool.submit(self._client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self._pool.shutdown(wait=True)


def wait_metrics(gw: GatewayProcess, predicate: Callable[[list[Sample]], bool],
                 timeout_s: float, what: str) -> list[Sample]:
    deadline = time.monotonic() + timeout_s
    samples = scrape(gw.url)
    while not predicate(samples):
        if time.monotonic() > deadline:
            desired = [(s.labels, s.value) for s in samples
                       if s.name.startswith(("gateway_desired", "gateway_fleet"))]
            raise AssertionError(f"timed out waiting for {what}; {desired}\n{gw.log()}")
        time.sleep(0.5)
        samples = scrape(gw.url)
    return samples


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimFleetThread]:
    with sim_fleet() as running:
        yield running


@contextlib.contextmanager
def running_gateway(sim: SimFleetThread, workdir: Path) -> Iterator[GatewayProcess]:
    """The gateway in front of ``sim``, once every worker is ready (shared with the
    Prometheus test)."""
    gw = GatewayProcess(gateway_config(sim), workdir)
    gw.start()
    try:
        gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == WORKERS,
                    what="both workers ready")
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def gateway(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    with running_gateway(sim, Path(tmp_path_factory.mktemp("metrics"))) as gw:
        yield gw


# --- tests --------------------------------------------------------------------------------


def test_metrics_after_mixed_traffic(gateway: GatewayProcess) -> None:
    url = gateway.url
    ok = [infer(url, "simple") for _ in range(6)]
    assert ok == [200] * 6
    limited = [infer(url, "limited") for _ in range(8)]  # burst 2, 1/s: most are refused
    assert limited.count(429) >= 4 and 200 in limited
    with ThreadPoolExecutor(8) as pool:   # concurrent: merged into gateway batches
        batched = list(pool.map(lambda _: infer(url, "batched"), range(8)))
    assert batched == [200] * 8
    random_names = [f"m-{uuid.uuid4().hex}" for _ in range(40)]
    assert {infer(url, name) for name in random_names} == {404}

    samples = wait_metrics(  # state is sampled once a second, GPU memory scraped from workers
        gateway, lambda s: len(values(s, "gateway_worker_gpu_total_bytes")) == WORKERS
        and len(values(s, "gateway_desired_replicas", model="batched")) == 2,
        timeout_s=10, what="GPU memory gauges and desired replicas")

    # every exported name is one the rules and dashboards know, and all of them are there
    exported = {s.name for s in samples}
    histogram_series = {f"{h}_{x}" for h in GATEWAY_HISTOGRAMS for x in ("bucket", "sum",
                                                                         "count")}
    assert exported <= GATEWAY_METRICS | histogram_series, exported - GATEWAY_METRICS
    assert exported >= GATEWAY_METRICS - {"gateway_batch_fill_ratio"} | {
        "gateway_request_duration_seconds_count", "gateway_upstream_duration_seconds_count",
        "gateway_batch_size_count"}

    # label cardinality: random model names all land in one "_other" series
    models = {s.labels["model"] for s in samples if "model" in s.labels}
    assert models <= {"simple", "limited", "batched", "_other"}, models
    assert one(samples, "gateway_requests_total", model="_other",
               outcome="client_error") == len(random_names)
    assert not any(name in s.labels.values() for s in samples for name in random_names)

    # per worker
    workers = {s.labels["worker"] for s in samples if "worker" in s.labels}
    assert len(workers) == WORKERS
    for w in workers:
        total = one(samples, "gateway_worker_gpu_total_bytes", worker=w)
        free = one(samples, "gateway_worker_gpu_free_bytes", worker=w)
        assert total == MEMORY_TOTAL
        assert 0 < free <= MEMORY_TOTAL - MEMORY_BASE_USED
        assert one(samples, "gateway_worker_slots", worker=w) == SLOTS
        assert one(samples, "gateway_worker_in_flight", worker=w) == 0
        assert one(samples, "gateway_worker_utilisation", worker=w) == 0.0
        assert one(samples, "gateway_worker_pending", worker=w) >= 0
        assert one(samples, "gateway_worker_breaker_state", worker=w) == 0  # closed
        assert one(samples, "gateway_worker_ready", worker=w) == 1

    # per model: outcomes, reasons, histograms
    assert one(samples, "gateway_requests_total", model="simple", outcome="ok") == 6
    n_429 = limited.count(429)
    assert one(samples, "gateway_requests_total", model="limited", outcome="rejected") == n_429
    assert one(samples, "gateway_rejections_total", model="limited",
               reason="rate_limited") == n_429
    assert one(samples, "gateway_requests_total", model="batched", outcome="ok") == 8
    for hist in ("gateway_request_duration_seconds", "gateway_upstream_duration_seconds"):
        assert one(samples, f"{hist}_count", model="simple") == 6
        # every request took at least the workers' service time
        assert one(samples, f"{hist}_sum", model="simple") >= 6 * SERVICE_MS / 1000 * 0.9
        assert one(samples, f"{hist}_bucket", model="simple", le="+Inf") == 6
        assert one(samples, f"{hist}_bucket", model="simple", le="0.1") == 0
    members = one(samples, "gateway_batch_size_sum", model="batched")
    batches = one(samples, "gateway_batch_size_count", model="batched")
    assert members == 8 and 1 <= batches < 8   # at least two requests shared a batch
    assert 0 < one(samples, "gateway_batch_fill_ratio", model="batched") <= 1

    # fleet and capacity signals: idle now
    assert one(samples, "gateway_queue_length") == 0
    assert 0 <= one(samples, "gateway_fleet_utilisation") < TARGET
    assert 0 < one(samples, "gateway_fleet_headroom") <= 1
    assert 0 <= one(samples, "gateway_fleet_saturation") <= 1
    assert one(samples, "gateway_arrival_rate_per_s", model="simple") > 0
    for model in ("simple", "limited", "batched"):
        for mode in ("reactive", "predictive"):
            assert 1 <= one(samples, "gateway_desired_replicas", model=model, mode=mode) <= 3


def test_desired_replicas_follow_utilisation(gateway: GatewayProcess) -> None:
    """HPA worked example through the live gateway: 2 workers at ~100 % of their slots, target
    0.7, N+1 → ceil(2 × 1.0 / 0.7) + 1 = 4; back to ≤ 2 once the load is gone."""
    def desired(s: list[Sample], mode: str) -> float:
        found = values(s, "gateway_desired_replicas", model="simple", mode=mode)
        return found[0] if found else -1.0

    wait_metrics(gateway, lambda s: 0 < desired(s, "reactive") <= 2, 20, "idle reactive ≤ 2")
    # 4 clients per slot-pair: every slot busy all the time, the rest queued at the gateway
    with Load(gateway.url, "simple", clients=3 * WORKERS * SLOTS) as load:
        busy = wait_metrics(gateway, lambda s: desired(s, "reactive") == 4, 30,
                            "reactive desired replicas 4")
        time.sleep(3.0)   # a few more seconds at full load for the throughput window
        busy = scrape(gateway.url)
    assert load.statuses and set(load.statuses) == {200}
    assert desired(busy, "reactive") == 4
    predictive = desired(busy, "predictive")
    # per-replica throughput is slots / service time = 16/s; the fleet serves ~32/s, so the
    # forecast over it at 0.7 plus one spare is 3–4; early in the run the decayed arrival
    # rate is still catching up (never more than the reactive answer by more than one)
    assert 2 <= predictive <= 5, predictive
    assert one(busy, "gateway_fleet_utilisation") > TARGET
    assert one(busy, "gateway_fleet_headroom") < 0
    assert one(busy, "gateway_fleet_saturation") > 0
    for w in {s.labels["worker"] for s in busy if "worker" in s.labels}:
        assert one(busy, "gateway_worker_utilisation", worker=w) >= 0.5
    queued = one(busy, "gateway_queue_wait_seconds_count", model="simple")
    assert queued > 0 and one(busy, "gateway_queue_wait_seconds_sum", model="simple") > 0

    after = wait_metrics(
        gateway, lambda s: one(s, "gateway_queue_length") == 0
        and sum(values(s, "gateway_worker_in_flight")) == 0
        and 0 < desired(s, "reactive") <= 2, 20, "queue drained and reactive back down")
    assert one(after, "gateway_fleet_utilisation") < TARGET
    print(f"\nreactive under load 4, predictive {predictive:g}; after load: reactive "
          f"{desired(after, 'reactive'):g}, predictive {desired(after, 'predictive'):g}")


def test_queue_timeouts_leave_no_ghost_waiters(sim: SimFleetThread, tmp_path: Path) -> None:
    """Requests that time out in the gateway's queue leave it: the queue-length gauge returns
    to 0, each wait is observed once, and saturation stops accruing once slots free up."""
    cfg = gateway_config(sim, admission={"queue": {"max_wait_s": 0.1}})  # < service time
    with GatewayProcess(cfg, tmp_path) as gw:
        gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == WORKERS,
                    what="both workers ready")
        clients = 3 * WORKERS * SLOTS
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(lambda _: infer(gw.url, "simple"), range(clients)))
        served = statuses.count(200)
        assert served >= WORKERS * SLOTS and set(statuses) <= {200, 503}, statuses
        timed_out = clients - served
        after = wait_metrics(gw, lambda s: one(s, "gateway_queue_length") == 0
                             and sum(values(s, "gateway_worker_in_flight")) == 0
                             and len(values(s, "gateway_queue_wait_seconds_count")) == 1
                             and one(s, "gateway_fleet_saturation") > 0, 10,
                             "empty queue and saturation sampled")
        assert one(after, "gateway_queue_wait_seconds_count", model="simple") == timed_out
        assert one(after, "gateway_queue_wait_seconds_sum", model="simple") >= 0.09 * timed_out
        assert one(after, "gateway_rejections_total", model="simple",
                   reason="overloaded") == timed_out
        saturation = one(after, "gateway_fleet_saturation")  # ~0.25 s queued in ~1 s
        assert 0 < saturation < 0.6
        time.sleep(2.5)
        assert one(scrape(gw.url), "gateway_fleet_saturation") <= saturation + 1e-6


def test_plan_from_a_real_locust_run(gateway: GatewayProcess, tmp_path: Path) -> None:
    """A headless Locust step run (4 → 16 users, no think time) through the gateway in front
    of 2 × 4 slots at 250 ms (32 requests/s at most), then ``gateway plan --from-locust`` on
    its history CSV: the knee is below that ceiling, and the GPU count follows from it."""
    outputs = run_locust(gateway.url, shape="step", duration_s=20, users=16, spawn_rate=16,
                         out=tmp_path / "locust", quiet=True,
                         extra=("--models", "simple=1", "--think-time-s", "0",
                                "--csv-full-history"))
    assert outputs.returncode == 0 and summarise(outputs).successes > 100
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "plan", "--peak-rps", "1000", "--from-locust",
         str(outputs.history_csv), "--p99-budget-ms", "400", "--overhead", "0.2",
         "--gpu-hour-cost", "2", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    knee = plan["knee"]
    capacity_rps = WORKERS * SLOTS / (SERVICE_MS / 1000)
    assert len(plan["points"]) >= 3
    assert 0.4 * capacity_rps <= knee["throughput_rps"] <= 1.1 * capacity_rps, plan["points"]
    assert knee["p99_ms"] <= 400
    assert plan["gpus"] == math.ceil(1000 / plan["inputs"]["instance_rps"] * 1.2 - 1e-9)
    assert plan["cost_per_hour"] == 2 * plan["gpus"]
    print(f"\nLocust knee {knee['throughput_rps']:.1f} req/s at p99 {knee['p99_ms']:.0f} ms "
          f"(points {[(round(p['throughput_rps'], 1), p['p99_ms']) for p in plan['points']]})"
          f" → {plan['gpus']} instances for 1000 req/s, ${plan['cost_per_hour']:.0f}/h")
