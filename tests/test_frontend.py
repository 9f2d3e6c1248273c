"""The gateway's own HTTP/1.1 front end (gateway.http.frontend), through a real gateway
process in front of the simulator: refusals decided from the request head and answered before
the body, framing of every answer (one Content-Length, keep-alive, HEAD, HTTP/1.0, pipelining),
and what a refused body does to the connection."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.http.frontend import ReadBudget
from gateway.sim.core import WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from tests.test_health_eager import exchange

BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": list(range(16))}]}).encode()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with SimFleetThread([WorkerSpec(slots=4)]) as sim:
        cfg = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"}],
               # the tenant 'slow' has one token per 100 s: its requests are the refused ones
               "models": {"simple": {"rate_limit": {"rate_per_s": 1000, "burst": 1000}}},
               "admission": {"tenants": {"slow": {"keys": ["slow-key"],
                                                  "rate_limit": {"rate_per_s": 0.01,
                                                                 "burst": 1}}}}}
        with GatewayProcess(cfg, tmp_path_factory.mktemp("frontend")) as g:
            g.wait_for(lambda: g.status()["fleet"]["workers_ready"] == 1, what="ready")
            yield g


def _post(path: str, body: bytes, *, extra: bytes = b"", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n").encode() + extra + b"\r\n" + body


def _spend_the_slow_tenants_token(gw: GatewayProcess) -> None:
    """The tenant 'slow' has one token a 100 s: after this, each of its requests is 429."""
    for _ in range(2):
        httpx.post(gw.url + "/v2/models/simple/infer", content=BODY,
                   headers={"Authorization": "Bearer slow-key"}, timeout=5)


def test_a_refusal_is_answered_from_the_head_before_the_body(gw: GatewayProcess) -> None:
    _spend_the_slow_tenants_token(gw)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        # The head only: a body of 100 bytes is declared and never sent.
        s.sendall(_post("/v2/models/simple/infer", b"", length=100,
                        extra=b"Authorization: Bearer slow-key\r\nX-Request-Id: r-1\r\n"))
        started = time.monotonic()
        data = s.recv(65536)
        took = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lower = head.lower()
    assert head.startswith(b"HTTP/1.1 429 "), data
    assert took < 2.0
    assert b"retry-after: " in lower and b"date: " in lower and b"x-request-id: r-1" in lower
    assert lower.count(b"content-length:") == 1
    assert json.loads(body)["error"].startswith("rate limit exceeded")


def test_a_refused_small_body_is_dropped_and_the_connection_kept(gw: GatewayProcess) -> None:
    _spend_the_slow_tenants_token(gw)
    refused = _post("/v2/models/simple/infer", BODY,
                    extra=b"Authorization: Bearer slow-key\r\n")
    ok = _post("/v2/models/simple/infer", BODY)
    # Pipelined on one connection: the refusal, then a request that passes, in order.
    data = exchange(gw.port, refused + ok + refused, 3)
    statuses = [h[:3] for h in data.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [b"429", b"200", b"429"], data[:600]
    assert b'"outputs"' in data


def test_a_refused_large_or_unsized_body_closes_the_connection(gw: GatewayProcess) -> None:
    _spend_the_slow_tenants_token(gw)
    key = b"Authorization: Bearer slow-key\r\n"
    cases = [
        _post("/v2/models/simple/infer", b"", length=10_000_000, extra=key),
        _post("/v2/models/simple/infer", b"", extra=key + b"Expect: 100-continue\r\n",
              length=50),
        (b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         + key + b"\r\n5\r\nhello\r\n"),
    ]
    for payload in cases:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(payload)
            data = b""
            while chunk := s.recv(65536):      # the gateway closes: recv returns b""
                data += chunk
        assert data.startswith(b"HTTP/1.1 429 "), data
        assert b"connection: close" in data.lower()
        assert b"100 Continue" not in data


def test_refusals_are_counted_like_any_other(gw: GatewayProcess) -> None:
    _spend_the_slow_tenants_token(gw)
    before = gw.status()["counters"]["rejected"]
    for _ in range(3):
        r = httpx.post(gw.url + "/v2/models/simple/infer", content=BODY,
                       headers={"Authorization": "Bearer slow-key"}, timeout=5)
        assert r.status_code == 429 and r.headers["retry-after"]
    assert gw.status()["counters"]["rejected"] >= before + 3


def test_framing_of_answers(gw: GatewayProcess) -> None:
    # HEAD: the head of the GET, no body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/health/live HTTP/1.1\r\n"
                  b"Host: x\r\n\r\n")
        time.sleep(0.3)
        data = s.recv(65536)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length: " in first.lower()
    assert rest.startswith(b"HTTP/1.1 200"), data       # no body after the HEAD's head
    # HTTP/1.0: answered, then closed
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
    # A proxied answer: exactly one Content-Length, and its body that long
    data = exchange(gw.port, _post("/v2/models/simple/infer", BODY), 1)
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line for line in head.lower().split(b"\r\n")
               if line.startswith(b"content-length:")]
    assert len(lengths) == 1 and int(lengths[0].split(b":")[1]) == len(body)
    # Connection: close asked by the client is honoured
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(_post("/v2/models/simple/infer", BODY, extra=b"Connection: close\r\n"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()


def test_an_unknown_model_is_not_refused_early_but_answered_404(gw: GatewayProcess) -> None:
    r = httpx.post(gw.url + "/v2/models/nope/infer", content=BODY,
                   headers={"Authorization": "Bearer slow-key"}, timeout=5)
    assert r.status_code == 404 and "error" in r.json()



def test_the_read_budget_holds_reads_past_its_turn_and_releases_them_in_order() -> None:
    """At most ``per_turn`` reads a loop turn; the rest are released first thing in the
    following turns, in the order they were held, and newcomers wait behind them."""
    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        budget = ReadBudget(per_turn=2)
        released: list[int] = []
        turns: list[list[int]] = []

        class Conn:
            def __init__(self, n: int) -> None:
                self.n = n

            def release_held(self) -> None:
                released.append(self.n)

        assert budget.take(loop) and budget.take(loop)
        assert not budget.take(loop)                 # this turn's two reads are spent
        for n in range(5):
            budget.hold(Conn(n), loop)               # type: ignore[arg-type]
        for _ in range(3):
            await asyncio.sleep(0)                   # the next turn of the loop
            turns.append(list(released))
            assert not budget.take(loop) or not budget.holding
        await asyncio.sleep(0)
        assert budget.holding == 0 and budget.take(loop)   # all released: reads go on
        assert budget.held_total == 5
        return turns

    assert asyncio.run(main()) == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout_a_busy_one_is_not(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with SimFleetThread([WorkerSpec(slots=4)]) as sim:
        cfg = {"workers": [{"url": f"http://127.0.0.1:{sim.ports[0]}"}],
               "clients": {"keep_alive_timeout_s": 1.0}}
        with GatewayProcess(cfg, tmp_path_factory.mktemp("keepalive")) as g:
            g.wait_for(lambda: g.status()["fleet"]["workers_ready"] == 1, what="ready")
            probe = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            with socket.create_connection(("127.0.0.1", g.port), timeout=5) as busy, \
                    socket.create_connection(("127.0.0.1", g.port), timeout=5) as idle:
                idle.sendall(probe)
                assert idle.recv(65536).startswith(b"HTTP/1.1 200")
                for _ in range(8):                 # 2.4 s of a request every 0.3 s
                    busy.sendall(probe)
                    assert busy.recv(65536).startswith(b"HTTP/1.1 200")
                    time.sleep(0.3)
                assert idle.recv(65536) == b""     # closed by the gateway meanwhile
                busy.sendall(probe)                # still open, never idle for 1 s
                assert busy.recv(65536).startswith(b"HTTP/1.1 200")
