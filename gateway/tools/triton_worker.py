"""One real Triton server (``tritonserver`` 2.51 from ``nvidia-pytriton``) serving CPU models.

``python -m gateway.tools.triton_worker --http-port P --grpc-port G --metrics-port M
--service-time-ms S [--per-item-ms X] [--name NAME] [--workdir DIR] [--parent-pid PID]``
starts the server in this process through PyTriton, blocks until SIGTERM or SIGINT and then
shuts Triton down cleanly (exit status 0; 1 if Triton died, 3 if a port was taken).
:mod:`gateway.tools.local` runs a fleet of these.

Models (all numpy on the CPU, every one batched with Triton's dynamic batcher):

============== =========================================================================
``add_sub``    INPUT0, INPUT1 FP32 [-1, 16] → OUTPUT0 = sum, OUTPUT1 = difference;
               max_batch_size 64; each execution sleeps ``service_time_ms +
               per_item_ms × batch`` so that a fleet can be made heterogeneous.
``strings``    TEXT BYTES [-1, 1] → UPPER BYTES [-1, 1] (upper-cased), LENGTH INT64 [-1, 1].
``identity``   five *optional* inputs INPUT_FP32, INPUT_FP16, INPUT_INT64, INPUT_BOOL,
               INPUT_BYTES, each [-1, -1]; every input sent comes back unchanged as
               OUTPUT_<TYPE> (exact round trips for client tests); max_batch_size 8.
               Triton refuses FP16 in JSON ("receiving FP16 data via JSON is not
               supported"): send FP16 binary. JSON BYTES are strings, so NUL bytes do
               not survive a JSON round trip; binary BYTES are exact.
``overhead``   INPUT FP32 [-1, 4] → OUTPUT = INPUT × 2; each execution sleeps 5 ms + 0.05 ms
               per item (the batching benchmark's fixed-overhead model); max_batch_size 64.
============== =========================================================================

What PyTriton needs, found by reading its source and measuring here:

* **libpython.** Triton's Python-backend stub links ``libpython3.11.so``; with the system's
  build instead of the running interpreter's, model initialisation crashes. The interpreter's
  ``sysconfig.get_config_var("LIBDIR")`` must come first in ``LD_LIBRARY_PATH`` of
  ``tritonserver``. ``tritonserver`` inherits ``os.environ``, so :func:`serve` puts it there
  before starting (the interpreter itself has already loaded its library; no re-exec needed).
* **Disk.** PyTriton copies the server (~29 MB) into a *workspace* and keeps its model store
  and ZeroMQ sockets there; without an explicit path it uses ``$PYTRITON_HOME`` or
  ``~/.cache/pytriton``. :func:`serve` puts the workspace (and ``PYTRITON_HOME``) under
  ``--workdir`` (default: a fresh temporary directory) and removes it on exit. The Python
  backend also creates shared-memory regions (``/dev/shm/pytrtion<pid>-*``, PyTriton's
  ``psm_*``), a copy of each model in ``/tmp/folderXXXXXX`` and an empty
  ``/tmp/python_env_XXXXXX`` (both paths hard-coded in Triton, ``TMPDIR`` is ignored). A
  clean exit removes them all; after a SIGKILL :mod:`gateway.tools.local` removes the regions and
  model copies it can attribute to the dead worker; the empty ``python_env`` dir remains.
* **Processes.** This Python process runs the model functions (one thread per model);
  ``tritonserver`` is its child (PyTriton sets PR_SET_PDEATHSIG=SIGTERM on it) and starts one
  ``triton_python_backend_stub`` per model. All stay in this process's group, so killing
  the group kills everything. A watchdog thread stops the server when its parent dies
  (``--parent-pid``, default the parent at start; 0 turns it off, e.g. under ``nohup``).
* **Time and memory** (measured on 2 shared cores): PyTriton loads the models one after
  the other, ~1.5 s each, so a worker is ready ~8 s after spawn (3 started together:
  ~10 s); a clean stop takes ~6 s. Each model costs a stub plus two helper processes
  (~50 MB PSS); a worker is 14 processes, ~270 MB PSS (~500 MB summed RSS). Sequential
  ``add_sub`` through ``tritonclient.http``: ~350 req/s at 0 ms service time, ~120 req/s
  at 5 ms.
* **Shutdown.** Triton waits for open HTTP keep-alive connections before it exits, up to
  ``--exit-timeout-secs`` (default 30 s): set to ``EXIT_TIMEOUT_S`` here.
* **Security.** PyTriton by default puts the repository, statistics, shared-memory, trace
  and logging endpoints behind a random token; ``TritonSecurityConfig(restricted_endpoints=
  [])`` makes the server behave like a stock ``tritonserver``. PyTriton loads models through
  the model-control API, so ``POST /v2/repository/index`` answers ``[]``; probe
  ``/v2/models/{m}/ready`` instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOG = logging.getLogger("gateway.tools.triton_worker")

DEFAULT_PER_ITEM_MS = 0.02
ADD_SUB_MAX_BATCH = 64
ADD_SUB_WIDTH = 16
STRINGS_MAX_BATCH = 64
IDENTITY_MAX_BATCH = 8
OVERHEAD_MAX_BATCH = 64
OVERHEAD_WIDTH = 4
OVERHEAD_FIXED_MS = 5.0
OVERHEAD_PER_ITEM_MS = 0.05
QUEUE_DELAY_US = 500
EXIT_TIMEOUT_S = 5
PARENT_POLL_S = 0.5
PORT_IN_USE_STATUS = 3

#: numpy type of the identity model's INPUT_<T> / OUTPUT_<T>, by Triton datatype T.
IDENTITY_DTYPES: dict[str, type[Any]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "BYTES": np.bytes_,
}
# One model per Python-backend stub process: each costs ~1.5 s of start-up and ~45 MB,
# hence one identity model with optional inputs rather than one model per datatype.
MODEL_NAMES: tuple[str, ...] = ("add_sub", "strings", "identity", "overhead")

Arrays = dict[str, np.ndarray[Any, Any]]
InferFn = Callable[[list[Any]], list[Arrays]]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    http_port: int
    grpc_port: int
    metrics_port: int
    service_time_ms: float = 0.0
    per_item_ms: float = DEFAULT_PER_ITEM_MS
    name: str = "triton"
    workdir: Path | None = None
    parent_pid: int | None = None
    host: str = "127.0.0.1"


def libpython_dir() -> str:
    """Directory of the running interpreter's ``libpython`` (first on LD_LIBRARY_PATH)."""
    return str(sysconfig.get_config_var("LIBDIR") or "")


