"""Fuzzing the running gateway (issue 13): Hypothesis-generated requests — methods, paths
(KServe v2 ones, variants and junk), header sets and sizes, bodies (JSON, binary tensors
with right and wrong ``Inference-Header-Content-Length``, gzip/deflate valid and broken,
deep nesting, bombs) — sent over raw sockets to a gateway subprocess in front of the
simulator. For every request:

* what comes back parses as HTTP and has a final response;
* no 5xx but 502/503/504 (the simulator never answers 500, so any 500 is the gateway's);
* every error answer is Triton's ``{"error": "..."}`` JSON (health probes' empty 400 and
  answers to HEAD excepted);
* nothing the request did put a traceback in the gateway's log.

Afterwards the process is alive and ``/v2/health/ready`` answers 200.

Profiles (``HYPOTHESIS_PROFILE``): ``fast`` (default, well under a minute) and ``deep``.
A request that once broke something is kept in ``tests/data/fuzz_corpus/*.json`` (format:
:func:`build_request`) and replayed by ``test_corpus_case``; a failing fuzz example prints
its case in that format, ready to be saved there.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sim.core import SimModel, WorkerSpec
from gateway.sim.server import SimFleetThread
from gateway.tools.gatewayproc import GatewayProcess
from tests.test_security import ADMIN_TOKEN, TENANTS, RawResponse, http_exchange

CORPUS = Path(__file__).parent / "data" / "fuzz_corpus"
MAX_BODY_BYTES = 512 * 1024
PROFILES = {
    "fast": settings(max_examples=500, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck)),
    "deep": settings(max_examples=5000, deadline=None,
                     suppress_health_check=list(HealthCheck)),
}
PROFILE = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "fast"), PROFILES["fast"])
MODELS = ("simple", "batched", "costed")

Case = dict[str, Any]


# ------------------------------------------------------------------ the case format


def _bytes_of(spec: Any) -> bytes:
    """A body or header value: a string (latin-1), ``{"b64": ...}``, ``{"repeat": s,
    "times": n}``, or a list of those, concatenated."""
    if isinstance(spec, str):
        return spec.encode("latin-1")
    if isinstance(spec, list):
        return b"".join(_bytes_of(part) for part in spec)
    if "b64" in spec:
        return base64.b64decode(spec["b64"])
    return _bytes_of(spec["repeat"]) * int(spec["times"])


def _compress(body: bytes, how: str | None) -> bytes:
    if how == "gzip":
        return gzip.compress(body, mtime=0)
    if how == "deflate":
        return zlib.compress(body)
    if how == "raw-deflate":
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return c.compress(body) + c.flush()
    return body


def build_request(case: Case) -> bytes:
    """The raw bytes of a case::

        {"method": "POST", "target": "/v2/models/simple/infer",
         "headers": [["X-Priority", "critical"], ["X-Big", {"repeat": "a", "times": 9}]],
         "body": <bytes spec>, "compress": "gzip" | "deflate" | "raw-deflate" | null,
         "truncate": <bytes cut from the end after compressing>,
         "raw": <bytes spec: sent as it is instead of all the above>,
         "note": "what it broke", "expect_status": 400}

    Content-Length and ``Connection: close`` are added; framing is never fuzzed here (a
    body shorter than announced would only wait for the read timeout)."""
    if "raw" in case:
        return _bytes_of(case["raw"])
    body = _compress(_bytes_of(case.get("body", "")), case.get("compress"))
    if case.get("truncate"):
        body = body[:-int(case["truncate"])]
    lines = [f"{case['method']} {case['target']} HTTP/1.1".encode("latin-1"), b"Host: gateway"]
    for name, value in case.get("headers", []):
        lines.append(name.encode("latin-1") + b": " + _bytes_of(value))
    if body or case["method"] in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ------------------------------------------------------------------ strategies

_TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7e)
_PATH_CHARS = st.sampled_from([*"abcxyz019_-.~/%:@!$&'()*+,;=?", "%00", "%0d%0a", "%20",
                               "%2F", "%25", "%ff", "%c3%a9", ".."])


def _rarely(draw: st.DrawFn, one_in: int = 5) -> bool:
    """True about once in ``one_in`` draws: most cases stay valid enough to get far."""
    return draw(st.integers(0, one_in - 1)) == 0


def _infer_doc(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.sampled_from([0, 64, 65, 1000])) if _rarely(draw) else \
        draw(st.integers(1, 4))
    dims = draw(st.sampled_from([15, 1, 0])) if _rarely(draw) else 16
    datatype = draw(st.sampled_from(["INT32", "BYTES", "BOOL", "FP16", "BF16", "XX"])) \
        if _rarely(draw) else "FP32"
    data: Any = [1.0] * (rows * dims)
    if datatype == "BYTES":
        data = ["ab"] * (rows * dims)
    elif datatype == "BOOL":
        data = [True] * (rows * dims)
    if _rarely(draw, 10):
        data = draw(st.sampled_from([None, "x", [[1.0]], {"a": 1}, [1.0] * 3]))
    name = draw(st.sampled_from(["nope", "", "INPUT1"])) if _rarely(draw, 10) else "INPUT0"
    tensor: dict[str, Any] = {"name": name, "shape": [rows, dims], "datatype": datatype,
                              "data": data}
    doc: dict[str, Any] = {"inputs": [tensor]}
    if _rarely(draw):
        doc["id"] = draw(st.one_of(st.text(max_size=20), st.integers(), st.none()))
    if _rarely(draw, 3):
        doc["parameters"] = draw(st.dictionaries(
            st.sampled_from(["priority", "timeout", "sequence_id", "sequence_start",
                             "sequence_end", "binary_data_output", "triton_x", "other"]),
            st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.booleans(),
                      st.text(max_size=10), st.none(), st.just(10**400), st.floats()),
            max_size=4))
    if _rarely(draw, 3):
        doc["outputs"] = [{"name": draw(st.sampled_from(["OUTPUT0", "OUTPUT0", "nope"])),
                           "parameters": {"binary_data": draw(st.booleans())}}]
    if _rarely(draw, 20):
        tensor["parameters"] = {"shared_memory_region": "r", "shared_memory_byte_size": 64}
    if _rarely(draw, 20):
        doc["inputs"] = draw(st.sampled_from([[], None, {}, [tensor, tensor]]))
    return doc


@st.composite
def bodies(draw: st.DrawFn) -> tuple[Any, list[list[Any]]]:
    """A body spec and the headers that go with it (some of them wrong on purpose)."""
    kind = draw(st.sampled_from(["infer", "infer", "infer", "binary", "binary"])) \
        if not _rarely(draw, 3) else \
        draw(st.sampled_from(["empty", "json", "deep", "bytes", "huge", "bomb"]))
    headers: list[list[Any]] = []
    if kind == "empty":
        return "", headers
    if kind == "infer":
        return json.dumps(_infer_doc(draw)), headers
    if kind == "binary":
        doc = _infer_doc(draw)
        if not isinstance(doc["inputs"], list) or not doc["inputs"]:
            return json.dumps(doc), headers
        tensor = doc["inputs"][0]
        count = tensor["shape"][0] * tensor["shape"][1]
        size = {"BYTES": 6, "BOOL": 1, "FP16": 2, "BF16": 2}.get(tensor["datatype"], 4)
        raw = (struct.pack("<I", 2) + b"ab") * count if tensor["datatype"] == "BYTES" \
            else b"\x00" * (count * size)
        if _rarely(draw):
            raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))] + \
                draw(st.binary(max_size=8))
        tensor.pop("data")
        tensor["parameters"] = {"binary_data_size": draw(st.sampled_from(
            [len(raw) + 1, 0, -1, 2**40, "x"])) if _rarely(draw) else len(raw)}
        header = json.dumps(doc).encode()
        hcl = draw(st.sampled_from([len(header) + 1, len(header) - 1, 0, -3,
                                    len(header) + len(raw) + 5])) \
            if _rarely(draw) else len(header)
        headers.append(["Inference-Header-Content-Length", str(hcl)])
        return {"b64": base64.b64encode(header + raw).decode()}, headers
    if kind == "json":
        leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=8))
        value = draw(st.recursive(leaf, lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                         max_size=4)), max_leaves=20))
        return json.dumps(value), headers
    if kind == "deep":
        depth = draw(st.sampled_from([900, 1000, 5000, 100_000]))
        opener = draw(st.sampled_from(["[", '{"a":', '{"parameters":{"priority":1,"x":']))
        closer = {"[": "]", '{"a":': "}", '{"parameters":{"priority":1,"x":': "}}"}[opener]
        return [{"repeat": opener, "times": depth}, "1", {"repeat": closer, "times": depth}], \
            headers
    if kind == "bytes":
        return {"b64": base64.b64encode(draw(st.binary(max_size=300))).decode()}, headers
    if kind == "huge":
        return {"repeat": " ", "times": MAX_BODY_BYTES + 1}, headers
    # a decompression bomb: small on the wire, past the body limit once inflated
    return {"repeat": "0", "times": 4 * MAX_BODY_BYTES}, [["X-Bomb", "1"]]


@st.composite
def targets(draw: st.DrawFn) -> str:
    model = draw(st.one_of(st.sampled_from(["nope", "x" * 300]),
                           st.lists(_PATH_CHARS, min_size=1, max_size=8).map("".join))) \
        if _rarely(draw) else draw(st.sampled_from(MODELS))
    version = draw(st.sampled_from(["/versions/1", "/versions/2", "/versions/x",
                                    "/versions/"])) if _rarely(draw) else ""
    action = draw(st.sampled_from(["", "/ready", "/config", "/stats", "/generate",
                                   "/generate_stream", "/infer/extra", "/"])) \
        if _rarely(draw, 3) else "/infer"
    known = st.sampled_from([
        "/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/v2/models/stats",
        "/v2/repository/index", "/v2/repository/models/simple/load",
        "/v2/repository/models/simple/unload", "/v2/repository/models//load",
        "/v2/systemsharedmemory/status", "/v2/cudasharedmemory/region/r/register",
        "/v2/trace/setting", "/v2/logging", "/metrics", "/status", "/status.json",
        "/admin/reload", "/admin/workers", "/", "*", "/v3/models/simple/infer",
        "//v2//models//simple//infer", "/v2/models", "/v2/models/"])
    path = draw(known) if _rarely(draw, 3) else f"/v2/models/{model}{version}{action}"
    if draw(st.integers(0, 4)) == 0:
        path += "?" + draw(st.lists(_PATH_CHARS, max_size=6).map("".join))
    return path


_HEADER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "Content-Type": st.sampled_from(["application/json", "application/octet-stream",
                                     "text/plain", ""]),
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "identity", "br", "gzip, gzip",
                                         "x-gzip", "GZIP", ""]),
    "Accept-Encoding": st.sampled_from(["gzip", "deflate", "br", "*", ""]),
    "Inference-Header-Content-Length": st.sampled_from(["0", "1", "-1", "abc", "99999999",
                                                        "1e3", " 5", "9" * 30]),
    "X-Priority": st.sampled_from(["critical", "standard", "sheddable", "CRITICAL", "banana",
                                   "", "critical,critical", "0"]),
    "X-Request-Timeout-Ms": st.sampled_from(["1", "0", "-5", "100", "soon", "9" * 400,
                                             "1.5", ""]),
    "X-Api-Key": st.sampled_from([*(t["keys"][0] for t in TENANTS.values()), "", " ", "x"]),
    "Authorization": st.sampled_from([f"Bearer {ADMIN_TOKEN}", "Bearer ", "Bearer",
                                      "Basic Zm9vOmJhcg==",
                                      *(f"Bearer {t['keys'][0]}" for t in TENANTS.values())]),
    "Expect": st.sampled_from(["100-continue", "banana"]),
    "X-Request-Id": st.one_of(st.text(_TOKEN_CHARS, max_size=20), st.just("a" * 200)),
}


@st.composite
def header_sets(draw: st.DrawFn) -> list[list[Any]]:
    names = draw(st.lists(st.sampled_from(sorted(_HEADER_VALUES)), max_size=3))
    headers: list[list[Any]] = [[n, draw(_HEADER_VALUES[n])] for n in names]
    headers += [["X-" + draw(st.text(st.characters(min_codepoint=0x41, max_codepoint=0x5a),
                                     min_size=1, max_size=10)),
                 draw(st.text(_TOKEN_CHARS, max_size=30))]
                for _ in range(draw(st.integers(0, 2)))]
    if _rarely(draw, 12):
        size = draw(st.sampled_from([16_000, 17_000, 70_000, 1 << 20]))
        headers.append(["X-Big", {"repeat": "a", "times": size}])
    if _rarely(draw, 12):
        count = draw(st.sampled_from([95, 101, 150]))
        headers += [[f"X-Many-{i}", "1"] for i in range(count)]
    return headers


@st.composite
def cases(draw: st.DrawFn) -> Case:
    if draw(st.integers(0, 19)) == 0:  # not HTTP at all, or barely
        raw = draw(st.sampled_from([
            "GARBAGE\r\n\r\n", "GET / HTTP/9.9\r\nConnection: close\r\n\r\n",
            "GET /v2 HTTP/1.1\r\nBad Header\r\n\r\n",
            "POST /v2/models/simple/infer HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /v2/models/simple/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            "Content-Length: 3\r\n\r\nabc",
            "GET /v2/\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "GET /v2/health/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: upgrade\r\n\r\n",
            "GET /v2/health/live HTTP/1.0\r\n\r\n"]))
        return {"raw": raw}
    body, body_headers = draw(bodies())
    headers = draw(header_sets()) + body_headers
    target = draw(targets())
    if _rarely(draw, 20):  # what llhttp does not know is the server layer's 400
        method = draw(st.text(st.characters(min_codepoint=0x41, max_codepoint=0x5a),
                              min_size=1, max_size=8))
    elif _rarely(draw, 4):
        method = draw(st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "POST"]))
    else:  # the method the endpoint takes
        posts = ("/infer", "/generate", "/generate_stream", "/load", "/unload", "/index")
        method = "POST" if target.split("?")[0].endswith(posts) else "GET"
    case: Case = {"method": method, "target": target, "headers": headers, "body": body}
    compress = draw(st.sampled_from([None, None, "gzip", "deflate", "raw-deflate"]))
    if compress is not None or ["X-Bomb", "1"] in headers:
        compress = compress or "gzip"
        case["compress"] = compress
        header = {"gzip": "gzip", "deflate": "deflate", "raw-deflate": "deflate"}[compress]
        case["headers"] = [*headers, ["Content-Encoding", draw(st.sampled_from(
            [header, header, "identity", "gzip" if header == "deflate" else "deflate"]))]]
        case["truncate"] = draw(st.sampled_from([0, 0, 1, 8]))
    return case


# ------------------------------------------------------------------ the gateway under test


class FuzzTarget:
    """A gateway in front of the simulator, and what each case's answer must satisfy."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self._log_offset = 0

    def new_log(self) -> str:
        with self.gw.log_path.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        return data.decode("utf-8", "replace")

    def check(self, case: Case) -> RawResponse:
        self.new_log()
        head_request = case.get("method") == "HEAD"
        shown = json.dumps(case)[:2000]
        try:
            responses = http_exchange(self.gw.port, build_request(case), timeout_s=15,
                                      head_request=head_request)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncase (save to tests/data/fuzz_corpus/): {shown}"
                                 ) from None
        finals = [r for r in responses if r.status >= 200]
        assert finals, f"no final answer ({[r.status for r in responses]}) to {shown}"
        r = finals[0]
        where = f"{r.status} {r.body[:300]!r}\ncase (save to tests/data/fuzz_corpus/): {shown}"
        assert r.status < 500 or r.status in (502, 503, 504), where
        if r.status >= 400 and not head_request and not _health_probe(case, r):
            assert r.header(b"content-type") == b"application/json", where
            doc = json.loads(r.body)
            assert isinstance(doc, dict) and isinstance(doc.get("error"), str), where
        assert len(r.header_all(b"date")) == 1, where
        log = self.new_log()
        assert "Traceback" not in log, f"{log[-3000:]}\n{where}"
        assert self.gw.proc is not None and self.gw.proc.poll() is None, where
        return r


