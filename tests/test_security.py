"""The gateway as a trust boundary (issue 13), one test per finding, each against a real
gateway process on loopback in front of the simulator (or a recording upstream), plus
loopback tests of the upstream client's handling of interim responses.

1. repository control needs the admin token; a tenant key never authorises it;
4. the tenant's priority is a ceiling: ``X-Priority`` may lower it, never raise it;
5. ``Expect: 100-continue`` never loses the answer (curl, raw socket, a worker that sends
   interim responses unasked);
6. header bounds (431), uvicorn's own errors as Triton JSON, one ``Date`` per answer;
   hostile input is a 400 JSON, never a traceback or a plain-text 500;
3. an empty API key authenticates nobody.

``http_exchange`` (a raw-socket client that parses every answer with httptools) is shared
with ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.core.config import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS
from gateway.core.errors import BadRequest
from gateway.core.tenants import effective_priority, is_admin
from gateway.core.types import Priority
from gateway.fleet.upstream import Pool, PoolLimits, safe_target
from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from tests.upstreams import ThreadedUpstream

ADMIN_TOKEN = "admin-token-for-tests"
VIP_KEY, TEAM_KEY, BULK_KEY = "vip-key-for-tests", "team-key-for-tests", "bulk-key-for-tests"
TENANTS = {"vip": {"keys": [VIP_KEY], "priority": "critical"},
           "team": {"keys": [TEAM_KEY], "priority": "standard"},
           "bulk": {"keys": [BULK_KEY], "priority": "sheddable"}}


def infer_body(rows: int = 1, **parameters: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "INPUT0", "shape": [rows, 16],
                                       "datatype": "FP32", "data": [1.0] * (16 * rows)}]}
    if parameters:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


# ------------------------------------------------------------------ a raw HTTP client


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def header_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


class _ResponseCollector:
    """httptools callbacks: every response on the connection, interim ones included."""

    def __init__(self) -> None:
        self.responses: list[RawResponse] = []
        self.complete = 0
        self.final_head_seen = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.responses.append(RawResponse(0))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()
        self.final_head_seen = self.final_head_seen or self.responses[-1].status >= 200

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def http_exchange(port: int, payload: bytes, *, timeout_s: float = 10.0,
                  head_request: bool = False) -> list[RawResponse]:
    """Send ``payload`` (one or more raw requests) and read until the gateway closes the
    connection or goes quiet; every response (1xx included) parsed by httptools. Raises
    AssertionError when what came back is not HTTP."""
    collector = _ResponseCollector()
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sender = threading.Thread(target=_send_quietly, args=(sock, payload), daemon=True)
        sender.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            received += data
            try:
                collector.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                break
            except httptools.HttpParserError as exc:
                raise AssertionError(f"not HTTP: {exc}: {bytes(received[:300])!r}") from None
            if head_request and collector.final_head_seen:
                break  # a HEAD answer has no body for the parser to wait for
        sender.join(timeout_s)
    if collector.responses and collector.complete < len(collector.responses) and \
            not head_request:
        last = collector.responses[-1]
        if last.header(b"content-length") is not None or last.status < 200:
            raise AssertionError(f"truncated HTTP response: {bytes(received[:300])!r}")
    return collector.responses


def _send_quietly(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
    except OSError:
        pass  # the gateway answered early and stopped reading: fine


def final(responses: list[RawResponse]) -> RawResponse:
    finals = [r for r in responses if r.status >= 200]
    assert finals, f"no final response among {[r.status for r in responses]}"
    return finals[0]


def request_bytes(method: str, path: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"", *, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def raw_post(port: int, path: str, headers: dict[str, str], body: bytes) -> RawResponse:
    """A POST over a raw socket: header values httpx refuses to send (``Bearer `` with a
    trailing space, an empty value) reach the gateway as written."""
    return final(http_exchange(port, request_bytes("POST", path, list(headers.items()), body)))


def assert_json_error(r: httpx.Response | RawResponse, status: int) -> str:
    code = r.status_code if isinstance(r, httpx.Response) else r.status
    body = r.content if isinstance(r, httpx.Response) else r.body
    assert code == status, (code, body[:300])
    ctype = r.headers.get("content-type") if isinstance(r, httpx.Response) else \
        (r.header(b"content-type") or b"").decode()
    assert ctype == "application/json", ctype
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), doc
    message: str = doc["error"]
    return message


def assert_no_traceback(gw: GatewayProcess) -> None:
    log = gw.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


# ------------------------------------------------------------------ fixtures


def base_config(ports: list[int], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "log_level": "warning",
        "workers": [{"url": f"http://127.0.0.1:{p}", "metrics_url":
                     f"http://127.0.0.1:{p}/metrics"} for p in ports],
        "models": {"simple": {}},
        "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
        "scrape": {"interval_s": 0.5},
    }
    cfg.update(extra)
    return cfg


def start_gateway(cfg: dict[str, Any], workdir: Path) -> GatewayProcess:
    gw = GatewayProcess(cfg, workdir).start()
    n = len(cfg["workers"])
    gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == n, what="workers ready")
    return gw


@pytest.fixture(scope="module")
def sim() -> Iterator[SimFleetThread]:
    with SimFleetThread(workers=1) as running:
        yield running


@pytest.fixture(scope="module")
def locked_gateway(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[GatewayProcess]:
    """API keys required, an admin token, three tenants."""
    cfg = base_config(sim.ports, admin={"token": ADMIN_TOKEN},
                      admission={"require_api_key": True, "tenants": TENANTS})
    gw = start_gateway(cfg, tmp_path_factory.mktemp("locked"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def open_gateway(sim: SimFleetThread, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[GatewayProcess]:
    """No API keys required and no admin token: the defaults."""
    gw = start_gateway(base_config(sim.ports), tmp_path_factory.mktemp("open"))
    try:
        yield gw
    finally:
        gw.stop()


class RecordingTriton(ThreadedUpstream):
    """A worker that answers like Triton serving ``simple`` and records every request that
    reaches it (method, path, headers, body), for what the gateway must not forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            return Response(status_code=200)

        async def index(request: Request) -> Response:
            return JSONResponse([{"name": "simple", "version": "1", "state": "READY"}])

        async def recorded(request: Request) -> Response:
            body = await request.body()
            self.seen.append((request.method, request.url.path, dict(request.headers), body))
            if request.url.path.endswith("/infer"):
                return JSONResponse({"model_name": "simple", "model_version": "1",
                                     "outputs": []})
            return JSONResponse({})

        return Starlette(routes=[
            Route("/v2/health/ready", ok), Route("/v2/health/live", ok),
            Route("/v2/models/simple/ready", ok),
            Route("/v2/repository/index", index, methods=["POST"]),
            Route("/v2/models/simple/infer", recorded, methods=["POST"]),
            Route("/v2/repository/models/{model}/{action}", recorded, methods=["POST"]),
        ])

    def repository_calls(self) -> list[tuple[str, str, dict[str, str], bytes]]:
        return [s for s in self.seen if s[1].startswith("/v2/repository/models/")]


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingTriton]:
    with RecordingTriton() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def recorded_gateway(recorder: RecordingTriton, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[GatewayProcess]:
    cfg = base_config([recorder.port], admin={"token": ADMIN_TOKEN},
                      admission={"tenants": TENANTS}, scrape={"enabled": False})
    gw = start_gateway(cfg, tmp_path_factory.mktemp("recorded"))
    try:
        yield gw
    finally:
        gw.stop()


# ------------------------------------------------------------------ 1. repository control


def test_repository_control_is_off_without_an_admin_token(open_gateway: GatewayProcess
                                                          ) -> None:
    for action in ("load", "unload"):
        r = httpx.post(f"{open_gateway.url}/v2/repository/models/simple/{action}",
                       content=b"{}", timeout=10)
        message = assert_json_error(r, 403)
        assert message.startswith("repository control is disabled: set admin.token")
        assert r.headers.get("x-request-id")


def test_repository_control_needs_the_admin_token_not_a_tenant_key(
        recorded_gateway: GatewayProcess, recorder: RecordingTriton) -> None:
    url = f"{recorded_gateway.url}/v2/repository/models/simple/load"
    upload = json.dumps({"parameters": {"config": "{}", "file:1/model.py": "aW1wb3J0IG9z"}})
    refused: list[dict[str, str]] = [
        {},
        {"Authorization": f"Bearer {VIP_KEY}"},          # a tenant key, even the top one
        {"X-Api-Key": VIP_KEY},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer "},
        {"X-Api-Key": ADMIN_TOKEN},                      # the token, but not as the bearer
    ]
    for headers in refused:
        r = raw_post(recorded_gateway.port, "/v2/repository/models/simple/load", headers,
                     upload.encode())
        assert_json_error(r, 401)
    assert recorder.repository_calls() == [], "an unauthorised upload reached a worker"

    ok = httpx.post(url, content=upload, timeout=10,
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200, ok.text
    calls = recorder.repository_calls()
    assert [(m, p, b) for m, p, _, b in calls] == [
        ("POST", "/v2/repository/models/simple/load", upload.encode())]


# ------------------------------------------------------------------ 4. priority ceiling


def test_priority_header_lowers_never_raises_pure() -> None:
    assert effective_priority(Priority.SHEDDABLE, b"critical") is Priority.SHEDDABLE
    assert effective_priority(Priority.STANDARD, b"CRITICAL") is Priority.STANDARD
    assert effective_priority(Priority.CRITICAL, b" Sheddable ") is Priority.SHEDDABLE
    assert effective_priority(Priority.CRITICAL, None) is Priority.CRITICAL
    for junk in (b"banana", b"", b"0", b"critical,critical", b"\xff"):
        with pytest.raises(BadRequest):
            effective_priority(Priority.STANDARD, junk)
    assert is_admin([(b"authorization", b"Bearer tok")], "tok")
    assert not is_admin([(b"authorization", b"Bearer tok")], "")
    assert not is_admin([(b"authorization", b"Bearer ")], "")
    assert not is_admin([(b"x-api-key", b"tok")], "tok")


@pytest.fixture(scope="module")
def saturated_gateway(tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[tuple[GatewayProcess, SimFleetThread]]:
    """One slot, a slow model, and a queue that sheds every class but critical at once:
    whether a request is shed or served while the slot is taken shows its priority."""
    slow = SimModel(base_ms=400.0, per_item_ms=0.0, dynamic_batching=False)
    with SimFleetThread([WorkerSpec(slots=4, models=(slow,))]) as sim:
        cfg = base_config(sim.ports, admission={
            "tenants": TENANTS,
            "queue": {"shed_sheddable_at": 0.0, "shed_standard_at": 0.0}})
        cfg["workers"][0]["slots"] = 1
        gw = start_gateway(cfg, tmp_path_factory.mktemp("saturated"))
        try:
            yield gw, sim
        finally:
            gw.stop()


def _while_saturated(gw: GatewayProcess, sim: SimFleetThread, headers: dict[str, str],
                     body: bytes | None = None) -> int:
    """Status of one request sent while another holds the only slot."""
    url = gw.url + "/v2/models/simple/infer"
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(httpx.post, url, content=infer_body(),
                              headers={"X-Api-Key": VIP_KEY}, timeout=10)
        deadline = time.monotonic() + 5
        while sim.statistics().workers[0].in_flight < 1:
            assert time.monotonic() < deadline, "the blocker never reached the worker"
            time.sleep(0.01)
        r = httpx.post(url, content=body or infer_body(), headers=headers, timeout=10)
        assert blocker.result().status_code == 200
    if r.status_code != 200:
        assert_json_error(r, r.status_code)
    return r.status_code


def test_priority_is_a_ceiling(saturated_gateway: tuple[GatewayProcess, SimFleetThread]
                               ) -> None:
    gw, sim = saturated_gateway
    # a critical tenant queues behind the slot and is served...
    assert _while_saturated(gw, sim, {"X-Api-Key": VIP_KEY}) == 200
    # ...a sheddable tenant that says critical is still sheddable: shed
    assert _while_saturated(gw, sim, {"X-Api-Key": BULK_KEY, "X-Priority": "critical"}) == 503
    # ...so is a standard tenant, and an anonymous client (ceiling: standard)
    assert _while_saturated(gw, sim, {"X-Api-Key": TEAM_KEY, "X-Priority": "Critical"}) == 503
    assert _while_saturated(gw, sim, {"X-Priority": "critical"}) == 503
    # lowering is allowed
    assert _while_saturated(gw, sim, {"X-Api-Key": VIP_KEY, "X-Priority": "sheddable"}) == 503
    # Triton's own body parameter never touches the gateway's queue
    assert _while_saturated(gw, sim, {"X-Api-Key": BULK_KEY},
                            infer_body(priority=1)) == 503
    assert_no_traceback(gw)


def test_invalid_priority_header_is_a_400(open_gateway: GatewayProcess) -> None:
    for value in ("banana", "", "1", "critical; q=1"):
        r = raw_post(open_gateway.port, "/v2/models/simple/infer", {"X-Priority": value},
                     infer_body())
        assert "X-Priority" in assert_json_error(r, 400)
    ok = httpx.post(open_gateway.url + "/v2/models/simple/infer", content=infer_body(),
                    headers={"X-Priority": "SHEDDABLE"}, timeout=10)
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------ 5. Expect: 100-continue


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_posting_over_a_megabyte_gets_the_final_answer(
        open_gateway: GatewayProcess, tmp_path: Path) -> None:
    body = infer_body(rows=4) + b" " * 1_200_000  # curl sends Expect: 100-continue > 1 MB
    path = tmp_path / "body.json"
    path.write_bytes(body)
    out = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "20", "-H", "Content-Type: application/json",
         "--data-binary", f"@{path}", "-o", str(tmp_path / "out.json"),
         "-w", "%{http_code}", open_gateway.url + "/v2/models/simple/infer"],
        capture_output=True, text=True, timeout=30, check=False)
    assert "> Expect: 100-continue" in out.stderr, out.stderr
    assert out.stdout == "200", (out.stdout, out.stderr)
    doc = json.loads((tmp_path / "out.json").read_bytes())
    assert doc["outputs"][0]["data"][:2] == [2.0, 2.0]


def test_expect_continue_over_a_raw_socket(open_gateway: GatewayProcess) -> None:
    body = infer_body()
    responses = http_exchange(open_gateway.port, request_bytes(
        "POST", "/v2/models/simple/infer", [("Expect", "100-continue")], body))
    assert [r.status for r in responses] == [100, 200], [r.status for r in responses]
    assert responses[1].json()["outputs"][0]["data"][0] == 2.0


def test_expect_is_never_forwarded(recorded_gateway: GatewayProcess,
                                   recorder: RecordingTriton) -> None:
    before = len(recorder.seen)
    responses = http_exchange(recorded_gateway.port, request_bytes(
        "POST", "/v2/models/simple/infer", [("Expect", "100-continue")], infer_body()))
    assert final(responses).status == 200
    (_, _, headers, _), = recorder.seen[before:]
    assert "expect" not in headers


async def _interim_worker(answers: list[bytes]) -> tuple[asyncio.Server, int]:
    """A worker that precedes each answer with interim responses, asked for or not."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_skips_interim_responses() -> None:
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"\r\n{}",
    ]
    server, port = await _interim_worker(answers)
    pool = Pool("127.0.0.1", port, PoolLimits(read_timeout_s=5))
    try:
        first = await pool.request("POST", "/v2/models/m/infer", [], b"{}")
        assert (first.status, await first.read()) == (200, b"first")
        second = await pool.request("POST", "/v2/models/m/infer", [], b"{}")
        assert second.status == 404 and second.header(b"link") is None
        assert await second.read() == b"{}"
        assert pool.statistics()["connects"] == 1  # one keep-alive connection for both
    finally:
        await pool.aclose()
        server.close()


def test_request_targets_cannot_smuggle_headers() -> None:
    assert safe_target("/v2/models/simple/infer?x=1") == "/v2/models/simple/infer?x=1"
    assert safe_target("/v2/models/a b\r\nX-Evil: 1/ready") == \
        "/v2/models/a%20b%0D%0AX-Evil:%201/ready"
    assert safe_target("/v2/models/é") == "/v2/models/%C3%A9"


# ------------------------------------------------------------------ 6. hostile input


def test_header_bounds_431(open_gateway: GatewayProcess) -> None:
    url = open_gateway.url + "/v2/models/simple/infer"
    r = httpx.post(url, content=infer_body(), timeout=10,
                   headers={"X-Big": "a" * (DEFAULT_MAX_HEADER_BYTES + 1)})
    assert_json_error(r, 431)
    assert r.headers.get("x-request-id")
    many = [(f"X-H{i}", "1") for i in range(DEFAULT_MAX_HEADERS + 1)]
    r = httpx.post(url, content=infer_body(), headers=many, timeout=10)
    assert_json_error(r, 431)
    # just within both bounds: served
    fits = [(f"X-H{i}", "1") for i in range(DEFAULT_MAX_HEADERS - 10)]
    r = httpx.post(url, content=infer_body(), headers=fits, timeout=10)
    assert r.status_code == 200, r.text
    # a 1 MB and a 16 MB header: refused before the head is buffered, still as JSON
    for size in (1 << 20, 16 << 20):
        responses = http_exchange(open_gateway.port, request_bytes(
            "GET", "/v2/health/ready", [("X-Big", "a" * size)]), timeout_s=30)
        assert_json_error(final(responses), 431)
    assert httpx.get(open_gateway.url + "/v2/health/ready", timeout=10).status_code == 200
    assert_no_traceback(open_gateway)


def test_header_bounds_are_configurable(sim: SimFleetThread, tmp_path: Path) -> None:
    gw = start_gateway(base_config(sim.ports, upstream={"max_header_bytes": 200,
                                                        "max_headers": 5}), tmp_path)
    try:
        url = gw.url + "/v2/health/live"
        assert httpx.get(url, timeout=10).status_code == 200
        assert_json_error(httpx.get(url, headers={"X-A": "a" * 200}, timeout=10), 431)
        assert_json_error(httpx.get(url, headers=[(f"X-{i}", "1") for i in range(6)],
                                    timeout=10), 431)
    finally:
        gw.stop()


def test_server_layer_errors_are_triton_json(open_gateway: GatewayProcess) -> None:
    for payload in (b"GARBAGE\r\n\r\n", b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                    b"POST /v2/models/simple/infer HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                    b"GET /v2/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"):
        r = final(http_exchange(open_gateway.port, payload))
        assert_json_error(r, 400)
        assert len(r.header_all(b"date")) == 1
        assert r.header(b"x-request-id")


def test_one_date_header_per_answer(open_gateway: GatewayProcess,
                                    recorded_gateway: GatewayProcess) -> None:
    for method, path, body in (("POST", "/v2/models/simple/infer", infer_body()),
                               ("GET", "/v2/health/ready", b""),
                               ("GET", "/v2/models/simple", b""),
                               ("GET", "/v2/models/nope/ready", b""),
                               ("GET", "/status.json", b"")):
        r = final(http_exchange(open_gateway.port, request_bytes(method, path, body=body)))
        assert len(r.header_all(b"date")) == 1, (path, r.headers)
    # a worker that sends its own Date (as Triton does): relayed, and no second one added
    r = final(http_exchange(recorded_gateway.port, request_bytes(
        "POST", "/v2/models/simple/infer", body=infer_body())))
    assert r.status == 200 and len(r.header_all(b"date")) == 1, r.headers


def test_hostile_bodies_are_400_json_without_tracebacks(open_gateway: GatewayProcess) -> None:
    url = open_gateway.url
    deep = b"[" * 100_000 + b"]" * 100_000
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("/v2/models/simple/infer", deep, {}),
        ("/v2/models/simple/infer", b'{"parameters": {"priority": 1}, "x": ' + deep + b"}",
         {}),
        ("/v2/models/simple/infer", gzip.compress(deep), {"Content-Encoding": "gzip"}),
        ("/v2/models/simple/infer", b"\x1f\x8b\x08\x00broken", {"Content-Encoding": "gzip"}),
        ("/v2/models/simple/infer", b"x\x9cbroken", {"Content-Encoding": "deflate"}),
        ("/v2/models/simple/infer", infer_body(), {"Content-Encoding": "br"}),
        ("/v2/models/simple/infer", infer_body(), {"Inference-Header-Content-Length": "-1"}),
        ("/v2/models/simple/infer", infer_body(), {"Inference-Header-Content-Length": "x"}),
        ("/v2/models/simple/infer", infer_body(), {"X-Request-Timeout-Ms": "9" * 400}),
        ("/v2/repository/index", deep, {}),
        ("/v2/repository/index", b"{not json", {}),
        ("/v2/repository/index", b"\xff\xfe", {}),
    ]
    for path, body, headers in cases:
        r = httpx.post(url + path, content=body, headers=headers, timeout=20)
        assert r.status_code < 500 or r.status_code in (502, 503, 504), (path, r.text[:200])
        if r.status_code >= 400:
            assert_json_error(r, r.status_code)
    # the deep ones are the gateway's own 400s
    r = httpx.post(url + "/v2/models/simple/infer", content=deep, timeout=20)
    assert "nested too deeply" in assert_json_error(r, 400)
    r = httpx.post(url + "/v2/repository/index", content=deep, timeout=20)
    assert_json_error(r, 400)
    r = httpx.post(url + "/v2/models/simple/infer", content=infer_body(), timeout=20,
                   params={"a": "1"}, headers={"X-Request-Timeout-Ms": "9" * 400})
    assert r.status_code == 200, r.text
    assert_no_traceback(open_gateway)


# ------------------------------------------------------------------ 3. empty API keys


def test_empty_api_keys_authenticate_nobody(locked_gateway: GatewayProcess) -> None:
    url = locked_gateway.url + "/v2/models/simple/infer"
    for headers in ({}, {"X-Api-Key": ""}, {"X-Api-Key": "   "}, {"Authorization": "Bearer "},
                    {"Authorization": "Bearer    "}, {"Authorization": ""},
                    {"X-Api-Key": "", "Authorization": "Bearer "}):
        r = raw_post(locked_gateway.port, "/v2/models/simple/infer", headers, infer_body())
        assert_json_error(r, 401)
    for good in ({"X-Api-Key": TEAM_KEY}, {"Authorization": f"Bearer {TEAM_KEY}"}):
        ok = httpx.post(url, content=infer_body(), headers=good, timeout=10)
        assert ok.status_code == 200, ok.text
    assert_no_traceback(locked_gateway)