def env_with_libpython_first(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose LD_LIBRARY_PATH starts with :func:`libpython_dir`."""
    libdir = libpython_dir()
    out = dict(env)
    if not libdir:
        return out
    rest = [p for p in out.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    out["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return out


# ---------------------------------------------------------------------------- models


def _sleep_ms(duration_ms: float) -> None:
    if duration_ms > 0:
        time.sleep(duration_ms / 1000.0)


def _batched(compute: Callable[[Arrays], Arrays],
             cost_ms: Callable[[int], float]) -> InferFn:
    """Run ``compute`` once over all requests of an execution, concatenated along dim 0.

    Triton's dynamic batcher hands over requests whose non-batch dimensions match, so
    concatenating and splitting by each request's own batch size is exact.
    """

    def infer(requests: list[Any]) -> list[Arrays]:
        sizes = [len(next(iter(r.data.values()))) for r in requests]
        names = list(requests[0].data)
        merged = {n: np.concatenate([r.data[n] for r in requests]) for n in names}
        _sleep_ms(cost_ms(sum(sizes)))
        outputs = compute(merged)
        results: list[Arrays] = []
        start = 0
        for size in sizes:
            results.append({k: v[start:start + size] for k, v in outputs.items()})
            start += size
        return results

    return infer


def _add_sub(inputs: Arrays) -> Arrays:
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    return {"OUTPUT0": a + b, "OUTPUT1": a - b}


def _upper(inputs: Arrays) -> Arrays:
    text = inputs["TEXT"]
    items = [bytes(t) for t in text.reshape(-1)]
    upper = np.array([t.upper() for t in items], dtype=np.object_).reshape(text.shape)
    length = np.array([len(t) for t in items], dtype=np.int64).reshape(text.shape)
    return {"UPPER": upper, "LENGTH": length}


def _identity(requests: list[Any]) -> list[Arrays]:
    return [{"OUTPUT_" + name.removeprefix("INPUT_"): value for name, value in r.data.items()}
            for r in requests]


def _overhead(inputs: Arrays) -> Arrays:
    return {"OUTPUT": inputs["INPUT"] * np.float32(2.0)}


def bind_models(triton: Any, service_time_ms: float, per_item_ms: float) -> None:
    """Bind every model of :data:`MODEL_NAMES` to a ``pytriton.triton.Triton``."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def config(max_batch: int) -> Any:
        return ModelConfig(max_batch_size=max_batch,
                           batcher=DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US))

    triton.bind(
        model_name="add_sub",
        infer_func=_batched(_add_sub, lambda n: service_time_ms + per_item_ms * n),
        inputs=[Tensor(name="INPUT0", dtype=np.float32, shape=(ADD_SUB_WIDTH,)),
                Tensor(name="INPUT1", dtype=np.float32, shape=(ADD_SUB_WIDTH,))],
        outputs=[Tensor(name="OUTPUT0", dtype=np.float32, shape=(ADD_SUB_WIDTH,)),
                 Tensor(name="OUTPUT1", dtype=np.float32, shape=(ADD_SUB_WIDTH,))],
        config=config(ADD_SUB_MAX_BATCH),
    )
    triton.bind(
        model_name="strings",
        infer_func=_batched(_upper, lambda n: 0.0),
        inputs=[Tensor(name="TEXT", dtype=np.bytes_, shape=(1,))],
        outputs=[Tensor(name="UPPER", dtype=np.bytes_, shape=(1,)),
                 Tensor(name="LENGTH", dtype=np.int64, shape=(1,))],
        config=config(STRINGS_MAX_BATCH),
    )
    triton.bind(
        model_name="identity",
        infer_func=_identity,
        inputs=[Tensor(name=f"INPUT_{t}", dtype=d, shape=(-1,), optional=True)
                for t, d in IDENTITY_DTYPES.items()],
        outputs=[Tensor(name=f"OUTPUT_{t}", dtype=d, shape=(-1,))
                 for t, d in IDENTITY_DTYPES.items()],
        config=config(IDENTITY_MAX_BATCH),
    )
    triton.bind(
        model_name="overhead",
        infer_func=_batched(_overhead, lambda n: OVERHEAD_FIXED_MS + OVERHEAD_PER_ITEM_MS * n),
        inputs=[Tensor(name="INPUT", dtype=np.float32, shape=(OVERHEAD_WIDTH,))],
        outputs=[Tensor(name="OUTPUT", dtype=np.float32, shape=(OVERHEAD_WIDTH,))],
        config=config(OVERHEAD_MAX_BATCH),
    )


