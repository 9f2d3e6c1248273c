"""Run the gateway as a real server (a subprocess on loopback) for tests and benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.tools import procs
from gateway.tools.procs import free_port, http_get

__all__ = ["GatewayProcess", "free_port", "http_get"]

# `python -c _WITH_OPEN_FILES SOFT HARD cmd...`: exec cmd with RLIMIT_NOFILE SOFT:HARD (as
# `prlimit --nofile=SOFT:HARD cmd...` would).
_WITH_OPEN_FILES = ("import os, resource, sys; "
                    "resource.setrlimit(resource.RLIMIT_NOFILE, "
                    "(int(sys.argv[1]), int(sys.argv[2]))); "
                    "os.execv(sys.argv[3], sys.argv[3:])")


class GatewayProcess:
    """``python -m gateway serve`` with a YAML written from ``config`` into ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: Path, *,
                 env: dict[str, str] | None = None, args: Sequence[str] = (),
                 open_files: tuple[int, int] | None = None) -> None:
        self.config = dict(config)
        self.port = int(self.config.setdefault("listen", {}).get("port") or 0) or free_port()
        self.config["listen"] = {"host": "127.0.0.1", "port": self.port}
        self.workdir = workdir
        self.config_path = workdir / f"gateway-{self.port}.yaml"
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.env = env or {}
        self.args = list(args)  # more `serve` arguments, e.g. ["--processes", "3"]
        # The open-file limits (soft, hard) the gateway starts with (None: this process's).
        self.open_files = open_files
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, config: dict[str, Any] | None = None, raw: str | None = None) -> None:
        if config is not None:
            self.config = dict(config)
            self.config["listen"] = {"host": "127.0.0.1", "port": self.port}
        self.config_path.write_text(raw if raw is not None else yaml.safe_dump(self.config))

    def start(self, *, wait_ready: bool = True, timeout_s: float = 30.0) -> GatewayProcess:
        self.write_config()
        self.log_path.write_bytes(b"")
        limited = [] if self.open_files is None else \
            [sys.executable, "-c", _WITH_OPEN_FILES, *map(str, self.open_files)]
        self.proc = procs.start(
            [*limited, sys.executable, "-m", "gateway", "serve", "--config",
             str(self.config_path), *self.args],
            log_path=self.log_path, env=self.env)
        path = "/v2/health/ready" if wait_ready else "/v2/health/live"
        try:
            procs.wait_http_ready(self.url + path, timeout_s, proc=self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"gateway not {'ready' if wait_ready else 'live'}: {exc}:"
                               f"\n{self.log()}") from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        _, body = http_get(self.url + "/status.json")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def worker_status(self, worker_id: str) -> dict[str, Any]:
        for w in self.status()["workers"]:
            if w["id"] == worker_id:
                return dict(w)
        raise KeyError(worker_id)

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 15.0,
                 what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()}")

    def wait_workers_ready(self, count: int, timeout_s: float = 15.0) -> None:
        """Until ``/status.json`` counts ``count`` ready workers."""
        self.wait_for(lambda: self.status()["fleet"]["workers_ready"] == count, timeout_s,
                      what=f"{count} workers ready")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        return procs.stop(self.proc, timeout_s)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
