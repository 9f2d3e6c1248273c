"""Bounded headless Locust run: ``python -m loadtest.run --host URL --shape spike --duration 60``.

Starts ``locust -f loadtest/locustfile.py --headless`` as a subprocess (its own process
group, killed if it outlives the duration plus a grace period) and leaves Locust's standard
outputs next to the prefix given by ``--out`` (default ``results/locust``):

    results/locust_stats.csv           one row per request name, plus "Aggregated"
    results/locust_stats_history.csv   the "Aggregated" row once a second (``gateway plan
                                       --from-locust`` reads this one)
    results/locust_failures.csv        failures by name and error, e.g. "HTTP 429 …"
    results/locust_exceptions.csv
    results/locust.html                Locust's HTML report
    results/locust.json                final stats per request name (``--json-file``)

Every other option after ``--`` goes to Locust unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEFAULT_OUT = "results/locust"
GRACE_S = 30.0  # start-up, stop timeout and report writing on top of the duration
STOP_TIMEOUT_S = 5  # users get this long to finish their request when the run ends


@dataclass(frozen=True, slots=True)
class LocustOutputs:
    stats_csv: Path
    history_csv: Path
    failures_csv: Path
    exceptions_csv: Path
    html: Path
    json: Path
    returncode: int

    def paths(self) -> tuple[Path, ...]:
        return (self.stats_csv, self.history_csv, self.failures_csv, self.exceptions_csv,
                self.html, self.json)


@dataclass(frozen=True, slots=True)
class RunSummary:
    requests: int
    failures: int

    @property
    def successes(self) -> int:
        return self.requests - self.failures


def outputs_for(prefix: str | Path, returncode: int = 0) -> LocustOutputs:
    base = str(prefix)
    return LocustOutputs(
        stats_csv=Path(f"{base}_stats.csv"), history_csv=Path(f"{base}_stats_history.csv"),
        failures_csv=Path(f"{base}_failures.csv"), exceptions_csv=Path(f"{base}_exceptions.csv"),
        html=Path(f"{base}.html"), json=Path(f"{base}.json"), returncode=returncode,
    )


def locust_command(host: str, *, shape: str, duration_s: float, users: int, spawn_rate: float,
                   out: str | Path, user_classes: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The ``locust`` command line of one bounded headless run."""
    prefix = str(out)
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", host, "--users", str(users), "--spawn-rate", str(spawn_rate),
        "--run-time", f"{max(1, round(duration_s))}s", "--shape", shape,
        "--stop-timeout", str(STOP_TIMEOUT_S), "--exit-code-on-error", "0",
        "--csv", prefix, "--html", f"{prefix}.html", "--json-file", prefix,
        "--only-summary", "--loglevel", "WARNING",
        *extra, *user_classes,
    ]


def run_locust(host: str, *, shape: str = "constant", duration_s: float = 60.0,
               users: int = 10, spawn_rate: float = 10.0, out: str | Path = DEFAULT_OUT,
               user_classes: tuple[str, ...] = (), extra: tuple[str, ...] = (),
               env: dict[str, str] | None = None, quiet: bool = False) -> LocustOutputs:
    """Run Locust headless for ``duration_s`` (killed after ``duration_s + GRACE_S``)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    command = locust_command(host, shape=shape, duration_s=duration_s, users=users,
                             spawn_rate=spawn_rate, out=out, user_classes=user_classes,
                             extra=extra)
    sink = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(command, env={**os.environ, **(env or {})},
                               stdout=sink, stderr=sink, start_new_session=True)
    try:
        returncode = process.wait(timeout=duration_s + GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise TimeoutError(f"locust ran past {duration_s + GRACE_S:.0f} s; killed") from None
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return outputs_for(out, returncode)


def summarise(outputs: LocustOutputs) -> RunSummary:
    """Totals over every request name, from the JSON report."""
    entries = json.loads(outputs.json.read_text())
    return RunSummary(requests=sum(int(e["num_requests"]) for e in entries),
                      failures=sum(int(e["num_failures"]) for e in entries))


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, extra = args_in[:cut], args_in[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="gateway or Triton URL")
    parser.add_argument("--shape", default=os.environ.get("LOCUST_SHAPE", "constant"),
                        choices=("constant", "step", "spike", "diurnal"),
                        help="load shape (default $LOCUST_SHAPE or constant)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (whole curve)")
    parser.add_argument("--users", type=int, default=10, help="peak simulated users")
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="users started per s "
                        "(constant shape; the other shapes set their own)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output prefix")
    parser.add_argument("--user-class", action="append", default=[],
                        choices=("TritonUser", "KServeHttpUser"),
                        help="run only these users (repeatable; default both)")
    parser.add_argument("--profile", help="traffic profile YAML")
    parser.add_argument("--models", help='model mix, e.g. "add_sub=8,strings=2"')
    args = parser.parse_args(args_in)
    if args.profile:
        extra += ["--traffic-profile", args.profile]
    if args.models:
        extra += ["--models", args.models]
    try:
        outputs = run_locust(args.host, shape=args.shape, duration_s=args.duration,
                             users=args.users, spawn_rate=args.spawn_rate, out=args.out,
                             user_classes=tuple(args.user_class), extra=tuple(extra))
    except TimeoutError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    missing = [str(p) for p in outputs.paths() if not p.exists()]
    if outputs.returncode != 0 or missing:
        print(f"loadtest: locust exited {outputs.returncode}; missing: {missing}",
              file=sys.stderr)
        return 1
    summary = summarise(outputs)
    print(f"{summary.requests} requests, {summary.successes} ok, {summary.failures} failed")
    for path in outputs.paths():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
