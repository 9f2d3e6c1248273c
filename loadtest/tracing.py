"""What tracing costs: the gateway's CPU per request with tracing off, on with nothing
sampled, and on with every request sampled.

    python -m loadtest.tracing [--rounds 5] [--duration 4]

A fast upstream (nginx answering a fixed KServe v2 infer response, as in
``loadtest.overhead``) behind three gateways that differ only in their ``tracing`` section;
their spans go to a loopback OTLP sink that answers 200 and keeps nothing. Each round runs
``wrk`` against each gateway in turn and reads the gateway process's CPU time (user +
system, ``/proc/<pid>/stat``) before and after: CPU per request = CPU seconds / requests
answered. Rounds interleave the three, so a neighbour's burst hits them alike; the table
gives each one's median and the ratio to tracing off. Writes ``results/tracing.json``.
Needs nginx and wrk; Linux (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from gateway.tools.procs import free_port, stop_all
from loadtest.overhead import BODY, INFER_PATH, start_nginx, wait_http
from loadtest.results import write_results

VARIANTS: dict[str, float | None] = {"off": None, "on, ratio 0": 0.0, "on, ratio 1": 1.0}


class OtlpSink:
    """Answers every OTLP/HTTP export 200 and keeps nothing (the collector's cost is not
    the gateway's)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_requests(tmp: Path, port: int, duration_s: float, connections: int) -> int:
    script = tmp / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{BODY}]]\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "-s",
                          str(script), f"http://127.0.0.1:{port}{INFER_PATH}"],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"(\d+) requests in", out)
    if found is None:
        raise RuntimeError(f"wrk printed no request count: {out}")
    return int(found.group(1))


def gateway_yaml(port: int, upstream: int, otlp_url: str, ratio: float | None) -> str:
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port}, "log_level": "warning",
        "workers": [{"url": f"http://127.0.0.1:{upstream}",
                     "metrics_url": f"http://127.0.0.1:{upstream}/metrics", "slots": 1024}],
        "admission": {"breaker": {"enabled": False}, "retry": {"max_attempts": 1}},
    }
    if ratio is not None:
        cfg["tracing"] = {"otlp_endpoint": otlp_url, "sample_ratio": ratio}
    return yaml.safe_dump(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default="results/tracing.json")
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"tracing: {tool} is required (apt-get install -y {tool})", file=sys.stderr)
            return 2
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs, 15.0)
        sink = OtlpSink()
        stack.callback(sink.close)
        upstream = free_port()
        procs.append(start_nginx(tmp, upstream))
        gateways: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        for i, (name, ratio) in enumerate(VARIANTS.items()):
            port = free_port()
            cfg = tmp / f"gateway-{i}.yaml"
            cfg.write_text(gateway_yaml(port, upstream, sink.url, ratio))
            with open(tmp / f"gateway-{i}.log", "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                         str(cfg)], stdout=subprocess.DEVNULL, stderr=log)
            procs.append(proc)
            wait_http(port, "/v2/health/ready")
            gateways[name] = (port, proc)
        time.sleep(1.0)
        for _ in range(args.rounds):
            for name, (port, proc) in gateways.items():
                wrk_requests(tmp, port, 1.0, args.connections)  # warm
                before = cpu_seconds(proc.pid)
                answered = wrk_requests(tmp, port, args.duration, args.connections)
                samples[name].append((cpu_seconds(proc.pid) - before) / answered * 1e6)
            print(f"  round {len(samples['off'])} done", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\n{'tracing':<14} {'CPU/request µs':>15} {'vs off':>8}  samples")
    for name, values in samples.items():
        print(f"{name:<14} {medians[name]:>15.1f} {medians[name] / medians['off']:>7.2f}×  "
              f"{[round(v, 1) for v in sorted(values)]}")
    write_results(args.out, {"cpu_per_request_us": samples, "median_us": medians}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