# ---------------------------------------------------------------------------- server


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    # Reparenting (getppid changes) means the fleet's process died without stopping us.
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent_pid:
            LOG.warning("parent %d is gone; shutting down", parent_pid)
            stop.set()


def busy_ports(host: str, ports: Sequence[int]) -> list[int]:
    """Ports of ``ports`` that cannot be bound on ``host`` right now."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            # As the servers do: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def serve(opts: WorkerOptions, stop: threading.Event | None = None) -> int:
    """Start Triton with the models, block until ``stop`` is set (or Triton dies), stop it.

    Returns 0 after a requested stop, 1 when Triton died, 3 when a port is taken.
    """
    # PyTriton would wait minutes for a server that could not bind its port: check first.
    busy = busy_ports(opts.host, [opts.http_port, opts.grpc_port, opts.metrics_port])
    if busy:
        LOG.error("port(s) already in use on %s: %s", opts.host, busy)
        return PORT_IN_USE_STATUS
    os.environ.update(env_with_libpython_first(os.environ))
    stop = stop or threading.Event()
    own_tmp = None
    workdir = opts.workdir
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix=f"triton-{opts.name}-")
        workdir = Path(own_tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    # PyTriton reads PYTRITON_HOME at import time: keep it out of ~/.cache.
    os.environ["PYTRITON_HOME"] = str(workdir / "home")

    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    config = TritonConfig(
        http_address=opts.host, http_port=opts.http_port,
        grpc_address=opts.host, grpc_port=opts.grpc_port,
        metrics_address=opts.host, metrics_port=opts.metrics_port,
        allow_gpu_metrics=False, exit_timeout_secs=EXIT_TIMEOUT_S,
        log_file=workdir / "tritonserver.log", id=opts.name,
    )
    started = time.monotonic()
    triton = Triton(config=config, workspace=workdir / "workspace",
                    security_config=TritonSecurityConfig(restricted_endpoints=[]))
    try:
        bind_models(triton, opts.service_time_ms, opts.per_item_ms)
        triton.run()
        LOG.info("%s ready in %.1f s: http://%s:%d (metrics :%d, grpc :%d)", opts.name,
                 time.monotonic() - started, opts.host, opts.http_port, opts.metrics_port,
                 opts.grpc_port)
        print(f"READY {opts.name} http://{opts.host}:{opts.http_port}", flush=True)
        if opts.parent_pid:
            threading.Thread(target=_watch_parent, args=(opts.parent_pid, stop),
                             name="parent-watch", daemon=True).start()
        while not stop.wait(0.5):
            if not triton.is_alive():
                LOG.error("Triton exited unexpectedly")
                return 1
        return 0
    finally:
        LOG.info("%s stopping", opts.name)
        triton.stop()
        if own_tmp is not None:
            own_tmp.cleanup()
        LOG.info("%s stopped", opts.name)


def parse_args(argv: Sequence[str]) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python -m gateway.tools.triton_worker",
                                description="One real Triton server with the test models.")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--service-time-ms", type=float, default=0.0,
                   help="fixed sleep per add_sub execution")
    p.add_argument("--per-item-ms", type=float, default=DEFAULT_PER_ITEM_MS,
                   help="extra add_sub sleep per batch item")
    p.add_argument("--name", default="triton")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory (default: a fresh temporary directory)")
    p.add_argument("--parent-pid", type=int, default=os.getppid(),
                   help="stop when this process is no longer our parent (default: the "
                        "current parent; 0: never)")
    a = p.parse_args(list(argv))
    return WorkerOptions(http_port=a.http_port, grpc_port=a.grpc_port,
                         metrics_port=a.metrics_port, service_time_ms=a.service_time_ms,
                         per_item_ms=a.per_item_ms, name=a.name, workdir=a.workdir,
                         parent_pid=a.parent_pid)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        LOG.info("signal %d received", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return serve(opts, stop)


if __name__ == "__main__":
    sys.exit(main())
