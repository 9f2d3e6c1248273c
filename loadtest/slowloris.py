"""Slow clients: slowloris connections against a gateway whose open-file limit is 1,024, while
a normal client sends requests.

    python -m loadtest.slowloris [--connections 1100] [--hold-s 60] [--open-files 1024]
                                 [--rate 50] [--baseline-s 10] [--reconnect] [--quick]

Every part is a real process on loopback: the simulator (2 workers, 5 ms a request), the
gateway (``python -m gateway serve`` with the default ``clients`` settings, started with
RLIMIT_NOFILE soft = hard = ``--open-files``, as ``prlimit --nofile=1024:1024`` would, so
raising the soft limit gains nothing), the attacker (its own process) and the normal client
(this process).

* The attacker opens ``--connections`` connections at once, half of them sending a request
  head one byte every 3 s (it never ends), half a complete head declaring a 1 MiB body and then
  that body one byte a second, and holds each until the gateway closes it or ``--hold-s`` has
  passed. It records when and how each ended: answered (the status), closed without an
  answer, reset, or still open at the end. ``--reconnect`` replaces each closed connection at
  once (an attacker who keeps ``--connections`` open for the whole hold).
* The normal client sends ``--rate`` inference requests a second, open loop, each on a new
  connection (the case slow connections hurt: every one needs a descriptor and an accept),
  from the moment the attack starts to the end of the hold, and counts an answer 200 within
  5 s as answered. The same client runs alone for ``--baseline-s`` first: the machine's
  floor, in the same run.

Targets (issue 21): the normal client ≥ 99 % answered, p99 < 200 ms; every slow connection
closed by the gateway before 60 s. Prints a table and writes ``results/slowloris.json``
(``results/slowloris-reconnect.json`` with ``--reconnect``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.tools.gatewayproc import GatewayProcess
from loadtest.herd import INFER_BODY, INFER_PATH, SimProcess, request_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "slowloris.json"
RESULTS_RECONNECT = REPO / "results" / "slowloris-reconnect.json"
HOST = "127.0.0.1"

HEAD_EVERY_S = 3.0  # the slow heads: one byte every 3 s
BODY_EVERY_S = 1.0  # the slow bodies: one byte a second ...
BODY_BYTES = 1 << 20  # ... of a declared 1 MiB
NORMAL_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 5000  # bounds of this benchmark: it is a loopback test, not a weapon
MAX_HOLD_S = 120.0
TARGET_ANSWERED = 0.99
TARGET_P99_MS = 200.0
TARGET_CLOSED_BY_S = 60.0
OPEN_AT_END_MAX_S = 30.0  # older than every default deadline (10 s head, 20 s + body)


# ---------------------------------------------------------------------------- the attacker

@dataclass(slots=True)
class SlowConnection:
    kind: str  # "head" or "body"
    opened_s: float  # since the attack began
    ended_s: float | None = None  # since the attack began; None: still open at the end
    how: str = "open"  # "answered 408", "closed" (no answer), "reset", "refused", "open"
    bytes_sent: int = 0

    @property
    def lifetime_s(self) -> float | None:
        return None if self.ended_s is None else self.ended_s - self.opened_s


async def _slow_one(port: int, kind: str, began: float, hold_until: float) -> SlowConnection:
    conn = SlowConnection(kind, time.monotonic() - began)
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        conn.ended_s, conn.how = time.monotonic() - began, "refused"
        return conn
    if kind == "head":
        head = b"POST " + INFER_PATH.encode() + b" HTTP/1.1\r\nHost: gateway\r\nX-Slow: "
        every = HEAD_EVERY_S
    else:
        writer.write(b"POST " + INFER_PATH.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % BODY_BYTES)
        head = b"{"
        every = BODY_EVERY_S
    answer = b""
    try:
        while True:
            # the head's (or body's) bytes, then one filler byte a time: a header value
            # that never ends, or spaces of a JSON body that never comes
            if kind == "head" or conn.bytes_sent < BODY_BYTES:
                i = conn.bytes_sent
                writer.write(head[i:i + 1] if i < len(head) else b"a" if kind == "head"
                             else b" ")
                conn.bytes_sent += 1
            left = hold_until - time.monotonic()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(4096), min(every, left))
            except TimeoutError:
                continue
            if not data:
                conn.how = f"answered {answer[9:12].decode()}" \
                    if answer.startswith(b"HTTP/1.1 ") else "closed"
                conn.ended_s = time.monotonic() - began
                break
            answer += data
    except OSError:
        conn.how = f"answered {answer[9:12].decode()}" if answer.startswith(b"HTTP/1.1 ") \
            else "reset"
        conn.ended_s = time.monotonic() - began
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return conn


async def attack(port: int, connections: int, hold_s: float, reconnect: bool
                 ) -> dict[str, Any]:
    began = time.monotonic()
    hold_until = began + hold_s
    done: list[SlowConnection] = []
    print("started", flush=True)  # the normal client's cue

    async def keep(kind: str) -> None:
        while True:
            conn = await _slow_one(port, kind, began, hold_until)
            done.append(conn)
            if not reconnect or time.monotonic() >= hold_until:
                return
            if conn.how == "refused":
                await asyncio.sleep(0.1)  # bounded: no tight reconnect loop on refusals

    await asyncio.gather(*(keep("head" if i % 2 == 0 else "body")
                           for i in range(connections)))
    return {"began_monotonic": began, "connections": [asdict(c) for c in done]}


# ---------------------------------------------------------------------------- the normal client

@dataclass(slots=True)
class NormalFigures:
    requests: int
    answered: int  # 200 within NORMAL_TIMEOUT_S
    by_outcome: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    connect_p99_ms: float | None  # of the answered: the TCP connect alone
    slow_by_second: dict[int, int]  # answers of 200 ms or more (or none) by second sent

    @property
    def answered_share(self) -> float:
        return self.answered / self.requests if self.requests else 0.0


async def _normal_one(port: int, payload: bytes) -> tuple[str, float, float]:
    t0 = time.monotonic()
    connected = t0
    writer = None
    try:
        async with asyncio.timeout(NORMAL_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(HOST, port)
            connected = time.monotonic()
            writer.write(payload)
            line = await reader.readline()
            status = line[9:12].decode() if line.startswith(b"HTTP/1.1 ") else "no answer"
            await reader.read()  # Connection: close: to the end
    except TimeoutError:
        status = "timeout"
    except OSError as exc:
        status = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    return status, time.monotonic() - t0, connected - t0


async def normal_client(port: int, rate_per_s: float, until: float) -> NormalFigures:
    payload = request_bytes("gateway", {"Connection": "close"}, INFER_BODY, INFER_PATH)
    tasks: list[asyncio.Task[tuple[str, float, float]]] = []
    start = time.monotonic()
    sent_s: list[float] = []
    n = 0
    while True:
        at = start + n / rate_per_s
        if at >= until:
            break
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        tasks.append(asyncio.create_task(_normal_one(port, payload)))
        sent_s.append(at - start)
        n += 1
    results = await asyncio.gather(*tasks)
    by_outcome: dict[str, int] = {}
    ok_ms: list[float] = []
    connect_ms: list[float] = []
    slow_by_second: dict[int, int] = {}
    for (status, latency, connect), at in zip(results, sent_s, strict=True):
        by_outcome[status] = by_outcome.get(status, 0) + 1
        if status != "200" or latency * 1000 >= TARGET_P99_MS:
            slow_by_second[int(at)] = slow_by_second.get(int(at), 0) + 1
        if status == "200":
            ok_ms.append(latency * 1000)
            connect_ms.append(connect * 1000)
    ok_ms.sort()
    connect_ms.sort()
    return NormalFigures(len(results), len(ok_ms), by_outcome, _pct(ok_ms, 0.5),
                         _pct(ok_ms, 0.99), ok_ms[-1] if ok_ms else None,
                         _pct(connect_ms, 0.99), slow_by_second)


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


# ---------------------------------------------------------------------------- the run

def _raise_own_open_files() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _watch_fds(pid: int, until: float, peak: list[int]) -> None:
    while time.monotonic() < until:
        peak[0] = max(peak[0], _open_fds(pid))
        await asyncio.sleep(0.2)


def run(connections: int, hold_s: float, open_files: int, rate_per_s: float,
        reconnect: bool, baseline_s: float, workdir: Path) -> dict[str, Any]:
    with SimProcess(workers=2, slots=64, base_ms=5.0) as sim:
        config = {"workers": [{"url": u, "metrics_url": u + "/metrics"} for u in sim.urls],
                  "models": {"simple": {}}, "log_level": "info"}
        gw = GatewayProcess(config, workdir, open_files=(open_files, open_files)).start()
        try:
            assert gw.proc is not None
            pid = gw.proc.pid
            limits = Path(f"/proc/{pid}/limits").read_text()
            # the same client first with no attack: this machine's floor, in the same run
            baseline = asyncio.run(normal_client(gw.port, rate_per_s,
                                                 time.monotonic() + baseline_s))
            attacker = subprocess.Popen(
                [sys.executable, "-m", "loadtest.slowloris", "--attack", str(gw.port),
                 str(connections), str(hold_s), "1" if reconnect else "0"],
                stdout=subprocess.PIPE, cwd=REPO)
            assert attacker.stdout is not None
            attacker.stdout.readline()  # "started"
            began = time.monotonic()
            cpu_before = _cpu_s(pid)
            peak = [0]

            async def measure() -> NormalFigures:
                watcher = asyncio.create_task(_watch_fds(pid, began + hold_s, peak))
                figures = await normal_client(gw.port, rate_per_s, began + hold_s)
                await watcher
                return figures

            normal = asyncio.run(measure())
            worst_lag_s = gw.status()["gateway"]["event_loop_worst_lag_s"]
            cpu_share = (_cpu_s(pid) - cpu_before) / max(1e-9, time.monotonic() - began)
            out, _ = attacker.communicate(timeout=hold_s + 60)
            attack_doc = json.loads(out)
            log = gw.log_path.read_text()
        finally:
            gw.stop()
    nofile = next((line.split()[3:5] for line in limits.splitlines()
                   if line.startswith("Max open files")), ["?", "?"])
    return {"normal": normal, "baseline": baseline, "attack": attack_doc,
            "gateway_open_files": nofile,
            "gateway_peak_fds": peak[0], "gateway_cpu_share": cpu_share,
            "gateway_worst_loop_lag_ms": 1000 * worst_lag_s,
            "guard_log": [line for line in log.splitlines() if "client connections" in line]}


def summarise_slow(conns: list[dict[str, Any]], hold_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"opened": len(conns)}
    for kind in ("head", "body"):
        mine = [c for c in conns if c["kind"] == kind]
        by_gateway = [c for c in mine if c["how"] != "open"]
        lifetimes = sorted(c["ended_s"] - c["opened_s"] for c in by_gateway)
        hows: dict[str, int] = {}
        for c in mine:
            hows[c["how"]] = hows.get(c["how"], 0) + 1
        out[kind] = {
            "opened": len(mine), "closed_by_gateway": len(by_gateway),
            "closed_before_60_s": sum(1 for t in lifetimes if t < TARGET_CLOSED_BY_S),
            "still_open_at_end": len(mine) - len(by_gateway),
            "oldest_open_at_end_s": max((hold_s - c["opened_s"] for c in mine
                                         if c["how"] == "open"), default=None),
            "how": hows,
            "lifetime_s": {"min": _pct(lifetimes, 0.0), "p50": _pct(lifetimes, 0.5),
                           "p99": _pct(lifetimes, 0.99), "max": _pct(lifetimes, 1.0)}}
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(doc: dict[str, Any]) -> str:
    n = doc["normal"]
    b = doc["baseline"]
    slow_seconds = ", ".join(f"{k} s: {v}" for k, v in sorted(n["slow_by_second"].items()))
    s = doc["slow"]
    lines = ["| what | figure |", "| --- | --- |",
             f"| gateway open-file limit (soft:hard) | {':'.join(doc['gateway_open_files'])} |",
             f"| gateway's most open descriptors | {doc['gateway_peak_fds']} |",
             f"| gateway's CPU over the hold (one core = 100 %) | "
             f"{100 * doc['gateway_cpu_share']:.0f} % |",
             f"| gateway's event loop: worst lateness over the whole run, ms | "
             f"{_fmt(doc['gateway_worst_loop_lag_ms'])} |",
             f"| normal client: requests (new connection each) | {n['requests']:,} |",
             f"| normal client: answered 200 | {n['answered']:,} "
             f"({100 * n['answered'] / max(1, n['requests']):.2f} %) |",
             f"| normal client: p50 / p99 / max ms | {_fmt(n['p50_ms'])} / {_fmt(n['p99_ms'])} "
             f"/ {_fmt(n['max_ms'])} (the connect alone: p99 {_fmt(n['connect_p99_ms'])}) |",
             f"| the same client before the attack ({doc['baseline_s']:g} s): answered 200, "
             f"p50 / p99 ms | {100 * b['answered'] / max(1, b['requests']):.2f} %, "
             f"{_fmt(b['p50_ms'])} / {_fmt(b['p99_ms'])} |",
             f"| normal client: answers of 200 ms or more, by second of the attack | "
             f"{slow_seconds or 'none'} |",
             f"| normal client: outcomes | "
             f"{', '.join(f'{k}: {v}' for k, v in sorted(n['by_outcome'].items()))} |"]
    for kind, what in (("head", "heads, 1 byte / 3 s"), ("body", "1 MiB bodies, 1 byte / s")):
        k = s[kind]
        life = k["lifetime_s"]
        lines += [
            f"| slow {what}: opened | {k['opened']:,} |",
            f"| slow {what}: closed by the gateway before 60 s | "
            f"{k['closed_before_60_s']:,} (still open at the end: {k['still_open_at_end']}"
            + (f", the oldest {k['oldest_open_at_end_s']:.1f} s old" if k['still_open_at_end']
               else "") + ") |",
            f"| slow {what}: how they ended | "
            f"{', '.join(f'{h}: {c}' for h, c in sorted(k['how'].items()))} |",
            f"| slow {what}: closed after s (min / p50 / p99 / max) | {_fmt(life['min'])} / "
            f"{_fmt(life['p50'])} / {_fmt(life['p99'])} / {_fmt(life['max'])} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.slowloris", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--hold-s", type=float, default=60.0)
    parser.add_argument("--open-files", type=int, default=1024)
    parser.add_argument("--rate", type=float, default=50.0, help="normal requests a second")
    parser.add_argument("--baseline-s", type=float, default=10.0,
                        help="the normal client alone first, for this long")
    parser.add_argument("--reconnect", action="store_true",
                        help="replace each closed slow connection at once")
    parser.add_argument("--quick", action="store_true", help="300 connections for 25 s")
    parser.add_argument("--attack", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _raise_own_open_files()
    if args.attack:
        port, count, hold, reconnect = args.attack
        attack_doc = asyncio.run(attack(int(port), int(count), float(hold), reconnect == "1"))
        print(json.dumps(attack_doc))
        return 0
    connections = 300 if args.quick else args.connections
    hold_s = 25.0 if args.quick else args.hold_s
    if not 1 <= connections <= MAX_CONNECTIONS or not 0 < hold_s <= MAX_HOLD_S:
        parser.error(f"at most {MAX_CONNECTIONS} connections and {MAX_HOLD_S:g} s")
    with tempfile.TemporaryDirectory(prefix="slowloris-") as tmp:
        got = run(connections, hold_s, args.open_files, args.rate, args.reconnect,
                  args.baseline_s, Path(tmp))
    normal: NormalFigures = got["normal"]
    doc: dict[str, Any] = {
        "command": "python -m loadtest.slowloris" + (" --quick" if args.quick else "")
        + (" --reconnect" if args.reconnect else ""),
        "connections": connections, "hold_s": hold_s, "open_files": args.open_files,
        "rate_per_s": args.rate, "reconnect": args.reconnect,
        "gateway_open_files": got["gateway_open_files"],
        "gateway_peak_fds": got["gateway_peak_fds"],
        "gateway_cpu_share": got["gateway_cpu_share"],
        "gateway_worst_loop_lag_ms": got["gateway_worst_loop_lag_ms"],
        "normal": {**asdict(normal), "answered_share": normal.answered_share},
        "baseline_s": args.baseline_s, "baseline": asdict(got["baseline"]),
        "slow": summarise_slow(got["attack"]["connections"], hold_s),
        "guard_log": got["guard_log"]}
    print(table(doc))
    for line in got["guard_log"]:
        print("gateway:", line)
    # Every slow connection closed by the gateway within 60 s; with --reconnect, those
    # opened near the end of the hold are still open then, and may be, while younger than
    # the longest deadline.
    slow_ok = all(doc["slow"][k]["closed_before_60_s"] + doc["slow"][k]["still_open_at_end"]
                  == doc["slow"][k]["opened"]
                  and (doc["slow"][k]["oldest_open_at_end_s"] or 0.0) < OPEN_AT_END_MAX_S
                  for k in ("head", "body"))
    p99 = normal.p99_ms
    print(f"targets: answered {100 * normal.answered_share:.2f} % (>= 99 %), p99 "
          f"{_fmt(p99)} ms (< 200 ms), every slow connection closed by the gateway before "
          f"60 s: {'yes' if slow_ok else 'no'} → "
          + ("met" if normal.answered_share >= TARGET_ANSWERED and p99 is not None
             and p99 < TARGET_P99_MS and slow_ok else "NOT met"))
    results = RESULTS_RECONNECT if args.reconnect else RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {results.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
