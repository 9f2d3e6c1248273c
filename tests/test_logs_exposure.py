"""Who sees the gateway's own pages, and what its logs tell an operator: a real gateway
subprocess in front of the simulator.

* ``admin.listen``: /metrics, /status, /status.json and /admin/* only on the admin port, the
  inference port answers Triton's 404 JSON for them;
* ``admin.protect_status``: the pages need the admin token (Bearer, or Basic for browsers);
* /status.json names tenants only to the admin;
* the access log: JSON lines with every field; 2,000 bad requests leave a bounded number of
  lines, and the summaries account for every one left out;
* a breaker opening and a worker going down are logged with their reason;
* SIGTERM logs the drain: how many in flight, and done or timed out.

Plus the pure parts: :class:`~gateway.ops.accesslog.LineBudget` on a fake clock, and the breaker's
transition records.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.breaker import BreakerBoard, BreakerState
from gateway.core.config import AccessLogConfig, BreakerConfig, parse_config
from gateway.core.schema import ConfigError
from gateway.ops.accesslog import AccessLog, LineBudget
from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess, free_port

pytestmark = pytest.mark.timeout(120)

TOKEN = "admin-secret-token"
TENANT_KEY = "acme-key-123"
INFER = "/v2/models/simple/infer"
BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": [1.0] * 16}]}).encode()
PAGES = ("/metrics", "/status", "/status.json", "/admin/workers", "/admin/reload")
ACCESS_FIELDS = {"time", "rid", "tenant", "model", "worker", "status", "latency_ms",
                 "queue_ms", "reason"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()}


def base_config(sim: SimFleetThread, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "workers": [{"url": f"http://{u}", "metrics_url": f"http://{u}/metrics"}
                    for u in sim.urls],
        "models": {"simple": {}},
        "health": {"interval_s": 0.2, "rise": 1, "fall": 2, "timeout_s": 0.5},
        "scrape": {"interval_s": 0.5},
        "admission": {"tenants": {"acme": {"keys": [TENANT_KEY],
                                           "rate_limit": {"rate_per_s": 1.0, "burst": 2.0}}}},
    }
    cfg.update(extra)
    return cfg


def log_text(gw: GatewayProcess) -> str:
    return gw.log_path.read_text(errors="replace")


def wait_log(gw: GatewayProcess, needle: str, timeout_s: float = 15.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_text(gw)
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the log:\n{log_text(gw)[-4000:]}")


def access_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimFleetThread]:
    with SimFleetThread([WorkerSpec(base_ms=1.0)] * 2) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def locked(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[GatewayProcess, int, Path]]:
    """Admin pages on their own port, protected; access log to a file."""
    workdir = tmp_path_factory.mktemp("locked")
    admin_port = free_port()
    access = workdir / "access.jsonl"
    gw = GatewayProcess(base_config(
        sim, admin={"token": TOKEN, "listen": {"host": "127.0.0.1", "port": admin_port},
                    "protect_status": True},
        access_log={"enabled": True, "path": str(access), "max_error_lines_per_s": 20}),
        workdir)
    with gw:
        yield gw, admin_port, access


@pytest.fixture(scope="module")
def open_gw(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    """Pages on the inference port, not protected; access log on the gateway's own log."""
    gw = GatewayProcess(base_config(sim, admin={"token": TOKEN},
                                    access_log={"enabled": True}),
                        tmp_path_factory.mktemp("open"))
    with gw:
        yield gw


# --- exposure -------------------------------------------------------------------------------


