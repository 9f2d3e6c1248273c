"""gateway/ops/status.html rendered by a real headless Chromium against a loopback HTTP server
that serves the page at /status and a realistic /status.json; the test reads the DOM the
page produced, as a person would see it."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.tools import require_tool

PAGE = Path(__file__).resolve().parent.parent / "gateway" / "ops" / "status.html"
CHROMIUM = ("chromium", "chromium-browser")    # either name
GIB = 1024**3
MIB = 1024**2

pytestmark = pytest.mark.tool(*CHROMIUM)

NOW = time.time()

STATUS: dict[str, Any] = {
    "gateway": {"version": "0.1.0", "uptime_s": 93784.0, "config_generation": 3},
    "fleet": {"utilisation": 0.634, "headroom": 0.094, "saturation": 0.71,
              "arrival_rate_per_s": 412.5, "desired_replicas": {"reactive": 3, "predictive": 4},
              "workers_ready": 2, "workers_total": 3},
    "counters": {"requests": 123456, "ok": 120000, "rejected": 3210, "errors": 246},
    "workers": [
        {"id": "10.0.0.11:8000", "pool": "main", "state": "serving", "ready": True,
         "breaker": "closed", "score": 0.8125, "in_flight": 12, "slots": 64, "pending": 3.0,
         "gpu_free_bytes": 12.5 * GIB, "gpu_total_bytes": 80 * GIB, "gpu_utilisation": 0.42,
         "latency_ms": 12.34, "signals_age_s": 0.8, "models": ["add_sub", "strings"],
         "model_limits": {"add_sub": {"limit": 8, "units": 4, "static": 8, "in_flight": 3}}},
        {"id": "10.0.0.12:8000", "pool": "main", "state": "serving", "ready": True,
         "breaker": "half_open", "score": 0.25, "in_flight": 60, "slots": 64, "pending": 17.0,
         "gpu_free_bytes": 512 * MIB, "gpu_total_bytes": 24 * GIB, "gpu_utilisation": 0.97,
         "latency_ms": 187.0, "signals_age_s": 9.5, "models": ["add_sub"]},
        {"id": "10.0.0.13:8000", "pool": "spill", "state": "draining", "ready": False,
         "breaker": "open", "score": None, "in_flight": 0, "slots": 32, "pending": None,
         "gpu_free_bytes": None, "gpu_total_bytes": None, "gpu_utilisation": None,
         "latency_ms": None, "signals_age_s": None, "models": []},
    ],
    "limits": [
        {"name": "global", "scope": "global", "rate_per_s": 2000.0, "burst": 500.0,
         "available": 37.5},
        {"name": "tenant:acme", "scope": "local", "rate_per_s": 50.0, "burst": 50.0,
         "available": None},
    ],
    "rejections": [
        {"at": NOW - 5, "model": "add_sub", "reason": "rate_limited", "status": 429},
        {"at": NOW - 2, "model": "<script>alert(1)</script>", "reason": "overloaded",
         "status": 503},
    ],
}


class _Handler(BaseHTTPRequestHandler):
    status_body: bytes = b""
    status_code: int = 200
    status_json_hits = 0
    fail_after: int | None = None  # answers 503 once this many status.json were served

    def do_GET(self) -> None:
        if self.path in ("/status", "/status/"):
            self._send(200, "text/html; charset=utf-8", PAGE.read_bytes())
        elif self.path == "/status.json":
            type(self).status_json_hits += 1
            if self.fail_after is not None and self.status_json_hits > self.fail_after:
                self._send(503, "application/json", b'{"error":"draining"}')
            else:
                self._send(self.status_code, "application/json", self.status_body)
        else:
            self._send(404, "application/json", b'{"error":"Not Found"}')

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(status_code: int, body: bytes,
          fail_after: int | None = None) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status_body": body, "status_code": status_code,
                                            "fail_after": fail_after})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/status", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def chromium(url: str, *extra: str) -> str:
    browser = require_tool(*CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", *extra, url],
            capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Text(HTMLParser):
    """Visible text of a DOM dump, one string per table row or element."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.rows.setdefault(self._table, [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.rows[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.parts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def parse(dom: str) -> _Text:
    parser = _Text()
    parser.feed(dom)
    return parser


@pytest.fixture(scope="module")
def rendered() -> tuple[str, _Text]:
    with serve(200, json.dumps(STATUS).encode()) as (url, handler):
        dom = chromium(url, "--dump-dom")
        assert handler.status_json_hits >= 1
    return dom, parse(dom)


