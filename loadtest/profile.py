"""Where a proxied request's time goes, by module: py-spy samples of the gateway at saturation.

    python -m loadtest.profile [--duration 8] [--baseline GIT_REF] [--out results/profile.json]

nginx answers a fixed KServe v2 infer response at once; the gateway (the README's minimal
config) is in front of it; ``wrk -t1 -c32`` POSTs infer requests for ``--duration`` seconds
while ``py-spy record`` samples the gateway (only while it holds the GIL, so waits are left
out). Each sample's innermost frame is charged to its module (own time, adding up to 100 %);
the inclusive share of each module (any frame of it on the stack) is printed beside it.
``--baseline REF`` profiles that revision's gateway too (from ``git archive``), in the same
run, so the two columns compare. Samples taken inside a socket write count as the caller's
own time: the system call is made with the GIL held.

Needs ``nginx``, ``wrk`` and ``py-spy`` (a dev dependency).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from gateway.tools.procs import free_port, stop_all
from loadtest.overhead import checkout, cpu_s, run_wrk, start_gateway, start_nginx
from loadtest.results import write_results


def module_of(frame: str) -> str:
    """``func (path/to/module.py:12)`` → ``gateway.http.proxy`` / ``uvicorn`` / ``<loop>``."""
    if "(" not in frame:
        return "<native>"
    path = frame.rsplit("(", 1)[1].split(":", 1)[0]
    if path.startswith("gateway/"):   # py-spy names files under the working directory so
        path = "/" + path
    if "/gateway/" in path and "site-packages/" not in path:
        rel = path.rsplit("/gateway/", 1)[1].removesuffix(".py").replace("/", ".")
        return "gateway." + rel
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if not path.startswith(("/", "<")) and "/" in path:   # relative: a package's own path
        return path.split("/", 1)[0]
    if "asyncio" in path:
        return "asyncio"
    return path.rsplit("/", 1)[-1].removesuffix(".py")


def by_module(raw: str) -> tuple[dict[str, float], dict[str, float], int]:
    """Own and inclusive shares per module from py-spy's ``raw`` (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        own[module_of(frames[-1])] += n
        for module in {module_of(f) for f in frames}:
            inclusive[module] += n
    if total == 0:
        return {}, {}, 0
    return ({m: c / total for m, c in own.items()},
            {m: c / total for m, c in inclusive.items()}, total)


def py_spy() -> str:
    """The py-spy beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def profile(tmp: Path, name: str, pid: int, port: int, duration_s: float) -> dict[str, object]:
    out = tmp / f"{name}.txt"
    spy = subprocess.Popen([py_spy(), "record", "-p", str(pid), "-d",
                            str(max(1, int(duration_s) - 1)), "-r", "250", "--gil", "-f", "raw",
                            "-o", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = cpu_s(pid)
    rps, p99 = run_wrk(tmp, port, duration_s, 32, {})
    cpu_us = (cpu_s(pid) - before) / max(1.0, rps * duration_s) * 1e6
    spy.wait(timeout=30)
    own, inclusive, samples = by_module(out.read_text() if out.exists() else "")
    return {"name": name, "req_per_s": rps, "wrk_p99_ms": p99, "cpu_us_per_request": cpu_us,
            "samples": samples, "own": own, "inclusive": inclusive}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--baseline", metavar="GIT_REF")
    ap.add_argument("--out", default="results/profile.json")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"profile: {tool} is required (apt-get install -y {tool})", file=sys.stderr)
            return 2
    runs: list[dict[str, object]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs, 15.0)
        up = free_port()
        procs.append(start_nginx(tmp, up))
        targets: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        port = free_port()
        gw = start_gateway(tmp, port, up, admission=False, name="gateway")
        procs.append(gw)
        targets.append(("this tree", port, gw))
        if args.baseline:
            src = checkout(args.baseline, tmp / "baseline")
            bport = free_port()
            base = start_gateway(tmp, bport, up, admission=False, name="baseline", source=src)
            procs.append(base)
            targets.append((f"@ {args.baseline}", bport, base))
        for name, p, proc in targets:
            runs.append(profile(tmp, name.replace(" ", "_").replace("@", "at"), proc.pid, p,
                                args.duration))
            runs[-1]["name"] = name
            print(f"  profiled {name}", file=sys.stderr)
            time.sleep(0.5)
    names = [str(r["name"]) for r in runs]
    print(f"\n{'':<34}" + "".join(f"{n:>22}" for n in names))
    for key in ("req_per_s", "cpu_us_per_request"):
        print(f"{key:<34}" + "".join(f"{float(r[key]):>22.1f}" for r in runs))  # type: ignore[arg-type]
    print(f"\n{'module (own % / inclusive %)':<34}" + "".join(f"{n:>22}" for n in names))
    modules = sorted({m for r in runs for m in r["own"]},  # type: ignore[attr-defined]
                     key=lambda m: -max(r["own"].get(m, 0.0)  # type: ignore[attr-defined]
                                        for r in runs))[:args.top]
    for m in modules:
        cells = "".join(
            f"{100 * r['own'].get(m, 0.0):>13.1f} / {100 * r['inclusive'].get(m, 0.0):>5.1f}"  # type: ignore[attr-defined]
            for r in runs)
        print(f"{m:<34}{cells}")
    write_results(args.out, {"runs": runs}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
