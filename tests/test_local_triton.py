"""The embedded cluster: real Triton servers (nvidia-pytriton) managed by TritonFleet.

One 2-worker fleet is started for the module (~10 s on two shared cores); the tests talk
to it with the real ``tritonclient.http``. The tests that kill, restart and stop workers
come last, in file order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pytriton")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from gateway.core.config import parse_config  # noqa: E402
from gateway.tools import procs  # noqa: E402
from gateway.tools.local import (  # noqa: E402
    FleetError,
    TritonFleet,
    WorkerInfo,
    build_config_data,
    group_members,
)
from gateway.tools.triton_worker import (  # noqa: E402
    ADD_SUB_MAX_BATCH,
    IDENTITY_MAX_BATCH,
    OVERHEAD_MAX_BATCH,
    STRINGS_MAX_BATCH,
    env_with_libpython_first,
    libpython_dir,
)

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonFleet]:
    with TritonFleet(2, service_times_ms=[1.0, 2.0],
                     log_dir=tmp_path_factory.mktemp("triton-logs")) as f:
        yield f


def client(worker: WorkerInfo) -> Any:
    return httpclient.InferenceServerClient(url=worker.client_url, network_timeout=10.0)


def tensor(name: str, array: np.ndarray[Any, Any], datatype: str, binary: bool) -> Any:
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def as_bytes(item: object) -> bytes:
    # tritonclient gives BYTES elements as bytes (binary) or str (JSON).
    return item.encode() if isinstance(item, str) else bytes(item)  # type: ignore[call-overload]


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status), bytes(response.read())


def infer_add_sub(worker: WorkerInfo, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any],
                  binary: bool = True) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    c = client(worker)
    try:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("OUTPUT0", "OUTPUT1")]
        result = c.infer("add_sub", [tensor("INPUT0", a, "FP32", binary),
                                     tensor("INPUT1", b, "FP32", binary)], outputs=outputs)
        return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    finally:
        c.close()


# ---------------------------------------------------------------- pure helpers


def test_libpython_dir_goes_first_once() -> None:
    libdir = libpython_dir()
    assert libdir
    env = env_with_libpython_first({"LD_LIBRARY_PATH": f"/x:{libdir}:/y", "A": "1"})
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/x:/y"
    assert env["A"] == "1"
    assert env_with_libpython_first({})["LD_LIBRARY_PATH"] == libdir


def test_fleet_rejects_no_workers() -> None:
    with pytest.raises(ValueError):
        TritonFleet(0)


# ---------------------------------------------------------------- the models


def test_workers_ready_with_distinct_ports(fleet: TritonFleet) -> None:
    infos = fleet.workers
    assert len(infos) == 2 and all(w.is_running and w.pid for w in infos)
    assert len({w.ports.http for w in infos} | {w.ports.metrics for w in infos}) == 4
    assert [w.service_time_ms for w in infos] == [1.0, 2.0]
    for w in infos:
        assert http_get(f"{w.http_url}/v2/health/ready")[0] == 200
        assert w.log_path.exists()


@pytest.mark.parametrize("binary", [True, False])
def test_add_sub_on_every_worker(fleet: TritonFleet, binary: bool) -> None:
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    for w in fleet.workers:
        total, diff = infer_add_sub(w, a, b, binary)
        np.testing.assert_allclose(total, a + b, rtol=1e-6)
        np.testing.assert_allclose(diff, a - b, rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_strings_bytes_round_trip(fleet: TritonFleet, binary: bool) -> None:
    words = [b"hello", b"Triton gateway", b"", "d\xc3\xa9j\xc3\xa0".encode()]
    text = np.array(words, dtype=np.object_).reshape(-1, 1)
    c = client(fleet.workers[0])
    try:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
                   for n in ("UPPER", "LENGTH")]
        result = c.infer("strings", [tensor("TEXT", text, "BYTES", binary)], outputs=outputs)
    finally:
        c.close()
    upper = result.as_numpy("UPPER")
    assert upper.shape == (4, 1)
    assert [as_bytes(u) for u in upper.reshape(-1)] == [w.upper() for w in words]
    assert result.as_numpy("LENGTH").reshape(-1).tolist() == [len(w) for w in words]


IDENTITY_CASES: dict[str, np.ndarray[Any, Any]] = {
    "FP32": np.array([[1.5, -2.25, 3.0e38], [0.0, -0.0, 1e-38]], dtype=np.float32),
    "FP16": np.array([[1.5, -2.25, 65504.0], [0.0, 6.1e-5, -1.0]], dtype=np.float16),
    "INT64": np.array([[2**62, -(2**62), 0], [1, -1, 7]], dtype=np.int64),
    "BOOL": np.array([[True, False, True], [False, False, True]], dtype=np.bool_),
    "BYTES": np.array([[b"a", b"bc", b"\x00\xff"], [b"", b"x y", b"z"]], dtype=np.object_),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", sorted(IDENTITY_CASES))
def test_identity_round_trip(fleet: TritonFleet, datatype: str, binary: bool) -> None:
    data = IDENTITY_CASES[datatype]
    if datatype == "BYTES" and not binary:
        # JSON carries BYTES as strings: keep to text that survives that.
        data = np.array([[b"a", b"bc", b"d"], [b"", b"x y", b"z"]], dtype=np.object_)
    c = client(fleet.workers[1])
    try:
        request = [tensor(f"INPUT_{datatype}", data, datatype, binary)]
        outputs = [httpclient.InferRequestedOutput(f"OUTPUT_{datatype}", binary_data=binary)]
        if datatype == "FP16" and not binary:
            # Triton itself refuses FP16 in JSON; clients must send it binary.
            with pytest.raises(InferenceServerException, match="FP16"):
                c.infer("identity", request, outputs=outputs)
            return
        result = c.infer("identity", request, outputs=outputs)
    finally:
        c.close()
    out = result.as_numpy(f"OUTPUT_{datatype}")
    assert out.shape == data.shape
    if datatype == "BYTES":
        assert [as_bytes(x) for x in out.reshape(-1)] == [as_bytes(x) for x in data.reshape(-1)]
    else:
        assert out.dtype == data.dtype
        np.testing.assert_array_equal(out, data)


def test_identity_several_inputs_at_once(fleet: TritonFleet) -> None:
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    flags = np.array([[True], [False]])
    c = client(fleet.workers[0])
    try:
        result = c.infer("identity", [tensor("INPUT_INT64", ints, "INT64", True),
                                      tensor("INPUT_BOOL", flags, "BOOL", True)])
    finally:
        c.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT_INT64"), ints)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT_BOOL"), flags)
    assert result.as_numpy("OUTPUT_FP32") is None


def test_overhead_model(fleet: TritonFleet) -> None:
    data = np.arange(32, dtype=np.float32).reshape(8, 4)
    c = client(fleet.workers[0])
    try:
        result = c.infer("overhead", [tensor("INPUT", data, "FP32", True)])
    finally:
        c.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), data * 2)


@pytest.mark.parametrize(("model", "max_batch"), [
    ("add_sub", ADD_SUB_MAX_BATCH), ("strings", STRINGS_MAX_BATCH),
    ("identity", IDENTITY_MAX_BATCH), ("overhead", OVERHEAD_MAX_BATCH)])
def test_model_config_reports_max_batch_size(fleet: TritonFleet, model: str,
                                             max_batch: int) -> None:
    status, body = http_get(f"{fleet.workers[0].http_url}/v2/models/{model}/config")
    assert status == 200
    config = json.loads(body)
    assert config["max_batch_size"] == max_batch
    assert "dynamic_batching" in config


def test_batch_larger_than_max_is_refused(fleet: TritonFleet) -> None:
    data = np.zeros((OVERHEAD_MAX_BATCH + 1, 4), dtype=np.float32)
    c = client(fleet.workers[0])
    try:
        with pytest.raises(InferenceServerException) as info:
            c.infer("overhead", [tensor("INPUT", data, "FP32", True)])
    finally:
        c.close()
    assert info.value.status() == "400"


def test_stock_endpoints_are_not_token_protected(fleet: TritonFleet) -> None:
    base = fleet.workers[0].http_url
    status, body = http_get(f"{base}/v2/models/stats")
    assert status == 200 and "model_stats" in json.loads(body)
    request = urllib.request.Request(f"{base}/v2/repository/index", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        # PyTriton loads models through the control API: the index is empty.
        assert json.loads(response.read()) == []


def test_metrics_serve_inference_series(fleet: TritonFleet) -> None:
    w = fleet.workers[0]
    infer_add_sub(w, np.ones((1, 16), np.float32), np.ones((1, 16), np.float32))
    status, body = http_get(w.metrics_url)
    text = body.decode()
    assert status == 200
    for series in ("nv_inference_request_success", "nv_inference_count",
                   "nv_inference_exec_count", "nv_inference_queue_duration_us",
                   "nv_inference_pending_request_count"):
        assert f'{series}{{model="add_sub",version="1"}}' in text, series
    assert "nv_gpu_utilization" not in text


def test_gateway_config_from_fleet_parses(fleet: TritonFleet) -> None:
    cfg = parse_config(fleet.gateway_config_dict(0))
    assert [w.url for w in cfg.workers] == fleet.http_urls
    assert [w.resolved_metrics_url() for w in cfg.workers] == fleet.metrics_urls
    assert set(cfg.models) == set(fleet.models)  # not in the repository index: probed
    base = {"listen": {"port": 9999}, "discovery": {"dns_name": "x"},
            "workers": [{"url": "http://10.0.0.1:8000"}], "routing": {"policy": "round_robin"},
            "models": {"overhead": {"batching": {"enabled": True}}}}
    data = build_config_data(fleet, None, base)
    cfg = parse_config(data)
    assert cfg.listen.port == 9999 and cfg.discovery is None
    assert cfg.model("overhead").batching.enabled and set(cfg.models) == set(fleet.models)
    assert cfg.routing.policy == "round_robin"
    assert [w.url for w in cfg.workers] == fleet.http_urls
    assert parse_config(build_config_data(fleet, 0, base)).listen.port == 0


# ---------------------------------------------------------------- failures and shutdown


def test_kill_then_restart_one_worker(fleet: TritonFleet) -> None:
    victim, survivor = fleet.workers[1], fleet.workers[0]
    assert victim.pid is not None
    fleet.kill(1)
    assert not fleet.worker(1).is_running and fleet.worker(1).pid is None
    assert group_members(victim.pid) == []
    with pytest.raises(OSError):
        http_get(f"{victim.http_url}/v2/health/live")
    ones = np.ones((2, 16), np.float32)
    assert infer_add_sub(survivor, ones, ones)[0].sum() == 64

    back = fleet.restart(1)
    assert back.is_running and back.pid not in (None, victim.pid)
    assert back.http_url == victim.http_url and back.starts == 2
    assert infer_add_sub(back, ones, ones)[1].sum() == 0


def _triton_processes(pgids: set[int], marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        if int(fields[2]) in pgids or marker in cmdline:
            found.append(f"{entry} {cmdline[:120]}")
    return found


async def test_stop_leaves_no_processes(fleet: TritonFleet) -> None:
    pgids = {w.pid for w in fleet.workers if w.pid is not None}
    assert len(pgids) == 2
    members = [pid for pgid in pgids for pid in group_members(pgid)]
    names = {Path(f"/proc/{pid}/exe").resolve().name for pid in members}
    assert {"tritonserver", "triton_python_backend_stub"} <= names
    marker = str(fleet.scratch_dir)  # every worker's files live under it
    await fleet.astop()  # the async face: stop() in a thread
    assert _triton_processes(pgids, marker) == []
    assert not Path(marker).exists()
    assert all(not w.is_running for w in fleet.workers)
    fleet.stop()  # idempotent


def test_startup_failure_is_reported(tmp_path: Path) -> None:
    # A worker that cannot bind its port exits; with a fixed base port that is an error.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        fleet = TritonFleet(1, base_port=port, startup_timeout_s=60, log_dir=tmp_path)
        with pytest.raises(FleetError, match="exited"):
            fleet.start()
    assert fleet.workers[0].pid is None


def _wait_for_line(path: Path, prefix: str, proc: subprocess.Popen[bytes],
                   timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        time.sleep(0.2)
    raise AssertionError(f"no {prefix!r} line; output:\n{path.read_text(errors='replace')}")


def test_gateway_local_command_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = procs.free_port()
    out = tmp_path / "out.txt"
    proc = procs.start([sys.executable, "-m", "gateway", "local", "--workers", "1",
                        "--service-times", "1", "--port", str(port)],
                       log_path=out, new_session=True)
    try:
        logs_line = _wait_for_line(out, "worker logs", proc, 90)
        scratch = str(Path(logs_line.split()[-1]).parent)
        _wait_for_line(out, "gateway ", proc, 30)
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=10.0)
        ones = np.ones((1, 16), np.float32)
        try:
            deadline = time.monotonic() + 20
            while True:  # until the gateway has probed the worker ready
                try:
                    result = c.infer("add_sub", [tensor("INPUT0", ones, "FP32", True),
                                                 tensor("INPUT1", ones, "FP32", True)])
                    break
                except InferenceServerException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            c.close()
        assert result.as_numpy("OUTPUT0").sum() == 32
        assert _triton_processes(set(), scratch) != []
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert proc.wait(timeout=60) in (0, 130)
        assert _triton_processes(set(), scratch) == []
        assert not Path(scratch).exists()
    finally:
        procs.stop(proc, signum=signal.SIGKILL, group=True)
