"""Slow clients bounded and malformed framing answered (issue 21), against a real gateway on
loopback in front of the simulator, with short deadlines (1 s) so that each case takes about
a second:

* a request head one byte at a time, a body one byte at a time, a stalled body: 408 in
  Triton's JSON, the connection closed; a connection that sends nothing: closed, no answer;
  a keep-alive connection idle for longer than the head deadline is still served;
* a malformed chunked body: 400 in Triton's JSON and no traceback in the log, beside the
  framing refusals that were already clean (smuggling, duplicate or negative Content-Length:
  400; a 10 GB Content-Length: 413);
* beyond ``clients.max_connections`` the oldest slow request gives way (503) and a normal
  request is still answered; with the open-file limit at 128, 200 connections neither stop
  the listener nor make it spin;
* the open-file soft limit is raised to the hard limit at start (and left alone when told).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from tests.test_security import (
    RawResponse,
    assert_json_error,
    assert_no_traceback,
    base_config,
    final,
    http_exchange,
    infer_body,
)

DEADLINE_S = 1.0
CLIENTS = {"header_timeout_s": DEADLINE_S, "body_timeout_s": DEADLINE_S,
           "body_grace_s": DEADLINE_S, "max_connections": 64}
INFER = "/v2/models/simple/infer"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimFleetThread]:
    with SimFleetThread(workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(base_config(sim.ports, clients=CLIENTS),
                        tmp_path_factory.mktemp("slow"), open_files=(512, 2048)).start()
    try:
        yield gw
    finally:
        gw.stop()


def parse(data: bytes) -> RawResponse | None:
    """The answer in ``data`` (one at most), or None when nothing came."""
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, _, v in
               (line.partition(b":") for line in lines[1:])]
    return RawResponse(int(lines[0].split()[1]), headers, body)


def drip(port: int, first: bytes, byte: bytes, every_s: float, limit_s: float = 6.0
         ) -> tuple[RawResponse | None, float]:
    """Send ``first``, then ``byte`` every ``every_s`` until the gateway closes the connection;
    what it answered and how long that took."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(first)
        sock.settimeout(every_s)
        while time.monotonic() - started < limit_s:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if byte:
                    try:
                        sock.sendall(byte)
                    except OSError:
                        break
                continue
            except OSError:
                break
            if not data:
                break
            received += data
    return parse(received), time.monotonic() - started


def head_bytes(path: str = INFER, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"{extra}").encode()


