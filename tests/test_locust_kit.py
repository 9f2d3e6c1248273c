"""The Locust kit (loadtest/): real headless Locust runs against real KServe v2 servers.

Locust monkey-patches the process with gevent on import, so nothing here imports it: the
kit runs as a subprocess (``loadtest.run``), and the load shapes and profile parsing are
probed by a short Python subprocess that prints JSON.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.tools import procs
from gateway.tools.procs import free_port
from loadtest.run import outputs_for, run_locust, summarise

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90.0


@contextlib.contextmanager
def server_process(command: list[str], ready_url: str) -> Iterator[None]:
    process = procs.start(command, cwd=ROOT, new_session=True)
    try:
        procs.wait_http_ready(ready_url, READY_TIMEOUT_S, proc=process, poll_s=0.2)
        yield
    finally:
        procs.stop(process, 20, group=True)


@pytest.fixture(scope="module")
def kserve_server() -> Iterator[tuple[str, str]]:
    """A real KServe v2 server: the project's Triton simulator when present, else a real
    Triton (``gateway.tools.triton_worker``, PyTriton). Yields (URL, model mix for ``--models``)."""
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    if importlib.util.find_spec("gateway.sim.cli") is not None:
        command = [sys.executable, "-m", "gateway", "sim", "--workers", "1",
                   "--base-port", str(http_port)]
        model_mix, ready_model = "simple=1", "simple"
    elif importlib.util.find_spec("gateway.tools.triton_worker") is not None:
        command = [sys.executable, "-m", "gateway.tools.triton_worker",
                   "--http-port", str(http_port),
                   "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
                   "--service-time-ms", "1", "--parent-pid", str(os.getpid())]
        model_mix, ready_model = "add_sub=3,strings=1", "strings"
    else:
        pytest.skip("neither gateway.sim nor gateway.tools.triton_worker is available")
    with server_process(command, f"{url}/v2/models/{ready_model}/ready"):
        yield url, model_mix


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_headless_run_against_a_real_server(kserve_server: tuple[str, str],
                                            tmp_path: Path) -> None:
    url, model_mix = kserve_server
    outputs = run_locust(url, duration_s=6, users=4, spawn_rate=4, out=tmp_path / "locust",
                         extra=("--models", model_mix, "--think-time-s", "0.02,0.05"),
                         quiet=True)
    assert outputs.returncode == 0
    for path in outputs.paths():
        assert path.exists(), path
    summary = summarise(outputs)
    assert summary.successes > 0
    assert summary.failures == 0

    stats = read_csv(outputs.stats_csv)
    by_type = {row["Type"] for row in stats if row["Name"] != "Aggregated"}
    assert by_type == {"triton", "POST"}  # both users made requests
    names = {row["Name"] for row in stats}
    assert "Aggregated" in names
    assert all(":" in n for n in names - {"Aggregated"})  # "<model>:<priority>"
    aggregated = next(row for row in stats if row["Name"] == "Aggregated")
    # Locust rewrites the CSV once a second, so its last rows may miss the final moment.
    assert 0 < int(aggregated["Request Count"]) <= summary.requests

    history = read_csv(outputs.history_csv)  # what `gateway plan --from-locust` reads
    assert history and {"Timestamp", "User Count", "Requests/s", "Failures/s",
                        "Total Request Count"} <= history[0].keys()
    assert {row["Name"] for row in history} == {"Aggregated"}
    assert int(history[-1]["Total Request Count"]) > 0
    assert "<html" in outputs.html.read_text()[:2000].lower()


class _Rejecting(BaseHTTPRequestHandler):
    """Answers every inference like an overloaded gateway: 429 or 503, Triton error JSON."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            type(self).count += 1
            status = 429 if type(self).count % 2 else 503
        body = json.dumps({"error": "rejected by test server"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_rejections_are_failures_named_by_status(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Rejecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        outputs = run_locust(url, duration_s=3, users=2, spawn_rate=2, out=tmp_path / "locust",
                             extra=("--think-time-s", "0.02,0.05"), quiet=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    summary = summarise(outputs)
    assert summary.requests > 0 and summary.failures == summary.requests
    failures = read_csv(outputs.failures_csv)
    errors = {(row["Method"], row["Error"]) for row in failures}
    for method in ("triton", "POST"):
        assert (method, "RejectedError('HTTP 429 Too Many Requests')") in errors
        assert (method, "RejectedError('HTTP 503 Service Unavailable')") in errors


PROBE = textwrap.dedent("""
    import json, sys
    from argparse import Namespace
    from loadtest import shapes
    from loadtest import locustfile as kit

    out = {}
    for name in ("step", "spike", "diurnal"):
        shape = shapes.SHAPES[name]()
        out[name] = [shape.plan(t, 100, 60.0) for t in range(0, 61, 3)]
    profile = kit.load_profile(kit.DEFAULT_PROFILE)
    out["models"] = [m.name for m in profile.active_models()]
    out["tenants"] = [t.key for t in profile.tenants]
    options = Namespace(models="simple=2,custom=1", api_keys="k1=3,k2", priorities="critical",
                        think_time_s="0.1,0.3")
    over = kit.apply_options(profile, options)
    out["over_models"] = [[m.name, m.weight, [i.name for i in m.inputs]] for m in over.models]
    out["over_tenants"] = [[t.key, t.weight] for t in over.tenants]
    out["over_priorities"] = over.priorities
    out["over_think"] = list(over.think_time_s)
    out["pick"] = kit.Mix(over, __import__("random").Random(1)).pick().headers
    errors = []
    for bad in ({"models": {"m": {"weight": 1, "inputs": [{"name": "X", "datatype": "F32",
                                                             "shape": [1]}]}}},
                {"models": {"m": {"weight": 0, "inputs": []}}},
                {"models": {"m": {"inputs": []}}, "priorities": {"urgent": 1}}):
        try:
            kit.parse_profile(bad)
        except kit.ProfileError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          timeout=60, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_step_shape_climbs_in_stairs_to_the_peak(probe: dict[str, Any]) -> None:
    plan = probe["step"]
    users = [p[0] for p in plan[:-1]]
    assert users == sorted(users)
    assert users[0] == 20 and users[-1] == 100
    assert len(set(users)) == 5
    assert plan[-1] is None  # the curve ends the test at the duration


def test_spike_shape_is_a_herd_after_a_quiet_baseline(probe: dict[str, Any]) -> None:
    plan = probe["spike"]
    at = {t: p for t, p in zip(range(0, 61, 3), plan, strict=True)}
    assert at[0] == [10, 100.0] and at[15] == [10, 100.0]
    assert at[18] == [100, 100.0] and at[33] == [100, 100.0]  # all users within a second
    assert at[36] == [10, 100.0] and at[57] == [10, 100.0]
    assert at[60] is None


def test_diurnal_shape_peaks_around_midday(probe: dict[str, Any]) -> None:
    users = [p[0] for p in probe["diurnal"][:-1]]
    assert users[0] == 10  # night floor
    assert max(users) >= 90
    peak = users.index(max(users))
    assert 6 <= peak <= 14  # between 07:00 and 17:00 of the compressed day
    assert users[-1] < 20


def test_profile_and_command_line_overrides(probe: dict[str, Any]) -> None:
    assert probe["models"] == ["add_sub", "strings"]
    assert probe["tenants"] == ["acme-demo-key", "globex-demo-key", "batch-demo-key"]
    assert probe["over_models"] == [["simple", 2.0, ["INPUT0"]],
                                    ["custom", 1.0, ["INPUT0", "INPUT1"]]]
    assert probe["over_tenants"] == [["k1", 3.0], ["k2", 1.0]]
    assert probe["over_priorities"] == {"critical": 1.0}
    assert probe["over_think"] == [0.1, 0.3]
    assert probe["pick"]["X-Priority"] == "critical"
    assert probe["pick"]["Authorization"] in ("Bearer k1", "Bearer k2")
    assert probe["errors"][0].startswith("models.m.inputs[0].datatype")
    assert probe["errors"][1].startswith("models: at least one model")
    assert probe["errors"][2].startswith("priorities")


def test_output_names_are_locusts_standard_ones(tmp_path: Path) -> None:
    out = outputs_for(tmp_path / "locust")
    assert out.history_csv.name == "locust_stats_history.csv"
    assert out.stats_csv.name == "locust_stats.csv"
    assert out.failures_csv.name == "locust_failures.csv"
    assert out.json.name == "locust.json" and out.html.name == "locust.html"


def test_locustfile_works_from_its_own_folder(tmp_path: Path) -> None:
    """The Locust container mounts only loadtest/; the locustfile then imports ``shapes``
    beside it instead of ``loadtest.shapes``."""
    for name in ("locustfile.py", "shapes.py", "profile.yaml"):
        (tmp_path / name).write_bytes((ROOT / "loadtest" / name).read_bytes())
    code = ("import locustfile as kit; print(kit.shapes.__name__, "
            "[m.name for m in kit.current_profile().active_models()])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["shapes", "['add_sub',", "'strings']"]
