"""``gateway demo`` and ``gateway loadtest`` as a person runs them: real Triton servers, the
gateway, Locust; then the plan. Every process the command starts carries a marker in its
environment, so the tests find exactly those (and nobody else's) in /proc afterwards."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.tools import procs
from gateway.tools.demo_view import (
    Frame,
    LiveView,
    histogram_quantile,
    parse_latency_buckets,
    render_frame,
    render_line,
)

# find_spec, not importorskip: importing locust monkey-patches this whole process with gevent
# (threads become greenlets), which hangs every later test that runs an event loop in a thread.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("locust") is None,
    reason="needs nvidia-pytriton and locust")

ROOT = Path(__file__).resolve().parent.parent
TAG_VAR = "GATEWAY_DEMO_TEST_TAG"
GIB = 1024**3


# ------------------------------------------------------------------ finding our processes


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose environment carries ``tag``."""
    marker = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            if marker not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            continue
        found.append((int(entry), cmdline.decode(errors="replace")))
    return found


def wait_no_processes(tag: str, timeout_s: float = 10.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_tagged(tag: str) -> None:
    """Last resort after a failed test: no process of ours may outlive it."""
    for pid, _ in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_command(args: list[str], out: Path, tag: str) -> subprocess.Popen[bytes]:
    return procs.start([sys.executable, "-m", "gateway", *args], log_path=out, cwd=ROOT,
                       env={TAG_VAR: tag, "TERM": "dumb"}, new_session=True)


def finish(proc: subprocess.Popen[bytes], tag: str) -> None:
    procs.stop(proc, signum=signal.SIGKILL, group=True)
    kill_tagged(tag)


# ------------------------------------------------------------------ the commands


@pytest.mark.timeout(200)
def test_demo_runs_to_the_plan_and_leaves_nothing(tmp_path: Path) -> None:
    tag, results, out = uuid.uuid4().hex, tmp_path / "demo", tmp_path / "out.txt"
    started = time.monotonic()
    proc = start_command(["demo", "--duration", "12", "--users", "10", "--workers", "2",
                          "--port", "0", "--out", str(results)], out, tag)
    try:
        code = proc.wait(timeout=180)
        took_s = time.monotonic() - started
        text = out.read_text(errors="replace")
        assert code == 0, text[-4000:]
        live = [line for line in text.splitlines() if line.startswith("[") and "RPS" in line]
        assert len(live) >= 8, text  # one line a second (TERM=dumb: no redraw)
        assert "triton-0" in live[-1] and "triton-1" in live[-1] and "cpu" in live[-1]
        assert "closed" in live[-1]  # breaker state
        assert "admitted" in live[-1] and "shed" in live[-1] and "desired" in live[-1]
        assert "Capacity plan" in text and "GPUs required" in text, text[-3000:]
        assert "Locust:" in text and f"results in {results}" in text
        for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv",
                     "locust.html", "locust.json", "status.json", "per_worker_points.json",
                     "gateway.log"):
            assert (results / name).exists(), name
        status = json.loads((results / "status.json").read_text())
        assert len(status["workers"]) == 2 and status["counters"]["ok"] > 0
        points = json.loads((results / "per_worker_points.json").read_text())["points"]
        assert points and all(p["throughput_rps"] > 0 for p in points)
        assert wait_no_processes(tag) == []
        print(f"demo took {took_s:.1f} s")
    finally:
        finish(proc, tag)


@pytest.mark.timeout(150)
def test_ctrl_c_during_the_spike_stops_everything(tmp_path: Path) -> None:
    tag, out = uuid.uuid4().hex, tmp_path / "out.txt"
    proc = start_command(["demo", "--duration", "60", "--users", "10", "--workers", "2",
                          "--port", "0", "--out", str(tmp_path / "demo")], out, tag)
    try:
        deadline = time.monotonic() + 90
        while "RPS" not in out.read_text(errors="replace"):  # the live view is running
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.2)
        time.sleep(2.0)
        running = " ".join(cmd for _, cmd in tagged_processes(tag))
        assert "tritonserver" in running and "triton_worker" in running
        assert "locust" in running
        asked = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=60)
        stopped_s = time.monotonic() - asked
        assert code == 130, out.read_text(errors="replace")[-3000:]
        assert "interrupted" in out.read_text(errors="replace")
        assert wait_no_processes(tag) == []
        assert stopped_s < 45, f"took {stopped_s:.1f} s to stop"
    finally:
        finish(proc, tag)