def test_slow_heads_and_bodies_are_answered_408_and_closed(gateway: GatewayProcess) -> None:
    cases: dict[str, tuple[bytes, bytes]] = {
        "head": (b"GET /v2/health/ready HTTP/1.1\r\nHost: gateway\r\nX-Slow: ", b"a"),
        "silent": (b"", b""),
        "body": (head_bytes(extra="Content-Length: 1000\r\n\r\n") + b"{", b" "),
        "stalled body": (head_bytes(extra="Content-Length: 1000\r\n\r\n") + b"{", b""),
        "chunked body": (head_bytes(extra="Transfer-Encoding: chunked\r\n\r\n") +
                         b"1\r\n{\r\n", b"1\r\n \r\n"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(drip, gateway.port, first, byte, 0.2)
                   for name, (first, byte) in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    for name, (answer, took_s) in results.items():
        # the deadline, and two ticks (a tenth of it) beyond, and room for a busy machine
        assert DEADLINE_S - 0.05 <= took_s <= DEADLINE_S + 2.0, (name, took_s)
        if name == "silent":
            assert answer is None
            continue
        assert answer is not None, name
        message = assert_json_error(answer, 408)
        assert answer.header(b"connection") == b"close"
        assert answer.header(b"x-request-id")
        expected = {"head": "request head", "stalled body": "no request body bytes"}.get(
            name, "slower than 500 bytes/s")
        assert expected in message, (name, message)
    assert_no_traceback(gateway)


def test_an_idle_keep_alive_connection_outlives_the_head_deadline(
        gateway: GatewayProcess) -> None:
    request = head_bytes(extra=f"Content-Length: {len(infer_body())}\r\n\r\n") + infer_body()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            time.sleep(2 * DEADLINE_S)


@pytest.mark.parametrize(("payload", "status"), [
    # a malformed chunk size: no answer and a traceback in the log, before issue 21
    (head_bytes(extra="Transfer-Encoding: chunked\r\n\r\n") + b"zz\r\nabc\r\n0\r\n\r\n", 400),
    (head_bytes(extra="Transfer-Encoding: chunked\r\n\r\n") + b"3\r\nabcXX0\r\n\r\n", 400),
    (head_bytes(extra="Transfer-Encoding: chunked\r\n\r\n") + b"-3\r\nabc\r\n0\r\n\r\n", 400),
    # clean before, and still
    (head_bytes(extra="Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n") + b"abc",
     400),
    (head_bytes(extra="Content-Length: 3\r\nContent-Length: 4\r\n\r\n") + b"abc", 400),
    (head_bytes(extra="Content-Length: -1\r\n\r\n"), 400),
    (head_bytes(extra="Content-Length: 10000000000\r\n\r\n"), 413),
])
def test_malformed_framing_is_answered_in_json_without_a_traceback(
        gateway: GatewayProcess, payload: bytes, status: int) -> None:
    answer = final(http_exchange(gateway.port, payload, timeout_s=5))
    assert_json_error(answer, status)
    time.sleep(0.1)  # whatever the gateway logs about it, logged by now
    assert_no_traceback(gateway)
    assert "Exception in ASGI application" not in gateway.log_path.read_text()


def test_beyond_max_connections_the_oldest_slow_request_gives_way(
        gateway: GatewayProcess) -> None:
    slow = []
    try:
        for _ in range(80):  # beyond max_connections (64), each a request head in progress
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
            slow.append(sock)
            time.sleep(0.002)
        started = time.monotonic()
        r = httpx.post(gateway.url + INFER, content=infer_body(), timeout=5)
        assert r.status_code == 200 and time.monotonic() - started < 2.0
        answers: list[RawResponse | None] = []
        for sock in slow[:16]:
            sock.settimeout(0.5)
            try:
                answers.append(parse(sock.recv(65536)))
            except OSError:
                answers.append(None)
        refused = [a for a in answers if a is not None]
        assert refused, "no connection was closed to make room"
        for answer in refused:
            assert "connection" in assert_json_error(answer, 503)
            assert answer.header(b"retry-after") == b"1"
    finally:
        for sock in slow:
            sock.close()


def open_files(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-file limit")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="Linux /proc")
def test_the_open_file_soft_limit_is_raised_to_the_hard_limit(
        gateway: GatewayProcess, sim: SimFleetThread, tmp_path: Path) -> None:
    assert gateway.proc is not None
    assert open_files(gateway.proc.pid) == ("2048", "2048")
    gw = GatewayProcess(base_config(sim.ports, clients={"raise_open_file_limit": False}),
                        tmp_path, open_files=(512, 2048)).start()
    try:
        assert gw.proc is not None
        assert open_files(gw.proc.pid) == ("512", "2048")
    finally:
        gw.stop()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="Linux /proc")
def test_out_of_descriptors_the_listener_neither_stops_nor_spins(
        sim: SimFleetThread, tmp_path: Path) -> None:
    cfg: dict[str, Any] = base_config(sim.ports)
    gw = GatewayProcess(cfg, tmp_path, open_files=(128, 128)).start()
    held: list[socket.socket] = []
    try:
        assert gw.proc is not None
        pid = gw.proc.pid
        for _ in range(200):  # more than the process may open
            try:
                held.append(socket.create_connection(("127.0.0.1", gw.port), timeout=2))
            except OSError:
                break
        time.sleep(0.3)
        assert len(os.listdir(f"/proc/{pid}/fd")) < 128  # the budget kept it under the limit
        cpu_before = _cpu_s(pid)
        r = httpx.post(gw.url + INFER, content=infer_body(), timeout=5)
        assert r.status_code == 200, r.text
        time.sleep(1.0)
        assert _cpu_s(pid) - cpu_before < 0.5  # no spinning on accept()
    finally:
        for sock in held:
            sock.close()
        gw.stop()
    assert_no_traceback(gw)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
