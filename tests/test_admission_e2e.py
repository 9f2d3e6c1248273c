"""Admission control end to end, through the real gateway (``python -m gateway serve``) in
front of the simulator (``python -m gateway sim``) and, for global limits, a real
``redis-server``: the thundering herd, every rejection path, a worker crashing under load
(breaker, retries, slow start), a flapping worker, Redis down and hung, client aborts, a
retry storm and three replicas sharing one Redis-backed limit.

The load comes from raw asyncio HTTP/1.1 clients (``loadtest.herd.herd`` for one herd,
:class:`Load` here for closed-loop traffic over keep-alive connections). Timing bounds are
loose on purpose (CI shares two cores); the benchmark ``python -m loadtest.herd`` reports the
figures themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import (
    DEADLINE_MS,
    INFER_BODY,
    SLOTS_PER_WORKER,
    SimProcess,
    admission_config,
    gateway_config,
    herd,
    rejections_by_reason,
    request_bytes,
    run_herd,
    table,
)
from tests.redis_server import RedisServer

INFER = "/v2/models/simple/infer"
REJECTION_STATUSES = {429, 503, 504}


# ------------------------------------------------------------------------------ helpers

@dataclass(slots=True)
class Sample:
    sent_at: float          # seconds since the load started
    status: int             # 0: no answer (connection broke, or no answer in time)
    retry_after: bool
    json_error: bool
    latency_s: float
    target: int             # index of the gateway port


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    payload: bytes) -> tuple[int, dict[str, str], bytes]:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ", 2)[1]), headers, body


def _json_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), str)


class Load:
    """Closed-loop load in a background thread: ``connections`` keep-alive connections per
    port, each sending its next request when the previous answer came. Bounded by
    ``max_duration_s`` whatever happens; ``stop()`` returns every sample."""

    def __init__(self, ports: list[int], connections: int, *,
                 headers: dict[str, str] | None = None, answer_timeout_s: float = 10.0,
                 max_duration_s: float = 60.0, pause_s: float = 0.0) -> None:
        self.ports = ports
        self.connections = connections
        self.payloads = [request_bytes(f"127.0.0.1:{p}", headers) for p in ports]
        self.answer_timeout_s = answer_timeout_s
        self.max_duration_s = max_duration_s
        self.pause_s = pause_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.t0 = 0.0

    def start(self) -> Load:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(self.answer_timeout_s + 10)
        assert not self._thread.is_alive(), "load thread did not stop"
        return self.samples

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(len(self.ports))
                               for _ in range(self.connections)))

    async def _client(self, i: int) -> None:
        end = self.t0 + self.max_duration_s
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self._stop.is_set() and time.monotonic() < end:
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.ports[i])
                status, headers, body = await asyncio.wait_for(
                    _exchange(*conn, self.payloads[i]), self.answer_timeout_s)
                self.samples.append(Sample(sent - self.t0, status, "retry-after" in headers,
                                           _json_error(body), time.monotonic() - sent, i))
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                self.samples.append(Sample(sent - self.t0, 0, False, False,
                                           time.monotonic() - sent, i))
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.05)
            if self.pause_s:
                await asyncio.sleep(self.pause_s)
        if conn is not None:
            conn[1].close()


def by_status(samples: list[Sample]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s in samples:
        out[s.status] = out.get(s.status, 0) + 1
    return out


def infer(url: str, *, headers: dict[str, str] | None = None, body: bytes = INFER_BODY,
          timeout_s: float = 30.0) -> httpx.Response:
    return httpx.post(url + INFER, content=body, headers=headers or {}, timeout=timeout_s)


def assert_rejection(r: httpx.Response, status: int, *, retry_after: bool = True,
                     says: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), r.text
    assert says in doc["error"], doc["error"]
    if retry_after:
        assert int(r.headers["retry-after"]) >= 1, r.headers


def sim_counts(sim: SimProcess) -> list[int]:
    return [int(w["infer_requests"]) for w in sim.stats()]


def worker_ids(sim: SimProcess) -> list[str]:
    return [f"127.0.0.1:{p}" for p in sim.ports]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Everything a test starts is stopped here, last started first."""
    with contextlib.ExitStack() as st:
        yield st


def start_sim(stack: contextlib.ExitStack, workers: int = 4, **kw: Any) -> SimProcess:
    sim = SimProcess(workers, **kw)
    stack.callback(sim.stop)
    return sim.start()