@pytest.mark.timeout(150)
def test_loadtest_writes_locust_reports_and_the_plan_command(tmp_path: Path) -> None:
    tag, results, out = uuid.uuid4().hex, tmp_path / "lt", tmp_path / "out.txt"
    proc = start_command(["loadtest", "--shape", "spike", "--duration", "6", "--users", "6",
                          "--workers", "1", "--port", "0", "--out", str(results)], out, tag)
    try:
        code = proc.wait(timeout=120)
        text = out.read_text(errors="replace")
        assert code == 0, text[-3000:]
        for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html",
                     "locust.json"):
            assert (results / name).exists(), name
        assert f"gateway plan --from-locust {results / 'locust_stats_history.csv'}" in text
        assert wait_no_processes(tag) == []
    finally:
        finish(proc, tag)


# ------------------------------------------------------------------ the view, from data

STATUS: dict[str, Any] = {
    "fleet": {"utilisation": 0.81, "queue_length": 5, "workers_ready": 2, "workers_total": 2,
              "desired_replicas": {"reactive": 3, "predictive": 4}},
    "counters": {"requests": 1000, "ok": 880, "rejected": 100, "errors": 20},
    "workers": [
        {"id": "127.0.0.1:9000", "state": "serving", "breaker": "closed", "in_flight": 2,
         "slots": 4, "pending": 3.0, "gpu_free_bytes": None, "gpu_total_bytes": None,
         "latency_ms": 4.25},
        {"id": "10.0.0.2:8000", "state": "serving", "breaker": "open", "in_flight": 0,
         "slots": 4, "pending": None, "gpu_free_bytes": 12 * GIB, "gpu_total_bytes": 80 * GIB,
         "latency_ms": None},
    ],
    "rejections": [{"status": 429, "reason": "rate_limited"},
                   {"status": 429, "reason": "rate_limited"},
                   {"status": 503, "reason": "overloaded"}],
}


def test_frame_shows_workers_counts_and_signals() -> None:
    frame = Frame(7.0, STATUS, 312.4, 48.0, names={"127.0.0.1:9000": "triton-0"})
    text = "\n".join(render_frame(frame, title="demo"))
    assert "triton-0" in text and "10.0.0.2:8000" in text
    assert "#####....." in text and "2 / 4" in text  # half the slots in use
    assert "cpu" in text and "12.0/80 GiB free" in text
    assert "open" in text and "closed" in text
    assert "admitted 880" in text and "shed 100 (10.0 %)" in text and "errors 20" in text
    assert "RPS 312" in text and "p99 48 ms" in text and "queue 5" in text
    assert "reactive 3, predictive 4" in text
    assert "429 rate_limited ×2, 503 overloaded ×1" in text
    line = render_line(frame)
    assert "\n" not in line and line.startswith("[   7 s] RPS 312 p99 48 ms admitted 880")
    assert "desired 3/4" in line and "triton-0 2/4" in line


def test_live_view_redraws_in_place_on_a_terminal_and_appends_otherwise() -> None:
    frame = Frame(1.0, STATUS, 10.0, 5.0)
    screen = io.StringIO()
    view = LiveView(screen, title="demo", redraw=True)
    view.show(frame)
    view.show(frame)
    rows = len(render_frame(frame, title="demo"))
    assert screen.getvalue().count(f"\x1b[{rows}F") == 1  # the second frame moves up once
    pipe = io.StringIO()
    LiveView(pipe, title="demo").show(frame)  # StringIO is no TTY: plain lines
    assert "\x1b" not in pipe.getvalue() and pipe.getvalue().count("\n") == 1


def test_waiting_frame_before_the_gateway_answers() -> None:
    frame = Frame(0.0, None, None, None, error="connection refused")
    assert "waiting for the gateway" in render_frame(frame, title="demo")[-1]
    assert "connection refused" in render_line(frame)


EXPOSITION = """\
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{le="0.01",model="add_sub"} 50.0
gateway_request_duration_seconds_bucket{le="0.1",model="add_sub"} 90.0
gateway_request_duration_seconds_bucket{le="+Inf",model="add_sub"} 100.0
gateway_request_duration_seconds_bucket{le="0.01",model="strings"} 0.0
gateway_request_duration_seconds_bucket{le="0.1",model="strings"} 10.0
gateway_request_duration_seconds_bucket{le="+Inf",model="strings"} 10.0
gateway_request_duration_seconds_count{model="add_sub"} 100.0
gateway_upstream_duration_seconds_bucket{le="0.01",model="add_sub"} 99.0
"""


def test_latency_buckets_are_summed_over_models() -> None:
    assert parse_latency_buckets(EXPOSITION) == {0.01: 50.0, 0.1: 100.0, float("inf"): 110.0}


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, {0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}, 0.01),
    (0.75, {0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}, 0.055),  # linear within a bucket
    (0.99, {0.01: 50.0, 0.1: 90.0, float("inf"): 100.0}, 0.1),  # beyond: the last bound
    (0.99, {0.01: 0.0, float("inf"): 0.0}, None),  # nothing observed
    (0.99, {}, None),
])
def test_histogram_quantile(q: float, buckets: dict[float, float],
                            expected: float | None) -> None:
    got = histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)