def test_header_tiles_show_the_fleet(rendered: tuple[str, _Text]) -> None:
    _, page = rendered
    text = page.text()
    assert "version 0.1.0" in text
    assert "uptime 1d 2h 03m" in text  # 93 784 s
    assert "config generation 3" in text
    assert "Fleet utilisation 63.4 %" in text
    assert "Headroom 9.4 %" in text
    assert "Saturation 71.0 %" in text
    assert "Arrival rate 413" in text  # 412.5 req/s, whole numbers above 100
    assert "Desired replicas 3 / 4" in text
    assert "Workers ready 2 / 3" in text and "1 not ready" in text
    assert "Requests 123,456" in text and "Rejected 3,210" in text
    assert "live" in text and "gateway unreachable" not in text


def test_workers_table(rendered: tuple[str, _Text]) -> None:
    dom, page = rendered
    head, *rows = page.rows["workers"]
    assert head[:4] == ["Worker", "Pool", "State", "Breaker"]
    by_id = {row[0]: dict(zip(head, row, strict=True)) for row in rows}
    assert set(by_id) == {"10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000"}
    healthy, half, dead = (by_id[f"10.0.0.1{i}:8000"] for i in (1, 2, 3))
    assert healthy["Breaker"] == "closed" and half["Breaker"] == "half-open"
    assert dead["Breaker"] == "open"
    assert healthy["State"] == "serving · ready" and dead["State"] == "draining"
    assert healthy["Score"] == "0.813" and dead["Score"] == "–"
    assert healthy["In flight / slots"] == "12 / 64"
    assert healthy["GPU memory free / total"] == "12.5 GiB / 80.0 GiB"
    assert half["GPU memory free / total"] == "512 MiB / 24.0 GiB"
    assert dead["GPU memory free / total"] == "no GPU"
    assert healthy["GPU util"] == "42.0 %" and healthy["Latency"] == "12.3 ms"
    assert half["Latency"] == "187 ms" and half["Signal age"] == "9.5 s"
    # a model with a learned limit shows its in-flight count over it
    assert healthy["Models"] == "add_sub (3/8), strings" and dead["Models"] == "–"
    # Rows are coloured by breaker state, and a stale signal is flagged.
    assert re.search(r'<tr class="w-open w-down" data-worker="10\.0\.0\.13:8000"', dom)
    assert re.search(r'<tr class="w-half_open" data-worker="10\.0\.0\.12:8000"', dom)
    assert 'class="num stale-signal"' in dom


def test_limits_and_rejections(rendered: tuple[str, _Text]) -> None:
    dom, page = rendered
    head, *limits = page.rows["limits"]
    assert head == ["Name", "Scope", "Rate", "Burst", "Available tokens"]
    assert limits == [["global", "global", "2,000 /s", "500", "37.5"],
                      ["tenant:acme", "local", "50.0 /s", "50", "n/a"]]
    head, *rejections = page.rows["rejections"]
    assert head == ["Time", "Model", "Reason", "Status"]
    assert [r[1:] for r in rejections] == [["<script>alert(1)</script>", "overloaded", "503"],
                                           ["add_sub", "rate_limited", "429"]]  # newest first
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", r[0]) for r in rejections)
    text = page.text()
    assert "Recent rejections last 2 — " in text
    assert "rate_limited 429 ×1" in text and "overloaded 503 ×1" in text
    # Client-supplied text is shown as text, never parsed as markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_an_unreachable_gateway_is_shown() -> None:
    with serve(502, b'{"error":"upstream"}') as (url, _handler):
        page = parse(chromium(url, "--dump-dom"))
    text = page.text()
    assert "gateway unreachable: HTTP 502" in text
    assert "unreachable" in text and "no data yet" in text


def test_last_data_stays_visible_but_dimmed_when_the_gateway_goes_away() -> None:
    with serve(200, json.dumps(STATUS).encode(), fail_after=1) as (url, handler):
        dom = chromium(url, "--dump-dom")
        assert handler.status_json_hits >= 2  # polled again after 2 s
    text = parse(dom).text()
    assert re.search(r"gateway unreachable: HTTP 503 — showing data from \d\d:\d\d:\d\d", text)
    assert "10.0.0.11:8000" in text  # the last good data is still there
    assert '<main id="main" class="stale">' in dom


def test_page_is_self_contained() -> None:
    html = PAGE.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.I)
    assert "<link" not in html.lower()
    assert re.findall(r"fetch\(([^,)]+)", html) == ["SOURCE"]
    assert 'var SOURCE = "/status.json";' in html
    assert "innerHTML" not in html  # data is inserted as text only


def test_screenshot(tmp_path: Path) -> None:
    """A screenshot for a person to look at (kept in /tmp/status-page.png)."""
    with serve(200, json.dumps(STATUS).encode()) as (url, _handler):
        shot = tmp_path / "status.png"
        chromium(url, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000
    shutil.copy(shot, Path(tempfile.gettempdir()) / "status-page.png")
