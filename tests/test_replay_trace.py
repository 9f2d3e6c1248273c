"""``loadtest.replay --trace``: the CSV trace reader (good files, and bad rows named by line),
resampling to minutes, the day selection, the bundled Azure trace, and one replayed day end
to end (the forecaster sees only the days before it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest import replay
from loadtest.trace import Trace, TraceError, parse_trace, per_minute, read_trace

BUNDLED = Path(__file__).resolve().parent.parent / "loadtest" / "data" / "azure_v2_cpu.csv"


def lines(text: str) -> list[str]:
    return text.strip("\n").split("\n")


@pytest.mark.parametrize(("text", "column", "peak", "times", "rates"), [
    ("time_s,rate\n0,10\n300,20\n", None, None, [0, 300], [10, 20]),
    # comments and blank lines anywhere, spaces around fields, other columns ignored
    ("# source: somewhere\n\ntime_s, rate ,note\n0, 1.5 ,a\n# mid\n60,2.5,b\n", None, None,
     [0, 60], [1.5, 2.5]),
    # columns in any order; uneven steps
    ("rate,time_s\n5,0\n6,60\n7,600\n", None, None, [0, 60, 600], [5, 6, 7]),
    # a usage column scaled so that its maximum is the peak
    ("time_s,cpu\n0,50\n300,100\n600,25\n", "cpu", 2000.0, [0, 300, 600], [1000, 2000, 500]),
    # a rate column may be rescaled too
    ("time_s,rate\n0,1\n60,4\n", None, 100.0, [0, 60], [25, 100]),
    ("time_s,rate\n0,0\n60,0.5\n", None, None, [0, 60], [0, 0.5]),
])
def test_good_traces(text: str, column: str | None, peak: float | None, times: list[float],
                     rates: list[float]) -> None:
    trace = parse_trace(lines(text), "t.csv", column, peak)
    assert trace.times_s.tolist() == times
    assert trace.rates == pytest.approx(rates)
    assert trace.column == (column or "rate")


@pytest.mark.parametrize(("text", "column", "peak", "message"), [
    ("", None, None, "t.csv: empty: no header line"),
    ("# only a comment\n", None, None, "t.csv: empty: no header line"),
    ("time_s,rate\n0,1\n", None, None, "t.csv: 1 data row(s); a trace needs at least 2"),
    ("t,rate\n0,1\n", None, None, "t.csv:1: the header 't,rate' has no 'time_s' column"),
    ("time_s,cpu\n0,1\n", None, None,
     "t.csv:1: the header 'time_s,cpu' has no 'rate' column; pick one with --column (cpu)"),
    ("time_s,rate\n0,1\n", "cpu", 10.0, "t.csv:1: the header 'time_s,rate' has no 'cpu'"),
    ("# c\ntime_s,rate,rate\n0,1,1\n", None, None, "t.csv:2: the header 'time_s,rate,rate' "
     "repeats a column"),
    ("time_s,rate\n0,1\n60,1,3\n", None, None, "t.csv:3: 3 fields, the header has 2"),
    ("time_s,rate\n0,1\n60\n", None, None, "t.csv:3: 1 fields, the header has 2"),
    ("time_s,rate\n0,1\n# note\n\n60,abc\n", None, None, "t.csv:5: rate is 'abc', not a number"),
    ("time_s,rate\n0,1\nx,2\n", None, None, "t.csv:3: time_s is 'x', not a number"),
    ("time_s,rate\n0,1\n60,\n", None, None, "t.csv:3: rate is '', not a number"),
    ("time_s,rate\n0,1\n60,nan\n", None, None, "t.csv:3: rate is 'nan', not a finite number"),
    ("time_s,rate\n0,inf\n", None, None, "t.csv:2: rate is 'inf', not a finite number"),
    ("time_s,rate\n0,1\n60,-2\n", None, None, "t.csv:3: rate -2 is negative"),
    ("time_s,rate\n-60,1\n0,1\n", None, None, "t.csv:2: time_s -60 is negative"),
    ("time_s,rate\n0,1\n60,1\n60,2\n", None, None,
     "t.csv:4: time_s 60 does not increase (the row before has 60)"),
    ("time_s,rate\n0,1\n120,1\n60,2\n", None, None,
     "t.csv:4: time_s 60 does not increase (the row before has 120)"),
    ("time_s,cpu\n0,1\n60,2\n", "cpu", None, "column 'cpu' is a usage figure, not req/s: "
     "give --peak-rps"),
    ("time_s,cpu\n0,0\n60,0\n", "cpu", 100.0, "t.csv: every cpu is 0"),
    ("time_s,rate\n0,1\n60,2\n", None, -5.0, "--peak-rps must be a positive number"),
])
def test_bad_traces_name_the_line(text: str, column: str | None, peak: float | None,
                                  message: str) -> None:
    with pytest.raises(TraceError) as err:
        parse_trace(lines(text) if text else [], "t.csv", column, peak)
    assert message in str(err.value)


def test_read_trace_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "nope.csv")


def _trace(times: list[float], rates: list[float]) -> Trace:
    return Trace(np.asarray(times, dtype=np.float64), np.asarray(rates, dtype=np.float64),
                 "rate", 1.0)


@pytest.mark.parametrize(("times", "rates", "expected"), [
    # 5-minute steps: linear between samples, the last held for one more step
    ([0, 300], [10, 20], [10, 12, 14, 16, 18, 20, 20, 20, 20, 20]),
    # one-minute steps pass through unchanged
    ([0, 60, 120], [1, 2, 3], [1, 2, 3]),
    # a trace that starts later is shifted to start at 0
    ([600, 720], [4, 8], [4, 6, 8, 8]),
])
def test_per_minute(times: list[float], rates: list[float], expected: list[float]) -> None:
    assert per_minute(_trace(times, rates)).tolist() == pytest.approx(expected)


@pytest.mark.parametrize(("spec", "n_days", "days"), [
    ("last7", 30, list(range(23, 30))),
    ("last1", 30, [29]),
    ("last40", 30, list(range(1, 30))),
    ("14-16", 30, [14, 15, 16]),
    ("20,22-23", 30, [20, 22, 23]),
])
def test_parse_days(spec: str, n_days: int, days: list[int]) -> None:
    assert replay.parse_days(spec, n_days) == days


@pytest.mark.parametrize("spec", ["0", "30", "28-31"])
def test_parse_days_rejects_days_without_history_or_outside(spec: str) -> None:
    with pytest.raises(ValueError, match=r"whole days 0\.\.29"):
        replay.parse_days(spec, 30)


def test_bundled_azure_trace() -> None:
    head = BUNDLED.read_text(encoding="utf-8").splitlines()[:12]
    assert any("CC BY 4.0" in line for line in head)
    assert any("AzurePublicDataset" in line for line in head)
    trace = read_trace(BUNDLED, "cpu_usage", 2000.0)
    assert len(trace.times_s) == 30 * 288
    assert trace.step_s == 300.0
    assert float(trace.rates.max()) == pytest.approx(2000.0)
    assert len(per_minute(trace)) == 30 * 1440


def _day_with_step(low: float, high: float, at_min: int) -> replay.Array:
    day = np.full(1440, low)
    day[at_min:] = high
    return day


def test_replayed_day_sees_only_the_days_before() -> None:
    """A doubling at noon that every earlier day had is forecast (predictive is never over
    budget, reactive is); the same doubling on a day whose history was flat is not (the
    forecaster never sees the replayed day in advance), so predictive is over budget there."""
    known = _day_with_step(400.0, 800.0, 720)
    minutes = np.concatenate([known] * 9)
    result = replay.run_trace_day(minutes, 8, 0, startup_min=10, history_days=14)
    assert result["history_days"] == 8
    modes = {m["mode"]: m for m in result["modes"]}  # type: ignore[attr-defined]
    assert set(modes) == {"reactive", "arrival_rate", "predictive"}
    assert modes["predictive"]["over_budget_minutes"] == 0
    assert modes["reactive"]["over_budget_minutes"] > 0
    flat = np.full(1440, 400.0)
    minutes = np.concatenate([flat] * 8 + [known])
    result = replay.run_trace_day(minutes, 8, 0, startup_min=10, history_days=14)
    modes = {m["mode"]: m for m in result["modes"]}  # type: ignore[attr-defined]
    assert modes["predictive"]["over_budget_minutes"] > 0


def test_noise_is_per_seed_and_seed_zero_is_none() -> None:
    minutes = np.full(100, 10.0)
    assert replay.noisy(minutes, 0).tolist() == minutes.tolist()
    a, b = replay.noisy(minutes, 1), replay.noisy(minutes, 2)
    assert a.tolist() == replay.noisy(minutes, 1).tolist()
    assert a.tolist() != b.tolist()
    assert 9.0 < float(a.mean()) < 11.0


def test_cli_time_s_rate_needs_no_other_flag(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["time_s,rate"] + [f"{i * 300},{200 + 100 * np.sin(i / 288 * 2 * np.pi):.1f}"
                              for i in range(3 * 288)]
    src = tmp_path / "t.csv"
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.json"
    assert replay.main(["--trace", str(src), "--seeds", "1", "--days", "last1",
                        "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["days"] == [2] and report["trace_days"] == 3
    assert set(report["totals"]) == {"reactive", "arrival_rate", "predictive"}
    assert "predictive vs reactive" in capsys.readouterr().out


def test_cli_bad_row_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bad.csv"
    src.write_text("time_s,rate\n0,1\n300,oops\n")
    assert replay.main(["--trace", str(src), "--json", str(tmp_path / "o.json")]) == 2
    assert f"{src}:3: rate is 'oops', not a number" in capsys.readouterr().err


def test_nothing_to_cut_is_not_a_verdict() -> None:
    """A flat trace: no mode is ever over budget, so the ≥ 50 % target is n/a, not 'met'."""
    report = replay.run_trace(np.full(3 * 1440, 300.0), [2], [0], startup_min=4)
    cmp_ = report["predictive_vs_reactive"]
    assert isinstance(cmp_, dict) and cmp_["meets_target"] is None
    assert "n/a, reactive is never over budget" in replay.render_trace(report, "flat")
