"""Proxy overhead benchmark: client → worker directly, → gateway → worker, → HAProxy → worker.

    python -m loadtest.overhead [--duration 5] [--rate 1000] [--connections 64]

The "worker" is a fast upstream that answers KServe v2 like Triton would (nginx returning a
fixed infer response, so the upstream costs almost nothing and the proxies' own cost shows).
Side by side, in one run:

* saturation throughput: ``wrk`` (closed loop, ``--connections`` keep-alive connections,
  one thread) POSTing a KServe v2 JSON infer body;
* p99 with four keep-alive connections (``wrk -c4``, closed loop): the latency the gateway
  adds when it is not busy;
* latency at a fixed **open-loop** rate (``--rate`` req/s, latency measured from each
  request's scheduled time, so queueing is not hidden): p50/p99, and the latency the
  gateway adds over direct;
* the gateway's resident memory after the runs;
* the gateway again with every admission feature on (tenant keys, three token buckets,
  breakers, retries, queue) — the cost of admission control as a ratio;
* **CPU per request**: the user + system time of the serving process (and its children)
  over the saturation run, divided by the requests answered — the gateway with the README's
  minimal config (every default on: learned limits, fair order, breakers, metrics) beside
  HAProxy (one thread);
* **CPU per refusal**: the same, for a 429 from a model's token bucket (1 req/s) through
  the gateway, beside HAProxy answering 429 itself (``http-request deny``).

Prints a table and writes ``results/overhead.json``. Needs ``nginx`` and ``wrk``
(Debian packages); HAProxy rows are skipped when ``haproxy`` is missing. Absolute numbers
depend on the machine and its neighbours; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gateway.fleet.upstream import Pool, PoolLimits
from gateway.tools.procs import free_port, stop, stop_all
from loadtest.haproxy import find_haproxy, haproxy_config
from loadtest.results import write_results

BODY = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                               "data": list(range(16))}]})
RESPONSE = json.dumps({"model_name": "simple", "model_version": "1", "outputs": [
    {"name": "OUTPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}]})
INFER_PATH = "/v2/models/simple/infer"




def wait_http(port: int, path: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path}")


def start_nginx(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    location = /v2/health/ready {{ return 200 ""; }}
    location = /v2/health/live {{ return 200 ""; }}
    location = /v2/repository/index {{
      return 200 '[{{"name":"simple","version":"1","state":"READY"}}]';
    }}
    location ~ ^/v2/models/simple/ready$ {{ return 200 ""; }}
    location = /metrics {{
      default_type text/plain;
      return 200 "nv_inference_pending_request_count{{model=\\"simple\\"}} 0\\n";
    }}
    location ~ /infer$ {{ return 200 '{RESPONSE}'; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(port, "/v2/health/ready")
    return proc


def start_haproxy(tmp: Path, port: int, upstreams: list[int], maxconn: int | None = None,
                  balance: str = "leastconn", *, refuse_infer: bool = False
                  ) -> subprocess.Popen[bytes] | None:
    """HAProxy (:func:`loadtest.haproxy.haproxy_config`) in front of ``upstreams``; None when
    haproxy is not installed. ``refuse_infer``: it answers every inference request 429
    itself (``http-request deny``), the baseline of a refusal's cost."""
    binary = find_haproxy()
    if binary is None:
        return None
    conf = tmp / f"haproxy-{balance}{'-429' if refuse_infer else ''}.cfg"
    text = haproxy_config(port, upstreams, balance=balance, maxconn=maxconn)
    if refuse_infer:
        text = text.replace("  default_backend workers\n",
                            "  http-request deny deny_status 429 if { path_end /infer }\n"
                            "  default_backend workers\n")
    conf.write_text(text)
    proc = subprocess.Popen([binary, "-f", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/v2/health/ready")
    except RuntimeError:
        stop(proc, signum=signal.SIGKILL)
        raise
    return proc


def gateway_yaml(port: int, upstream: int, admission: bool | str) -> str:
    """The gateway in front of ``upstream``: the README's minimal config (``listen`` and
    ``workers``: every default on), every admission feature on (limits set high enough never
    to refuse, so only their cost shows), or ``"refuse"``: a 1 req/s bucket on the model, so
    that nearly every request is answered 429."""
    if admission == "refuse" or admission is False:
        minimal: dict[str, object] = {
            "listen": {"host": "127.0.0.1", "port": port}, "log_level": "warning",
            "workers": [{"url": f"http://127.0.0.1:{upstream}"}]}
        if admission == "refuse":
            minimal["models"] = {"simple": {"rate_limit": {"rate_per_s": 1, "burst": 1}}}
        return yaml.safe_dump(minimal)
    unlimited = {"rate_per_s": 1_000_000, "burst": 1_000_000}
    cfg: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "log_level": "warning",
        "workers": [{"url": f"http://127.0.0.1:{upstream}",
                     "metrics_url": f"http://127.0.0.1:{upstream}/metrics", "slots": 1024}],
        "models": {"simple": {"rate_limit": unlimited} if admission else {}},
        "admission": {
            "tenants": {"bench": {"keys": ["bench-key"], "priority": "standard",
                                  "rate_limit": unlimited}},
            "global_limit": unlimited,
            "breaker": {"enabled": True},
            "retry": {"max_attempts": 2},
            "queue": {"max_length": 4096},
        },
    }
    return yaml.safe_dump(cfg)


def start_gateway(tmp: Path, port: int, upstream: int, admission: bool | str,
                  name: str, source: Path | None = None) -> subprocess.Popen[bytes]:
    """``source``: a checkout of another revision to run instead of this one (A/B)."""
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(gateway_yaml(port, upstream, admission))
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                 str(cfg)], stdout=subprocess.DEVNULL, stderr=log, env=env,
                                cwd=source)
    wait_http(port, "/v2/health/ready")
    time.sleep(1.0)
    return proc