def test_admin_listener_serves_the_pages_and_the_inference_port_hides_them(
        locked: tuple[GatewayProcess, int, Path]) -> None:
    gw, admin_port, _ = locked
    admin = f"http://127.0.0.1:{admin_port}"
    for path in PAGES:
        r = httpx.get(gw.url + path, headers=BEARER, timeout=5)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json() == {"error": "Not Found"}
        assert r.headers["content-type"] == "application/json"
    r = httpx.get(admin + "/metrics", headers=BEARER, timeout=5)
    assert r.status_code == 200 and "gateway_requests_total" in r.text
    assert httpx.get(admin + "/status.json", headers=BEARER, timeout=5).json()["workers"]
    assert httpx.get(admin + "/admin/workers", headers=BEARER, timeout=5).status_code == 200
    # The admin port is not an inference port, and its own 404s are Triton's JSON too.
    r = httpx.post(admin + INFER, content=BODY, timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    # Inference is where it was.
    assert httpx.post(gw.url + INFER, content=BODY, timeout=5).status_code == 200


def test_protected_pages_need_the_admin_token(
        locked: tuple[GatewayProcess, int, Path]) -> None:
    _, admin_port, _ = locked
    admin = f"http://127.0.0.1:{admin_port}"
    for path in ("/metrics", "/status", "/status.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, basic("wrong"),
                        {"Authorization": f"Bearer {TENANT_KEY}"}):
            r = httpx.get(admin + path, headers=headers, timeout=5)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert "error" in r.json()
            assert r.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(admin + path, headers=BEARER, timeout=5).status_code == 200
        assert httpx.get(admin + path, headers=basic(TOKEN), timeout=5).status_code == 200


def test_status_json_names_tenants_only_to_the_admin(open_gw: GatewayProcess) -> None:
    gw = open_gw
    codes = [httpx.post(gw.url + INFER, content=BODY, headers={"X-Api-Key": TENANT_KEY},
                        timeout=5).status_code for _ in range(6)]
    assert 429 in codes, codes   # rate_per_s 1, burst 2: the tenant is refused
    anonymous = httpx.get(gw.url + "/status.json", timeout=5).json()
    admin = httpx.get(gw.url + "/status.json", headers=BEARER, timeout=5).json()
    assert "acme" not in json.dumps(anonymous)
    assert "tenant:(hidden)" in {row["name"] for row in anonymous["limits"]}
    assert {r.get("tenant") for r in anonymous["rejections"]
            if r["reason"] == "rate_limited"} == {"(hidden)"}
    assert "tenant:acme" in {row["name"] for row in admin["limits"]}
    assert {r.get("tenant") for r in admin["rejections"]
            if r["reason"] == "rate_limited"} == {"acme"}
    # Unprotected pages stay open to everyone.
    assert httpx.get(gw.url + "/metrics", timeout=5).status_code == 200


def test_config_rules_for_the_admin_section() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"workers": [{"url": "http://127.0.0.1:9000"}],
                      "admin": {"protect_status": True}})
    assert info.value.path == "admin.protect_status"
    with pytest.raises(ConfigError) as info:
        parse_config({"workers": [{"url": "http://127.0.0.1:9000"}], "listen": {"port": 8000},
                      "admin": {"listen": {"port": 8000}}})
    assert info.value.path == "admin.listen.port"
    cfg = parse_config({"workers": [{"url": "http://127.0.0.1:9000"}],
                        "admin": {"listen": {"port": 9100}}})
    assert cfg.admin.listen is not None and cfg.admin.listen.host == "127.0.0.1"


# --- the access log -------------------------------------------------------------------------


def test_access_log_lines_are_json_with_every_field(
        locked: tuple[GatewayProcess, int, Path]) -> None:
    gw, _, path = locked
    sent = {"ok-1": ({"X-Api-Key": TENANT_KEY}, INFER),
            "nomodel-1": ({}, "/v2/models/no_such_model/infer"),
            "bad-1": ({"X-Request-Timeout-Ms": "soon"}, INFER)}
    for rid, (headers, target) in sent.items():
        httpx.post(gw.url + target, content=BODY, headers={**headers, "X-Request-Id": rid},
                   timeout=5)
    deadline = time.monotonic() + 5
    by_rid: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and not set(sent) <= set(by_rid):
        time.sleep(0.2)   # lines are flushed once a second
        by_rid = {line["rid"]: line for line in access_lines(path) if line.get("rid")}
    assert set(sent) <= set(by_rid), by_rid
    for line in by_rid.values():
        assert set(line) >= ACCESS_FIELDS, line
        assert line["time"].endswith("Z")
    ok = by_rid["ok-1"]
    assert ok["status"] == 200 and ok["tenant"] == "acme" and ok["model"] == "simple"
    assert ok["worker"] in {w["url"].removeprefix("http://") for w in gw.config["workers"]}
    assert ok["latency_ms"] > 0 and ok["queue_ms"] >= 0 and ok["reason"] is None
    assert by_rid["nomodel-1"]["status"] == 404
    assert by_rid["nomodel-1"]["model"] == "no_such_model"
    assert by_rid["nomodel-1"]["reason"] == "not_found"
    assert by_rid["bad-1"]["status"] == 400 and by_rid["bad-1"]["reason"] == "bad_request"