def start_gateway(stack: contextlib.ExitStack, cfg: dict[str, Any], workdir: Path,
                  ready_workers: int | None = None) -> GatewayProcess:
    gw = GatewayProcess(cfg, workdir)
    stack.callback(gw.stop)
    gw.start()
    want = len(cfg["workers"]) if ready_workers is None else ready_workers
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == want, what="workers ready")
    return gw


# ------------------------------------------------------------------------------ the herd

def test_thundering_herd_5000_requests_get_fast_definite_answers(tmp_path: Path) -> None:
    """5,000 requests released at once over 1,000 connections (five back to back on each)
    at 4 workers × 4 slots, a global bucket (1,000/s, burst 500), a queue of 200 and a 2 s
    deadline."""
    fig = run_herd("admission", admission_config(), requests=5000, connections=1000,
                   workdir=tmp_path)
    print(table([fig]))
    statuses = {int(k) for k in fig.by_status}
    assert statuses <= {200, *REJECTION_STATUSES}, fig.by_status   # 0 would be no answer
    assert fig.by_status.get("200", 0) >= 100 and fig.rejections > 0, fig
    assert fig.rejections_with_retry_after == fig.rejections, fig
    assert fig.non_200_json_errors == fig.rejections, fig
    assert max(fig.max_in_flight_per_worker) <= SLOTS_PER_WORKER, fig.max_in_flight_per_worker
    assert fig.admitted_p99_ms is not None and fig.admitted_p99_ms <= DEADLINE_MS, fig
    assert fig.gateway_peak_rss_mb < 300, fig
    assert sum(fig.rejections_by_reason.values()) == fig.rejections, fig.rejections_by_reason
    # Readiness stays true and never waits for admission (queued requests wait up to 1.5 s),
    # nor for the herd's parsing: the proxy's turnstile lets at most 32 inference requests
    # start per loop turn, so a probe waits a few short turns (about 30 ms measured here).
    assert fig.ready_probes > 10 and fig.ready_probe_not_ready == 0, fig
    assert fig.ready_probe_max_ms < 100, fig


# ------------------------------------------------------------------------------ rejections

def test_every_rejection_is_triton_json_with_retry_after_and_counted(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    sim = start_sim(stack, 2, base_ms=1000)
    cfg = gateway_config(sim, slots=1, admission={
        "require_api_key": True,
        "tenants": {
            "std": {"keys": ["k-std"]},
            "low": {"keys": ["k-low"], "priority": "sheddable"},
            "tiny": {"keys": ["k-tiny"], "rate_limit": {"rate_per_s": 0.05, "burst": 1}},
        },
        "queue": {"max_length": 4, "max_wait_s": 20, "default_deadline_s": 20,
                  "shed_sheddable_at": 0.5, "shed_standard_at": 1.0},
    }, upstream={"max_body_bytes": 4096}, models={"simple": {}})
    gw = start_gateway(stack, cfg, tmp_path)
    std = {"X-Api-Key": "k-std"}

    assert_rejection(infer(gw.url), 401, retry_after=False, says="API key")
    assert_rejection(infer(gw.url, headers={"Authorization": "Bearer nope"}), 401,
                     retry_after=False)
    assert_rejection(infer(gw.url, headers=std, body=b"x" * 5000), 413, retry_after=False)
    # Deadline shorter than the worker's 1 s, sent before any answer was measured: the
    # gateway answers 504 itself when it runs out. (Once a worker's latency is known, a
    # request routed there with less time left is refused at once, 503 "deadline"; with
    # one worker of two measured, which of the two it meets was the router's tie.)
    assert_rejection(infer(gw.url, headers={**std, "X-Request-Timeout-Ms": "150"}), 504)
    tiny = {"Authorization": "Bearer k-tiny"}
    assert infer(gw.url, headers=tiny).status_code == 200
    r = infer(gw.url, headers=tiny)
    assert_rejection(r, 429, says="rate limit")
    assert int(r.headers["retry-after"]) >= 15          # one token at 0.05/s

    with ThreadPoolExecutor(8) as pool:
        queued = [pool.submit(infer, gw.url, headers=std) for _ in range(4)]
        gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] == 2, timeout_s=5,
                    what="2 running, 2 queued")
        assert_rejection(infer(gw.url, headers={"X-Api-Key": "k-low"}), 503,
                         says="sheddable requests are being shed")
        assert_rejection(infer(gw.url, headers={**std, "X-Priority": "sheddable"}), 503,
                         says="shed")
        assert_rejection(infer(gw.url, headers={**std, "X-Request-Timeout-Ms": "300"}), 503,
                         says="deadline cannot be met")
        queued += [pool.submit(infer, gw.url, headers={**std, "X-Priority": "critical"})
                   for _ in range(2)]
        gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] == 4, timeout_s=5,
                    what="queue full")
        assert_rejection(infer(gw.url, headers={**std, "X-Priority": "critical"}), 503,
                         says="queue is full")
        assert [f.result().status_code for f in queued] == [200] * 6

    sim.control(worker="all", crash=True)
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 0, what="fleet down")
    assert_rejection(infer(gw.url, headers=std), 503, says="no ready worker")

    reasons = rejections_by_reason(gw.url)
    for reason, at_least in {"unauthorized": 2, "payload_too_large": 1, "rate_limited": 1,
                             "upstream_timeout": 1, "overloaded": 3, "deadline": 1,
                             "no_worker": 1}.items():
        assert reasons.get(reason, 0) >= at_least, (reason, reasons)
    status = gw.status()
    assert {e["reason"] for e in status["rejections"]} >= {"rate_limited", "no_worker"}
    [limit] = status["limits"]
    # read without the admin token: the tenant's name is hidden
    assert limit["name"] == "tenant:(hidden)" and limit["scope"] == "local"
    assert limit["rate_per_s"] == 0.05 and limit["burst"] == 1
    assert 0 <= limit["available"] < 1