def _health_probe(case: Case, r: RawResponse) -> bool:
    """Triton's health endpoints say "no" with an empty 400."""
    return str(case.get("target", "")).startswith("/v2/health/") and r.status == 400 \
        and not r.body


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    models = tuple(SimModel(name=m) for m in MODELS)
    with SimFleetThread([WorkerSpec(models=models)] * 2) as sim:
        cfg: dict[str, Any] = {
            "log_level": "info",
            "workers": [{"url": f"http://127.0.0.1:{p}", "metrics_url":
                         f"http://127.0.0.1:{p}/metrics"} for p in sim.ports],
            "models": {"simple": {}, "batched": {"batching": {"enabled": True}},
                       "costed": {"cost": "batch_size"}},
            "health": {"interval_s": 0.3, "rise": 1, "fall": 2, "timeout_s": 1.0},
            "scrape": {"interval_s": 0.5},
            "admin": {"token": ADMIN_TOKEN},
            "admission": {"tenants": TENANTS},
            "upstream": {"max_body_bytes": MAX_BODY_BYTES, "read_timeout_s": 10},
        }
        gw = GatewayProcess(cfg, tmp_path_factory.mktemp("fuzz")).start()
        try:
            gw.wait_for(lambda: gw.status()["fleet"]["workers_ready"] == 2,
                        what="workers ready")
            yield FuzzTarget(gw)
            assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
            r = httpx.get(gw.url + "/v2/health/ready", timeout=10)
            assert r.status_code == 200
            log = gw.log_path.read_text()
            assert "Traceback" not in log, log[-4000:]
        finally:
            gw.stop()


@PROFILE
@given(case=cases())
def test_fuzz_gateway(target: FuzzTarget, case: Case) -> None:
    target.check(case)


def test_gateway_serving_after_fuzz(target: FuzzTarget) -> None:
    r = httpx.post(target.gw.url + "/v2/models/simple/infer", timeout=10, content=json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                     "data": [1.0] * 16}]}).encode())
    assert r.status_code == 200, r.text
    assert httpx.get(target.gw.url + "/v2/health/ready", timeout=10).status_code == 200


def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.json"))


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.stem)
def test_corpus_case(target: FuzzTarget, path: Path) -> None:
    case: Case = json.loads(path.read_text())
    r = target.check(case)
    if "expect_status" in case:
        assert r.status == case["expect_status"], (r.status, r.body[:300], case.get("note"))
