"""`gateway plan`: the worked example end to end, load-test inputs, plots and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.plan import main

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
WORKED = ["--peak-rps", "10000", "--instance-rps", "5", "--overhead", "0.2", "--redundancy", "0",
          "--gpu-hour-cost", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def test_worked_example_json_via_subprocess() -> None:
    proc = run_cli(*WORKED, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["gpus"] == 2400
    assert data["cost_per_hour"] == 4800
    assert data["cost_per_month"] == 4800 * 730
    minus_one = next(r for r in data["sensitivity"] if r["label"].endswith("(-1)"))
    assert minus_one["delta_cost_per_hour"] == 1200


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(WORKED) == 0
    out = capsys.readouterr().out
    assert "GPUs required         2,400" in out
    assert "$4,800.00/hour" in out
    assert "Sensitivity" in out and "+1,200.00" in out


def test_headroom_and_redundancy(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, *WORKED[:-4], "--redundancy", "1", "--headroom", "0.8",
                    "--gpu-hour-cost", "2")
    assert data["gpus"] == 3001
    assert data["inputs"]["target_utilisation"] == 0.8


def _history_points() -> list[tuple[float, float]]:
    """Recompute the fixture's plateaus independently of the parser."""
    with (DATA / "locust_stats_history.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["99%"] != "N/A"]
    points = []
    for users in dict.fromkeys(r["User Count"] for r in rows):
        plateau = [r for r in rows if r["User Count"] == users]
        span = int(plateau[-1]["Timestamp"]) - int(plateau[0]["Timestamp"])
        done = int(plateau[-1]["Total Request Count"]) - int(plateau[0]["Total Request Count"])
        points.append((done / span, float(plateau[-1]["99%"])))
    return points


def test_knee_from_locust_history_csv(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--peak-rps", "1000", "--from-locust",
                    str(DATA / "locust_stats_history.csv"), "--p99-budget-ms", "200")
    expected = _history_points()
    got = [v for p in data["points"] for v in (p["throughput_rps"], p["p99_ms"])]
    assert got == pytest.approx([v for p in expected for v in p])
    knee = data["knee"]
    within = [p for p in expected if p[1] <= 200]
    beyond = [p for p in expected if p[1] > 200]
    assert within[-1][0] <= knee["throughput_rps"] <= beyond[0][0]
    assert knee["budget_reached"] and knee["interpolated"]
    assert data["inputs"]["instance_rps"] == knee["throughput_rps"]
    assert data["gpus"] == -(-1000 // knee["throughput_rps"])
    assert any("cumulative percentiles" in w for w in data["warnings"])


def test_knee_from_locust_stats_csv(capsys: pytest.CaptureFixture[str]) -> None:
    data = run_json(capsys, "--peak-rps", "100", "--from-locust",
                    str(DATA / "locust_stats.csv"), "--p99-budget-ms", "5000")
    assert len(data["points"]) == 1
    assert data["knee"]["throughput_rps"] == pytest.approx(31.583333)
    assert not data["knee"]["budget_reached"]
    assert any("lower bound" in w for w in data["warnings"])


def test_knee_from_bench_json_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "bench.json"
    plain.write_text(json.dumps({"points": [
        {"throughput_rps": 10, "p99_ms": 50}, {"throughput_rps": 20, "p99_ms": 100},
        {"throughput_rps": 30, "p99_ms": 300}]}))
    data = run_json(capsys, "--peak-rps", "1000", "--from-bench", str(plain),
                    "--p99-budget-ms", "200")
    assert data["knee"]["throughput_rps"] == pytest.approx(25.0)
    assert data["gpus"] == 40
    nested = tmp_path / "overhead.json"   # another benchmark's layout, p99 in seconds
    nested.write_text(json.dumps({"config": {"workers": 2}, "results": {"runs": [
        {"name": "c4", "rps": 10.0, "p99_s": 0.05}, {"name": "c8", "rps": 20.0, "p99_s": 0.3}]}}))
    data = run_json(capsys, "--peak-rps", "100", "--from-bench", str(nested),
                    "--p99-budget-ms", "100")
    assert data["knee"]["throughput_rps"] == pytest.approx(12.0)


def test_plot_writes_png_via_subprocess(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"points": [
        {"throughput_rps": t, "p99_ms": p} for t, p in [(10, 40), (20, 60), (30, 150),
                                                         (40, 400)]]}))
    trace = tmp_path / "trace.csv"
    trace.write_text("t_s,rps\n" + "\n".join(f"{i * 600},{100 + (i % 144)}"
                                             for i in range(300)))
    out = tmp_path / "plan.png"
    proc = run_cli("--from-bench", str(bench), "--p99-budget-ms", "200", "--trace", str(trace),
                   "--plot", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inputs"]["peak_rps"] == 243  # taken from the trace
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--instance-rps", "5"], "--peak-rps is required"),
        (["--peak-rps", "100"], "exactly one of"),
        (["--peak-rps", "100", "--instance-rps", "5", "--from-bench", "x.json"], "exactly one"),
        (["--peak-rps", "-1", "--instance-rps", "5"], "peak_rps must be"),
        (["--peak-rps", "100", "--instance-rps", "0"], "instance_rps must be > 0"),
        (["--peak-rps", "100", "--instance-rps", "5", "--headroom", "1.5"], "(0, 1]"),
        (["--peak-rps", "100", "--instance-rps", "5", "--gpu-hour-cost", "-2"], "gpu_hour_cost"),
        (["--peak-rps", "abc"], "invalid float value"),
        (["--peak-rps", "100", "--from-bench", "missing.json", "--p99-budget-ms", "200"],
         "cannot read"),
        (["--peak-rps", "100", "--from-bench", "x.json"], "--p99-budget-ms is required"),
        (["--peak-rps", "100", "--from-locust", "tests/data/rules_test.yml",
          "--p99-budget-ms", "200"], "not a Locust stats CSV"),
        (["--peak-rps", "100", "--instance-rps", "5", "--plot", "x.png"], "--plot needs"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_message(args: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway plan: error: ")
    assert message in err


def test_bad_input_via_subprocess() -> None:
    proc = run_cli("--peak-rps", "10000")
    assert proc.returncode == 2
    assert "gateway plan: error:" in proc.stderr and proc.stdout == ""


def test_budget_nothing_meets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"points": [{"throughput_rps": 5, "p99_ms": 900}]}))
    assert main(["--peak-rps", "10", "--from-bench", str(bench), "--p99-budget-ms", "200"]) == 2
    assert "no load-test point meets" in capsys.readouterr().err


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--from-locust" in capsys.readouterr().out