# ------------------------------------------------------------------------------ crashes

def test_worker_crash_under_load_breaker_retries_then_slow_start_ramp(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    """Health probes are slow here on purpose (every 2 s, 3 to fall), so the breaker alone
    takes the crashed worker out and brings it back."""
    sim = start_sim(stack, 4, base_ms=5)
    cfg = gateway_config(sim, slots=8, admission={
        "breaker": {"consecutive_failures": 3, "open_s": 0.4, "max_open_s": 0.8,
                    "jitter": 0.1, "half_open_probes": 2, "slow_start_s": 3.0},
    }, health={"interval_s": 2.0, "rise": 1, "fall": 3, "timeout_s": 0.5})
    gw = start_gateway(stack, cfg, tmp_path)
    victim = worker_ids(sim)[3]
    load = Load([gw.port], 16).start()
    states: list[tuple[float, str, float, int]] = []   # (t, breaker, share, opened_total)
    counts: list[tuple[float, list[int]]] = []
    try:
        time.sleep(1.0)
        sim.control(worker=3, crash=True)
        crashed_at = load.elapsed()
        while load.elapsed() < crashed_at + 2.0:
            w = gw.worker_status(victim)
            states.append((load.elapsed(), w["breaker"], w["traffic_share"],
                           w["breaker_opened_total"]))
            time.sleep(0.05)
        sim.control(worker=3, restart=True)
        restarted_at = load.elapsed()
        while load.elapsed() < restarted_at + 5.0:
            counts.append((load.elapsed(), sim_counts(sim)))
            w = gw.worker_status(victim)
            states.append((load.elapsed(), w["breaker"], w["traffic_share"],
                           w["breaker_opened_total"]))
            time.sleep(0.25)
    finally:
        samples = load.stop()
    during = [s for t, s, _, _ in states if crashed_at < t < restarted_at]
    assert "open" in during, states
    # open → half-open → a probe failed (refused) → open again, while the worker was down
    assert max(o for t, _, _, o in states if t < restarted_at) >= 2, states
    after = [(t, s, share) for t, s, share, _ in states if t > restarted_at]
    assert after[-1][1] == "closed" and after[-1][2] == 1.0, after
    ramp = [share for _, s, share in after if s == "closed" and 0.0 < share < 1.0]
    assert len(ramp) >= 3 and ramp == sorted(ramp), after        # a ramp, rising

    # its share of the traffic per 0.25 s interval rises gradually, not in one step
    shares = []
    for (_, a), (_, b) in itertools.pairwise(counts):
        delta = [y - x for x, y in zip(a, b, strict=True)]
        if sum(delta):
            shares.append(delta[3] / sum(delta))
    first = next(i for i, s in enumerate(shares) if s > 0)
    steady = sum(shares[-4:]) / 4
    # Back in rotation: a fair share is 0.25, measured 0.21–0.25 alone; the expected-latency
    # scorer follows each worker's measured speed, and on a machine loaded by the rest of the
    # suite one slow sample costs a worker part of its share for a second (0.08 seen once).
    assert steady > 0.05, shares
    assert shares[first] < 0.6 * steady, shares
    assert any(0.2 * steady < s < 0.85 * steady for s in shares[first:first + 10]), shares

    answered = by_status(samples)
    dispatch = gw.status()["dispatch"]
    print(f"answers {answered}; dispatch {dispatch}; victim shares per 0.25 s {shares}; "
          f"breaker {[(round(t, 2), s, round(sh, 2), o) for t, s, sh, o in states]}")
    assert answered.get(0, 0) == 0, answered
    admitted = [s for s in samples if s.status not in (429, 503)]
    ok = sum(s.status == 200 for s in admitted)
    assert ok >= 0.99 * len(admitted), answered
    assert dispatch["retries"] >= 1, dispatch
    assert dispatch["upstream_attempts"] <= 1.2 * len(samples), (dispatch, len(samples))


def test_flapping_worker_gateway_keeps_serving_nothing_hangs(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    sim = start_sim(stack, 4, base_ms=5)
    cfg = gateway_config(sim, slots=8, admission={
        "breaker": {"consecutive_failures": 3, "open_s": 0.3, "max_open_s": 1.0,
                    "slow_start_s": 1.0}})
    gw = start_gateway(stack, cfg, tmp_path)
    flapper = worker_ids(sim)[2]
    load = Load([gw.port], 8, answer_timeout_s=5.0).start()
    seen: set[tuple[str, bool, str]] = set()
    try:
        for _ in range(6):
            sim.control(worker=2, crash=True)
            for _ in range(4):
                w = gw.worker_status(flapper)
                seen.add((w["state"], w["ready"], w["breaker"]))
                time.sleep(0.1)
            sim.control(worker=2, restart=True)
            time.sleep(0.4)
    finally:
        samples = load.stop()
    answered = by_status(samples)
    print(f"answers {answered}; flapper states seen {seen}")
    assert answered.get(0, 0) == 0, answered                       # nothing hung or broke
    assert set(answered) <= {200, 502, 503, 504}, answered
    assert answered[200] >= 0.95 * len(samples), answered
    assert all(s.json_error for s in samples if s.status != 200)
    assert any(state == "down" or breaker != "closed" for state, _, breaker in seen), seen

    def healthy_again() -> bool:
        # A breaker still half-open when the load stopped closes on its probe requests, so
        # keep a trickle of traffic going, as any real client would.
        infer(gw.url)
        return all(w["ready"] and w["breaker"] == "closed" and w["in_flight"] == 0
                   for w in gw.status()["workers"])

    gw.wait_for(healthy_again, what="fleet healthy again")
    assert infer(gw.url).status_code == 200


def test_a_queued_burst_keeps_every_slot_busy(stack: contextlib.ExitStack,
                                              tmp_path: Path) -> None:
    """A burst of one tenant's requests, released at once over their own connections, on 2
    workers × 16 slots of 500 ms: most of it queued before the first answers, and nothing
    arrives after. Answers that arrive together free several slots in one turn of the event
    loop, and each must wake a waiter. (One flow's second wake-up in a turn used to find its
    head already woken and nobody else to wake: the slot stayed empty until the queue
    emptied, so the burst ran on ever fewer slots.)"""
    service_s, slots, n = 0.5, 32, 192
    sim = start_sim(stack, 2, base_ms=service_s * 1000)
    gw = start_gateway(stack, gateway_config(sim, slots=slots // 2), tmp_path)
    infer(gw.url)                                          # warm: connections, estimates
    before = sum(sim_counts(sim))
    answers, span = asyncio.run(herd(gw.port, n, n,
                                     headers={"X-Request-Timeout-Ms": "60000"}))
    statuses = collections.Counter(a.status for a in answers)
    assert statuses == {200: n}, statuses
    assert sum(sim_counts(sim)) - before == n
    # Slots busy on average over the burst: the requests' service over its span; all of
    # them: 32 (6 rounds, 3 s).
    busy = n * service_s / span
    print(f"span {span:.2f} s, {busy:.1f} of {slots} slots busy on average")
    assert busy >= 0.6 * slots, (span, busy)


def test_client_aborts_release_their_slots_and_queue_places(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    sim = start_sim(stack, 2, base_ms=3000)
    gw = start_gateway(stack, gateway_config(sim, slots=2, admission={
        "queue": {"max_length": 64, "max_wait_s": 20, "default_deadline_s": 20}}), tmp_path)
    request = request_bytes(gw.hostport)
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        s.sendall(request)
        socks.append(s)
    gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] == 16, timeout_s=5,
                what="4 in flight, 16 queued")
    assert sum(w["in_flight"] for w in gw.status()["workers"]) == 4
    for s in socks:
        s.close()
    t0 = time.monotonic()
    gw.wait_for(lambda: gw.status()["fleet"]["queue_length"] == 0
                and all(w["in_flight"] == 0 for w in gw.status()["workers"]),
                timeout_s=10, what="counters back to zero")
    assert time.monotonic() - t0 < 2.5      # before the workers' 3 s work is even done
    assert infer(gw.url).status_code == 200


def test_retry_storm_attempts_stay_within_budget(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    """Every worker answers 503 (queue of 0: Triton's "Exceeds maximum queue size"), the
    one status that is retried: the attempts the fleet sees stay ≤ 1.2 × the requests."""
    sim = start_sim(stack, 4, base_ms=2)
    gw = start_gateway(stack, gateway_config(sim, slots=8), tmp_path)
    before = sum(sim_counts(sim))
    sim.control(worker="all", slots=0, max_queue=0)
    load = Load([gw.port], 16, answer_timeout_s=5.0).start()
    time.sleep(3.0)
    samples = load.stop()
    attempts = sum(sim_counts(sim)) - before
    answered = by_status(samples)
    print(f"offered {len(samples)}, upstream attempts {attempts}, answers {answered}")
    assert answered.get(0, 0) == 0 and set(answered) <= {503}, answered
    # Triton's own 503s are relayed as they are (JSON error, no Retry-After); the gateway's
    # (no worker left to try) carry Retry-After
    assert all(s.json_error for s in samples)
    offered = len(samples)
    assert offered >= 200, answered
    assert attempts <= 1.2 * offered, (attempts, offered)
    dispatch = gw.status()["dispatch"]
    assert dispatch["retries"] > 0 and dispatch["retry_budget_exhausted"] > 0, dispatch


# ------------------------------------------------------------------------------ Redis

@pytest.mark.redis
def test_redis_down_and_hung_follow_each_limits_policy_without_latency_blowup(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    redis = RedisServer().start()
    stack.callback(redis.stop)
    sim = start_sim(stack, 2, base_ms=1)
    big = {"rate_per_s": 100000, "burst": 100000, "scope": "global"}
    cfg = gateway_config(sim, slots=16, admission={
        "tenants": {
            "open": {"keys": ["k-open"], "rate_limit": {**big, "on_redis_error": "open"}},
            "closed": {"keys": ["k-closed"], "rate_limit": {**big, "on_redis_error": "closed"}},
        },
        "redis": {"url": redis.url, "timeout_s": 0.05, "breaker_failures": 3,
                  "breaker_open_s": 1.0, "key_prefix": "e2e:"},
    })
    gw = start_gateway(stack, cfg, tmp_path)
    opened, closed = {"X-Api-Key": "k-open"}, {"X-Api-Key": "k-closed"}

    def timed(headers: dict[str, str], n: int = 20) -> tuple[list[int], list[float], bool]:
        statuses, latencies, retry_after = [], [], True
        with httpx.Client(timeout=10) as client:
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.post(gw.url + INFER, content=INFER_BODY, headers=headers)
                latencies.append(time.perf_counter() - t0)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    retry_after &= "retry-after" in r.headers and _json_error(r.content)
        return statuses, latencies, retry_after

    s_open, lat_open, _ = timed(opened)
    s_closed, lat_closed, _ = timed(closed)
    assert set(s_open) == set(s_closed) == {200}
    normal = max(sorted(lat_open)[len(lat_open) // 2], sorted(lat_closed)[len(lat_closed) // 2])

    def check_outage(what: str) -> None:
        s_open, lat_open, _ = timed(opened)
        s_closed, lat_closed, retry_after = timed(closed)
        assert set(s_open) == {200}, (what, s_open)
        assert set(s_closed) == {503} and retry_after, (what, s_closed)
        worst = max(lat_open + lat_closed)
        print(f"redis {what}: worst {worst * 1000:.1f} ms, normal median {normal * 1000:.1f} ms")
        assert worst < normal + 0.2, (what, worst, normal)

    redis.pause()                     # hung: connections accepted, nothing answers
    try:
        check_outage("hung")
    finally:
        redis.resume()
    gw.wait_for(lambda: infer(gw.url, headers=closed).status_code == 200, timeout_s=10,
                what="the closed limit admits again once Redis answers")
    redis.stop()                      # down: connection refused
    check_outage("down")
    stats = gw.status()
    assert [lim["name"] for lim in stats["limits"]] == ["tenant:(hidden)"] * 2  # no token
    assert all(lim["scope"] == "global" and lim["available"] is None
               for lim in stats["limits"])


@pytest.mark.redis
def test_three_replicas_share_one_redis_limit_accurately(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    redis = RedisServer().start()
    stack.callback(redis.stop)
    sim = start_sim(stack, 2, base_ms=1)
    rate, burst = 150.0, 150.0
    cfg = gateway_config(sim, slots=64, admission={
        "global_limit": {"rate_per_s": rate, "burst": burst, "scope": "global",
                         "on_redis_error": "closed"},
        "redis": {"url": redis.url, "timeout_s": 1.0, "breaker_failures": 1000,
                  "key_prefix": "replicas:"},
    })
    gateways = [start_gateway(stack, dict(cfg), tmp_path) for _ in range(3)]
    load = Load([g.port for g in gateways], 8, answer_timeout_s=10.0).start()
    time.sleep(3.0)
    samples = load.stop()
    answered = by_status(samples)
    assert set(answered) <= {200, 429}, answered
    admitted = answered.get(200, 0)
    first = min(s.sent_at for s in samples)
    last = max(s.sent_at for s in samples)
    limit = burst + rate * (last - first)
    per_gateway = [sum(1 for s in samples if s.target == i and s.status == 200)
                   for i in range(3)]
    print(f"admitted {admitted} (per gateway {per_gateway}) of {len(samples)}; "
          f"limit {limit:.0f} = {burst:.0f} + {rate:.0f}/s × {last - first:.2f} s")
    assert all(n > 0 for n in per_gateway), per_gateway
    assert answered.get(429, 0) > admitted, answered              # offered ≫ the limit
    assert admitted <= limit * 1.01, (admitted, limit)
    assert admitted >= limit * 0.95, (admitted, limit)


# ------------------------------------------------------------------------------ misc

def test_status_limits_describe_local_buckets(stack: contextlib.ExitStack,
                                              tmp_path: Path) -> None:
    sim = start_sim(stack, 1, base_ms=1)
    gw = start_gateway(stack, gateway_config(sim, admission={
        "global_limit": {"rate_per_s": 10, "burst": 20}},
        models={"simple": {"rate_limit": {"rate_per_s": 5}}}), tmp_path)
    for _ in range(4):
        assert infer(gw.url).status_code == 200
    limits = {lim["name"]: lim for lim in gw.status()["limits"]}
    assert set(limits) == {"global", "model:simple"}
    assert limits["global"]["burst"] == 20 and limits["model:simple"]["burst"] == 5
    assert 15 <= limits["global"]["available"] < 20
    assert 0 <= limits["model:simple"]["available"] < 5


def test_adaptive_concurrency_limit_keeps_a_worker_below_its_slots(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    """One worker that runs 4 requests at once (the rest wait in its own queue) behind 32
    gateway slots: with ``admission.adaptive`` the gateway finds the knee — the RTT grows
    past tolerance × min RTT — and keeps far fewer than 32 requests on the worker."""
    sim = start_sim(stack, 1, slots=4, base_ms=20)
    gw = start_gateway(stack, gateway_config(sim, slots=32, admission={
        "adaptive": {"enabled": True, "min_limit": 1, "tolerance": 1.5},
        "queue": {"max_length": 256, "max_wait_s": 10, "default_deadline_s": 20}}), tmp_path)
    load = Load([gw.port], 48, answer_timeout_s=20.0).start()
    in_flight: list[int] = []
    try:
        time.sleep(2.0)
        while load.elapsed() < 4.5:
            in_flight.append(int(sim.stats()[0]["in_flight"]))
            time.sleep(0.05)
    finally:
        samples = load.stop()
    answered = by_status(samples)
    mean = sum(in_flight) / len(in_flight)
    print(f"adaptive: worker in flight mean {mean:.1f} (samples {in_flight}), answers "
          f"{answered} {rejections_by_reason(gw.url)}")
    assert set(answered) == {200}, answered
    assert mean < 16, in_flight                 # the hard limit alone would keep ~32 there
    assert max(in_flight) <= 32