def test_every_answer_writes_one_line_with_its_latency(
        locked: tuple[GatewayProcess, int, Path]) -> None:
    """Refused by the proxy (404, 400, 431 for too many fields) or by the connection layer
    (431 for a head past every bound, 400 for a malformed request): one line each, with
    its latency, never ``null``."""
    from tests.test_security import final, http_exchange, request_bytes

    gw, _, path = locked
    time.sleep(1.1)  # a fresh one-second window for error lines
    rids: dict[str, int] = {}
    r = httpx.post(gw.url + "/v2/models/no_such_model/infer", content=BODY,
                   headers={"X-Request-Id": "latency-404"}, timeout=5)
    rids["latency-404"] = r.status_code
    r = httpx.post(gw.url + INFER, content=BODY, timeout=5,
                   headers={"X-Request-Id": "latency-400", "X-Request-Timeout-Ms": "soon"})
    rids["latency-400"] = r.status_code
    r = httpx.post(gw.url + INFER, content=BODY, timeout=5,
                   headers=[(f"X-H{i}", "1") for i in range(150)])
    rids[r.headers["x-request-id"]] = r.status_code
    for payload in (request_bytes("GET", "/v2/health/ready", [("X-Big", "a" * (1 << 20))]),
                    b"GARBAGE\r\n\r\n"):
        answer = final(http_exchange(gw.port, payload, timeout_s=30))
        raw_rid = answer.header(b"x-request-id")
        assert raw_rid is not None
        rids[raw_rid.decode()] = answer.status
    assert sorted(rids.values()) == [400, 400, 404, 431, 431], rids
    deadline = time.monotonic() + 5
    by_rid: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and not set(rids) <= set(by_rid):
        time.sleep(0.2)   # lines are flushed once a second
        by_rid = {line["rid"]: line for line in access_lines(path) if line.get("rid") in rids}
    assert set(rids) <= set(by_rid), (rids, by_rid)
    for rid, status in rids.items():
        line = by_rid[rid]
        assert line["status"] == status, line
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0, line
        assert line["reason"], line
        assert "trace_id" not in line  # tracing is off


def test_a_flood_of_bad_requests_leaves_a_bounded_log(
        locked: tuple[GatewayProcess, int, Path]) -> None:
    gw, _, path = locked
    flood = 2000
    time.sleep(1.2)  # earlier tests' lines are out
    before = len(path.read_text().splitlines())

    def send(worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(worker, flood, 8):
                r = client.post(gw.url + INFER, content=BODY,
                                headers={"X-Request-Timeout-Ms": "soon",
                                         "X-Request-Id": f"flood-{i}"})
                assert r.status_code == 400

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(8)))
    took = time.monotonic() - started
    time.sleep(2.5)  # the window closes, its summary is written and flushed
    lines = access_lines(path)[before:]
    written = [line for line in lines if str(line.get("rid", "")).startswith("flood-")]
    summaries = [line for line in lines if "suppressed" in line]
    windows = int(took) + 2
    assert len(lines) <= windows * 21 + 2, (len(lines), took)
    assert summaries, lines[-5:]
    # Nothing is lost without a trace: what was not written is counted.
    assert len(written) + sum(s["suppressed_errors"] for s in summaries) == flood
    text = log_text(gw)
    assert "Traceback" not in text
    assert httpx.post(gw.url + INFER, content=BODY, timeout=5).status_code == 200


def test_access_log_on_the_gateway_log_when_no_path(open_gw: GatewayProcess) -> None:
    gw = open_gw
    httpx.post(gw.url + INFER, content=BODY, headers={"X-Request-Id": "to-stderr-1"},
               timeout=5)
    text = wait_log(gw, '"rid":"to-stderr-1"')
    [line] = [ln for ln in text.splitlines() if '"rid":"to-stderr-1"' in ln]
    entry = json.loads(line.split("gateway.access: ", 1)[1])
    assert entry["status"] == 200 and set(entry) >= ACCESS_FIELDS


def test_line_budget_bounds_errors_and_samples_successes() -> None:
    budget = LineBudget(max_lines_per_s=5, max_error_lines_per_s=2, success_sample=0.5)
    assert budget.roll(100.0) is None
    assert [budget.admit(100.1, is_error=True) for _ in range(4)] == [True, True, False, False]
    assert [budget.admit(100.2, is_error=False) for _ in range(8)] == [
        False, True, False, True, False, True, False, False]  # every 2nd; 5 lines at most
    assert budget.roll(100.9) is None          # same window
    assert budget.roll(101.0) == (3, 2, 4)     # suppressed, of them errors, unsampled
    assert budget.admit(101.0, is_error=True)
    assert budget.roll(103.5) is None          # nothing left out in 101