def checkout(ref: str, into: Path) -> Path:
    """The ``gateway`` package of revision ``ref`` (``git archive``) under ``into``: a gateway
    to run beside this one (``start_gateway(source=...)``)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref, "gateway"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its direct children (nginx's worker)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in
                 Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Row:
    path: str
    saturation_rps: float
    wrk_p99_ms: float
    open_rate_rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float = float("nan")
    c4_p99_ms: float = float("nan")   # wrk -c4: p99 with four connections, closed loop


def run_wrk(tmp: Path, port: int, duration_s: float, connections: int,
            headers: dict[str, str]) -> tuple[float, float]:
    script = tmp / "post.lua"
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{BODY}]]\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n{hdrs}')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}{INFER_PATH}"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float("nan")
    if m:
        p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return rps, p99


async def open_loop(port: int, rate: float, duration_s: float,
                    headers: dict[str, str]) -> tuple[list[float], int]:
    """Fixed-rate arrivals; latency from each request's scheduled start."""
    pool = Pool("127.0.0.1", port, PoolLimits(max_connections=256, read_timeout_s=10.0))
    hdrs = [(b"content-type", b"application/json")]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    body = BODY.encode()
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()

    async def one(scheduled: float) -> None:
        nonlocal errors
        try:
            resp = await pool.request("POST", INFER_PATH, hdrs, body)
            await resp.read()
            if resp.status != 200:
                errors += 1
                return
        except Exception:
            errors += 1
            return
        latencies.append(loop.time() - scheduled)

    # warm the connections
    await asyncio.gather(*(one(loop.time()) for _ in range(32)))
    latencies.clear()
    n = int(rate * duration_s)
    start = loop.time() + 0.05
    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at)))
    await asyncio.gather(*tasks)
    await pool.aclose()
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop rate, req/s")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument("--out", default="results/overhead.json")
    ap.add_argument("--baseline", metavar="GIT_REF",
                    help="also measure the gateway of this revision (e.g. HEAD~3), side by "
                         "side in the same run: the A/B for a change's cost")
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"overhead: {tool} is required (apt-get install -y {tool})", file=sys.stderr)
            return 2
    rows: list[Row] = []
    extra: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs, 15.0)  # also when a measurement fails
        up = free_port()
        procs.append(start_nginx(tmp, up))
        gw, gw_adm, hp = free_port(), free_port(), free_port()
        gw_proc = start_gateway(tmp, gw, up, admission=False, name="gateway")
        procs.append(gw_proc)
        gw_adm_proc = start_gateway(tmp, gw_adm, up, admission=True, name="gateway-admission")
        procs.append(gw_adm_proc)
        ha = start_haproxy(tmp, hp, [up])
        if ha is not None:
            procs.append(ha)
        pids = {up: procs[0].pid, gw: gw_proc.pid, gw_adm: gw_adm_proc.pid}
        if ha is not None:
            pids[hp] = ha.pid
        targets: list[tuple[str, int, dict[str, str]]] = [("direct (nginx)", up, {}),
                                                          ("gateway", gw, {})]
        if args.baseline:
            base_src = checkout(args.baseline, tmp / "baseline")
            base = free_port()
            base_proc = start_gateway(tmp, base, up, admission=False, name="baseline",
                                      source=base_src)
            procs.append(base_proc)
            pids[base] = base_proc.pid
            targets.append((f"gateway @ {args.baseline}", base, {}))
        if ha is not None:
            targets.append(("haproxy leastconn", hp, {}))
        targets.append(("gateway + admission", gw_adm, {"Authorization": "Bearer bench-key"}))
        for name, port, headers in targets:
            before = cpu_s(pids[port])
            sat, wrk_p99 = run_wrk(tmp, port, args.duration, args.connections, headers)
            cpu_us = (cpu_s(pids[port]) - before) / max(1.0, sat * args.duration) * 1e6
            _, c4_p99 = run_wrk(tmp, port, args.duration, 4, headers)
            lat, errors = asyncio.run(open_loop(port, args.rate, args.duration, headers))
            rows.append(Row(name, sat, wrk_p99, args.rate, pct(lat, 0.5), pct(lat, 0.99),
                            errors, cpu_us, c4_p99))
            print(f"  measured {name}", file=sys.stderr)
        # Refusals: every request answered 429 (no open-loop latency rows for these).
        refuse_port = free_port()
        refusing = [("gateway 429 (bucket)", start_gateway(tmp, refuse_port, up,
                                                           admission="refuse",
                                                           name="gateway-refuse"),
                     refuse_port)]
        procs.append(refusing[0][1])
        if args.baseline:
            base_refuse = free_port()
            refusing.append((f"gateway 429 @ {args.baseline}",
                             start_gateway(tmp, base_refuse, up, admission="refuse",
                                           name="baseline-refuse", source=tmp / "baseline"),
                             base_refuse))
            procs.append(refusing[-1][1])
        ha_port = free_port()
        ha429 = start_haproxy(tmp, ha_port, [up], refuse_infer=True)
        if ha429 is not None:
            procs.append(ha429)
            refusing.append(("haproxy 429 (deny)", ha429, ha_port))
        for name, proc, port in refusing:
            before = cpu_s(proc.pid)
            sat, wrk_p99 = run_wrk(tmp, port, args.duration, args.connections, {})
            cpu_us = (cpu_s(proc.pid) - before) / max(1.0, sat * args.duration) * 1e6
            rows.append(Row(name, sat, wrk_p99, float("nan"), float("nan"), float("nan"), 0,
                            cpu_us))
            print(f"  measured {name}", file=sys.stderr)
        extra["gateway_rss_mb"] = rss_mb(gw_proc.pid)
        extra["gateway_admission_rss_mb"] = rss_mb(gw_adm_proc.pid)
    by = {r.path: r for r in rows}
    direct, gate = by["direct (nginx)"], by["gateway"]
    adm = by["gateway + admission"]
    extra["gateway_added_p50_ms"] = gate.p50_ms - direct.p50_ms
    extra["gateway_added_p99_ms"] = gate.p99_ms - direct.p99_ms
    extra["admission_throughput_ratio"] = adm.saturation_rps / gate.saturation_rps
    extra["gateway_cpu_us_per_request"] = gate.cpu_us_per_request
    extra["gateway_added_p99_ms_at_4_connections"] = gate.c4_p99_ms - direct.c4_p99_ms
    if "haproxy leastconn" in by:
        ha_row = by["haproxy leastconn"]
        extra["throughput_vs_haproxy"] = gate.saturation_rps / ha_row.saturation_rps
        extra["cpu_vs_haproxy"] = gate.cpu_us_per_request / ha_row.cpu_us_per_request
    if "gateway 429 (bucket)" in by:
        extra["gateway_cpu_us_per_refusal"] = by["gateway 429 (bucket)"].cpu_us_per_request
    if "haproxy 429 (deny)" in by:
        extra["haproxy_cpu_us_per_refusal"] = by["haproxy 429 (deny)"].cpu_us_per_request
    if args.baseline:
        base_row = by[f"gateway @ {args.baseline}"]
        extra["saturation_vs_baseline"] = gate.saturation_rps / base_row.saturation_rps
    print(f"\n{'path':<22} {'sat req/s':>10} {'wrk p99 ms':>11} {'CPU µs/req':>11} "
          f"{'p99 ms c4':>10} {'open req/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in rows:
        print(f"{r.path:<22} {r.saturation_rps:>10.0f} {r.wrk_p99_ms:>11.2f} "
              f"{r.cpu_us_per_request:>11.1f} {r.c4_p99_ms:>10.3f} {r.open_rate_rps:>11.0f} "
              f"{r.p50_ms:>8.3f} {r.p99_ms:>8.3f} {r.errors:>7}")
    print(f"\ngateway adds p99 {extra['gateway_added_p99_ms_at_4_connections']:.3f} ms at "
          f"4 connections (wrk, closed loop)")
    print(f"gateway adds p50 {extra['gateway_added_p50_ms']:.3f} ms, "
          f"p99 {extra['gateway_added_p99_ms']:.3f} ms at {args.rate:.0f} req/s; "
          f"RSS {extra['gateway_rss_mb']:.0f} MB; admission on/off throughput "
          f"{extra['admission_throughput_ratio']:.2f}")
    if "cpu_vs_haproxy" in extra:
        print(f"gateway vs HAProxy: CPU per request {extra['cpu_vs_haproxy']:.1f}×, "
              f"throughput {extra['throughput_vs_haproxy']:.2f}×")
    if "gateway_cpu_us_per_refusal" in extra:
        print(f"CPU per 429: gateway {extra['gateway_cpu_us_per_refusal']:.1f} µs, HAProxy "
              f"{extra.get('haproxy_cpu_us_per_refusal', float('nan')):.1f} µs")
    if args.baseline:
        print(f"saturation vs {args.baseline}: {extra['saturation_vs_baseline']:.3f}×")
    write_results(args.out, {"rows": [asdict(r) for r in rows], **extra}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
