"""capacity.time_scale and capacity.history_file: the forecaster's scaled clock and the
history it starts from (gateway.core.capacity.CapacityClock, Forecaster.preload,
gateway.core.forecast.parse_history, gateway.ops.telemetry.read_history)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gateway.core.capacity import CapacityClock
from gateway.core.config import parse_config
from gateway.core.forecast import DAY_S, Forecaster, parse_history
from gateway.core.schema import ConfigError
from gateway.ops.telemetry import (
    ARRIVAL_HALF_LIFE_S,
    MIN_SIGNAL_HALF_LIFE_S,
    UTILISATION_HALF_LIFE_S,
    Telemetry,
    ewma_weight,
    read_history,
    signal_half_life_s,
)


@pytest.mark.parametrize(("scale", "offset", "now", "expected"), [
    (1.0, 0.0, 12.5, 12.5),
    (1.0, 1_700_000_000.0, 2.0, 1_700_000_002.0),      # monotonic → Unix time
    (300.0, 0.0, 1.0, 300.0),                          # one real second: five minutes
    (300.0, 10.0, 2.0, 3600.0),
    (60.0, 0.0, 1440.0, DAY_S),                        # a day in 24 real minutes
])
def test_the_clock_maps_the_shells_time_to_capacity_seconds(
        scale: float, offset: float, now: float, expected: float) -> None:
    assert CapacityClock(scale, offset).at(now) == pytest.approx(expected)


@pytest.mark.parametrize(("scale", "count", "recorded", "half_life_real_s"), [
    (1.0, 7.0, 7.0, 10.0),
    (300.0, 7.0, 2100.0, 10.0 / 300),
    (0.5, 4.0, 2.0, 20.0),
])
def test_rates_stay_in_real_requests_per_second(scale: float, count: float, recorded: float,
                                                half_life_real_s: float) -> None:
    clock = CapacityClock(scale)
    assert clock.arrivals(count) == pytest.approx(recorded)
    assert clock.real_s(10.0) == pytest.approx(half_life_real_s)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_a_clock_needs_a_finite_positive_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="time_scale"):
        CapacityClock(scale)


def test_a_compressed_day_has_its_daily_season() -> None:
    """At 300x a day lasts 288 real seconds; arrivals counted per real second, recorded on
    the scaled clock, give the real rate per 5-minute step, and a week of them a daily
    forecast: the same forecaster at 1x would see five minutes of history."""
    clock = CapacityClock(300.0)
    f = Forecaster(step_s=300.0, max_points=10_000, selection_horizon_s=900.0)
    steps_per_day = 288

    def rate(step: int) -> float:   # 100 req/s at night, 200 at noon
        return 150.0 - 50.0 * math.cos(2 * math.pi * (step % steps_per_day) / steps_per_day)

    for step in range(8 * steps_per_day):        # one real second per step
        f.record(clock.at(float(step)), clock.arrivals(rate(step)))
    f.advance(clock.at(8.0 * steps_per_day))
    y = f.history()
    assert len(y) == 8 * steps_per_day
    assert y[steps_per_day // 2] == pytest.approx(rate(steps_per_day // 2))
    now = clock.at(8.0 * steps_per_day + 130)     # just before noon of day 9
    assert f.forecast(now, 3 * 300.0) == pytest.approx(rate(133), rel=0.02)


def test_preload_resamples_onto_the_steps_and_ends_where_live_recording_starts() -> None:
    f = Forecaster(step_s=60.0, max_points=100)
    # every 5 minutes, the last point 2 steps before now's; one point in now's step is dropped
    times = [0.0, 300.0, 600.0, 900.0, 1200.0]
    rates = [10.0, 20.0, 20.0, 40.0, 99.0]
    loaded = f.preload(times, rates, now=1210.0)
    assert loaded == 20
    y = f.history()
    assert list(y[:6]) == pytest.approx([10.0, 12.0, 14.0, 16.0, 18.0, 20.0])
    assert y[-1] == pytest.approx(40.0)          # the last point before now, held
    f.record(1215.0, 60.0)                       # live recording follows without a gap
    f.advance(1260.0)
    assert len(f.history()) == 21 and f.history()[-1] == pytest.approx(1.0)
    assert f.statistics().last_step_index == 20


def test_preload_keeps_the_newest_max_points_and_ignores_the_future() -> None:
    f = Forecaster(step_s=1.0, max_points=10)
    assert f.preload(np.arange(100.0), np.arange(100.0), now=50.0) == 10
    assert list(f.history()) == pytest.approx(list(range(40, 50)))
    g = Forecaster(step_s=1.0)
    assert g.preload([60.0, 70.0], [1.0, 2.0], now=50.0) == 0
    assert len(g.history()) == 0


def test_parse_history_reads_the_csv() -> None:
    lines = ["# exported from Prometheus", "time_s,rate,note", "", "0,1.5,x", "60,2,y"]
    assert parse_history(lines) == ([0.0, 60.0], [1.5, 2.0])


@pytest.mark.parametrize(("lines", "message"), [
    ([], "no header"),
    (["time,rate"], "has no 'time_s' column"),
    (["time_s,cpu"], "has no 'rate' column"),
    (["time_s,rate", "0,1", "0,2"], "h.csv:3: time_s 0 does not increase"),
    (["time_s,rate", "0,n/a"], "h.csv:2: rate is 'n/a', not a number"),
    (["time_s,rate", "0,-1"], "h.csv:2: rate -1 is negative"),
    (["time_s,rate", "0,1,2"], "h.csv:2: 3 fields"),
    (["time_s,rate", "inf,1"], "time_s is 'inf', not a finite number"),
])
def test_a_bad_history_names_the_line(lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_history(lines, "h.csv")


def test_a_bad_history_file_is_a_configuration_error(tmp_path: Path) -> None:
    assert read_history(None) is None
    good = tmp_path / "h.csv"
    good.write_text("time_s,rate\n0,1\n")
    assert read_history(str(good)) == ([0.0], [1.0])
    bad = tmp_path / "bad.csv"
    bad.write_text("time_s,rate\n0,x\n")
    for path, message in ((bad, "bad.csv:2"), (tmp_path / "none.csv", "cannot read")):
        with pytest.raises(ConfigError, match=message) as info:
            read_history(str(path))
        assert info.value.path == "capacity.history_file"


def test_the_options_default_to_real_time_and_no_history() -> None:
    cfg = parse_config({"workers": [{"url": "http://a:1"}]})
    assert cfg.capacity.time_scale == 1.0 and cfg.capacity.history_file is None
    cfg = parse_config({"workers": [{"url": "http://a:1"}],
                            "capacity": {"time_scale": 300, "history_file": "h.csv"}})
    assert cfg.capacity.time_scale == 300.0 and cfg.capacity.history_file == "h.csv"
    with pytest.raises(ConfigError, match=r"capacity\.time_scale"):
        parse_config({"workers": [{"url": "http://a:1"}], "capacity": {"time_scale": 0}})


# --- both averaged signals compress alike (gateway.ops.telemetry) ---------------------------

class _Worker:
    """What Telemetry.sample reads of a worker: a serving one with one slot, its in-flight
    request-seconds set by the test."""

    def __init__(self, wid: str) -> None:
        self.id = wid
        self.is_routable = True
        self.capacity_units = 1
        self.models_ready = frozenset({"simple"})
        self.busy_s = 0.0

    def busy_seconds(self) -> dict[str, float]:
        return {"simple": self.busy_s}


class _Service:
    def __init__(self, time_scale: float) -> None:
        self.cfg = parse_config({"workers": [{"url": "http://a:1"}],
                                 "capacity": {"time_scale": time_scale,
                                              "target_utilisation": 0.85}})
        self.fleet: list[_Worker] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def workers(self) -> list[_Worker]:
        return self.fleet

    def model_known(self, name: str) -> bool:
        return True

    def saturation_seconds(self) -> float:
        return 0.0


def _telemetry(time_scale: float) -> tuple[Telemetry, _Service]:
    svc = _Service(time_scale)
    return Telemetry(svc), svc  # type: ignore[arg-type]


@pytest.mark.parametrize(("scale", "arrival_half_life_s", "utilisation_half_life_s"), [
    (1.0, 10.0, UTILISATION_HALF_LIFE_S),        # production: as shipped
    (2.0, 5.0, UTILISATION_HALF_LIFE_S / 2),
    (5.0, 2.0, MIN_SIGNAL_HALF_LIFE_S),          # the utilisation's reaches the floor first
    (300.0, MIN_SIGNAL_HALF_LIFE_S, MIN_SIGNAL_HALF_LIFE_S),
])
def test_both_signals_half_lives_shrink_with_time_to_one_floor(
        scale: float, arrival_half_life_s: float, utilisation_half_life_s: float) -> None:
    clock = CapacityClock(scale)
    assert signal_half_life_s(ARRIVAL_HALF_LIFE_S, clock) == pytest.approx(arrival_half_life_s)
    assert signal_half_life_s(UTILISATION_HALF_LIFE_S, clock) == pytest.approx(
        utilisation_half_life_s)


def test_the_utilisation_weight_is_unchanged_in_real_time_and_floored_when_compressed(
        ) -> None:
    t, _ = _telemetry(1.0)
    assert t.sample_interval_s == 1.0
    assert t.utilisation_weight == pytest.approx(0.2)     # the EWMA as it always was
    t, svc = _telemetry(300.0)
    assert t.sample_interval_s == pytest.approx(0.05)
    # 0.05 s samples under a 1 s half-life: the same real span as the arrival meter's, not
    # the 0.22 s a fixed weight of 0.2 per sample would give.
    assert t.utilisation_weight == pytest.approx(ewma_weight(0.05, MIN_SIGNAL_HALF_LIFE_S))
    assert t.utilisation_weight == pytest.approx(0.0341, abs=1e-4)
    svc.fleet = [_Worker("w1")]
    t.sample(0.0)
    assert t.models["simple"].arrival_meter.half_life_s == pytest.approx(
        MIN_SIGNAL_HALF_LIFE_S)


def test_a_worker_joining_does_not_inflate_the_reactive_signal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The busy slots are averaged, over the slots ready now: when a worker joins, current ×
    utilisation (the busy work) stays where it was, so the reactive rule does not ask for
    more because the fleet grew."""
    mono = [0.0]
    monkeypatch.setattr("gateway.ops.telemetry.time.monotonic", lambda: mono[0])
    t, svc = _telemetry(1.0)
    a, b, c = _Worker("a"), _Worker("b"), _Worker("c")
    svc.fleet = [a, b]

    def tick(busy: dict[_Worker, float]) -> None:
        mono[0] += 1.0
        svc.now += 1.0
        for w, b in busy.items():
            w.busy_s += b
        t.sample(svc.now)

    for _ in range(60):                  # two workers, 1.7 busy slots: steady at 0.85
        tick({a: 0.85, b: 0.85})
    mc = t.models["simple"]
    assert mc.utilisation == pytest.approx(0.85, abs=1e-3)
    assert t.desired_replicas("simple", svc.now)[0] == 3  # ceil(1.7 / 0.85) + 1 (N+1)
    svc.fleet = [a, b, c]               # a third joins; still 1.7 busy slots, over three
    tick({a: 0.85, b: 0.85, c: 0.0})
    assert 3 * mc.utilisation == pytest.approx(1.7, abs=1e-3)
    assert t.fleet_utilisation == pytest.approx(1.7 / 3, abs=1e-3)
    # An average of the ratio would read 0.8 × 0.85 + 0.2 × 0.57 = 0.79 here, 2.4 busy
    # replicas, and ask for a fourth: ceil(3 × 0.79 / 0.85) + 1 = 4.
    assert t.desired_replicas("simple", svc.now)[0] == 3
