"""What coordinating replicas costs one gateway process per request: CPU with it off and on.

    python -m loadtest.coordination_cost [--duration 5] [--rounds 3] [--connections 32]

Side by side, in one run, alternating A/B rounds against the same upstream (nginx answering a
KServe v2 infer at once, so the gateway's own cost shows):

* **off**: one gateway alone (the minimal config: no ``admission.redis.url``);
* **on**: one gateway with ``admission.redis.url`` set — it publishes its report and reads the
  others' every heartbeat, and takes its share of the budget from them — beside a second,
  idle replica naming the same Redis, so the shares are real (two members).

Each round drives the gateway closed-loop with ``wrk`` (``--connections``, one thread) and
reads the process's user + system CPU from ``/proc`` before and after: CPU per request = CPU
seconds / requests answered. Prints a table and writes ``results/coordination_cost.json``.
Needs nginx, wrk and redis-server (Debian packages).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from gateway.tools.procs import free_port, stop
from loadtest.overhead import run_wrk, start_nginx, wait_http

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True, check=False).stdout
        if "PONG" in out:
            return proc
        time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def start_gateway(tmp: Path, name: str, port: int, upstream: int,
                  redis_port: int | None) -> subprocess.Popen[bytes]:
    cfg: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": port}, "log_level": "warning",
        "workers": [{"url": f"http://127.0.0.1:{upstream}",
                     "metrics_url": f"http://127.0.0.1:{upstream}/metrics"}],
    }
    if redis_port is not None:
        cfg["admission"] = {"redis": {"url": f"redis://127.0.0.1:{redis_port}/0"}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                 str(path)], stdout=subprocess.DEVNULL, stderr=log)
    wait_http(port, "/v2/health/ready")
    time.sleep(1.5)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--out", default="results/coordination_cost.json")
    args = ap.parse_args(argv)
    per: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        upstream, redis_port = free_port(), free_port()
        nginx = start_nginx(tmp, upstream)
        stack.callback(stop, nginx)
        redis = start_redis(tmp, redis_port)
        stack.callback(stop, redis)
        ports = {"off": free_port(), "on": free_port()}
        gws = {"off": start_gateway(tmp, "off", ports["off"], upstream, None),
               "on": start_gateway(tmp, "on", ports["on"], upstream, redis_port)}
        idle = start_gateway(tmp, "idle", free_port(), upstream, redis_port)
        for proc in (*gws.values(), idle):
            stack.callback(stop, proc, signum=signal.SIGTERM)
        for port in ports.values():  # warm-up
            run_wrk(tmp, port, 1.0, args.connections, {})
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                pid = gws[mode].pid
                before = cpu_s(pid)
                rps, _ = run_wrk(tmp, ports[mode], args.duration, args.connections, {})
                used = cpu_s(pid) - before
                requests = rps * args.duration
                per[mode].append((used / max(1.0, requests) * 1e6, rps))
    rows: list[dict[str, object]] = []
    medians: dict[str, float] = {}
    for mode in ("off", "on"):
        us = sorted(u for u, _ in per[mode])
        rates = sorted(r for _, r in per[mode])
        rows.append({"mode": mode, "cpu_us_per_request_median": us[len(us) // 2],
                     "cpu_us_per_request_rounds": [round(u, 1) for u, _ in per[mode]],
                     "throughput_rps_median": rates[len(rates) // 2]})
        medians[mode] = us[len(us) // 2]
    ratio = medians["on"] / medians["off"]
    print(f"{'coordination':<14}{'CPU µs/request (median)':>26}{'rounds':>28}{'req/s':>10}")
    for r in rows:
        print(f"{r['mode']!s:<14}{r['cpu_us_per_request_median']:>26.1f}"
              f"{r['cpu_us_per_request_rounds']!s:>28}{r['throughput_rps_median']:>10.0f}")
    verdict = "PASS" if ratio <= 1.05 else "FAIL"
    print(f"on / off: {ratio:.3f} (target ≤ 1.05): {verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ratio": ratio, "verdict": verdict,
                               "duration_s": args.duration, "rounds": args.rounds,
                               "connections": args.connections}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