def test_access_log_writes_a_summary_for_what_it_left_out() -> None:
    lines: list[str] = []
    cfg = AccessLogConfig(enabled=True, max_error_lines_per_s=1)
    alog = AccessLog(cfg, lines.append)
    for i in range(5):
        alog.record(10.0 + i / 10, 1.7e9, rid=b"r%d" % i, tenant=None, model="m" * 500,
                    worker=None, status=429, latency_s=None, queue_s=None,
                    reason="rate_limited")
    alog.tick(11.0, 1.7e9 + 1)
    first, summary = (json.loads(line) for line in lines)
    assert first["rid"] == "r0" and len(first["model"]) == 200
    assert summary["suppressed"] == 4 and summary["suppressed_errors"] == 4


# --- breaker, worker and drain logs ---------------------------------------------------------


def test_breaker_transitions_carry_their_reason() -> None:
    cfg = BreakerConfig(consecutive_failures=3, open_s=5.0, jitter=0.0, half_open_probes=1,
                        max_ejected_fraction=1.0)
    board = BreakerBoard(cfg, rng=random.Random(1))
    board.add_worker("w1", 0.0)
    for t in range(3):
        board.record("w1", 1.0 + t, ok=False)
    [opened] = board.drain_transitions()
    assert (opened.worker, opened.old, opened.new) == ("w1", BreakerState.CLOSED,
                                                        BreakerState.OPEN)
    assert opened.reason == "consecutive_failures"
    assert opened.detail == "3 consecutive failures" and opened.open_for_s == 5.0
    assert board.allow("w1", 8.5)
    board.record("w1", 8.6, ok=True)
    half, closed = board.drain_transitions()
    assert half.new is BreakerState.HALF_OPEN and "after 5.5 s open" in half.detail
    assert closed.new is BreakerState.CLOSED and "probes passed" in closed.detail
    assert board.drain_transitions() == []


def test_breaker_opening_and_worker_down_are_logged_with_the_reason(
        tmp_path: Path) -> None:
    with SimFleetThread([WorkerSpec(base_ms=1.0)] * 2) as sim:
        bad = sim.urls[1]
        gw = GatewayProcess(base_config(sim, admission={
            "breaker": {"consecutive_failures": 3, "max_ejected_fraction": 0.5,
                        "open_s": 30.0},
            "retry": {"max_attempts": 1}}), tmp_path)
        with gw:
            sim.set_fault(1, error_rate=1.0)
            with httpx.Client(timeout=5) as client:
                for _ in range(40):
                    client.post(gw.url + INFER, content=BODY)
            text = wait_log(gw, f"breaker of worker {bad} opened")
            [line] = [ln for ln in text.splitlines() if f"breaker of worker {bad} opened" in ln]
            assert "WARNING" in line and "3 consecutive failures" in line
            assert "ejected for" in line
            sim.set_fault(1, error_rate=0.0, ready=False)
            text = wait_log(gw, f"worker {bad} serving -> down")
            [line] = [ln for ln in text.splitlines() if f"worker {bad} serving -> down" in ln]
            assert "WARNING" in line and "answered 400" in line
            sim.crash(0)
            line = wait_log(gw, f"worker {sim.urls[0]} serving -> down")
            assert "cannot connect" in line.split(f"worker {sim.urls[0]} serving -> down")[1]
            assert "Traceback" not in log_text(gw)


@pytest.mark.parametrize(("latency_ms", "drain_timeout_s", "expect"), [
    (1500.0, 10.0, "drain done in"),
    (8000.0, 1.0, "drain timed out after"),
])
def test_sigterm_logs_the_drain(tmp_path: Path, latency_ms: float, drain_timeout_s: float,
                                expect: str) -> None:
    with SimFleetThread([WorkerSpec(base_ms=1.0)]) as sim:
        gw = GatewayProcess(base_config(sim, upstream={"drain_timeout_s": drain_timeout_s}),
                            tmp_path)
        gw.start()
        try:
            sim.set_fault(0, added_latency_ms=latency_ms)
            threads = [threading.Thread(target=lambda: httpx.post(
                gw.url + INFER, content=BODY, timeout=15)) for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and sim.statistics().workers[0].in_flight < 3:
                time.sleep(0.05)
            gw.signal(signal.SIGTERM)
            text = wait_log(gw, expect, timeout_s=20)
            assert "SIGTERM: draining 3 requests in flight (3 at workers, 0 queued)" in text
            if expect == "drain timed out after":
                assert "3 requests still in flight were cut off" in text
            for t in threads:
                t.join(15)
        finally:
            gw.stop()
