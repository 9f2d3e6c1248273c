"""The arrival-rate forecaster: bounded history on a fake clock, fallbacks, and a backtest
against the seasonal-naive baseline on synthetic diurnal + weekly traffic."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from gateway.core.forecast import (
    BASELINE,
    DAY_S,
    MODELS,
    Forecaster,
    Seasons,
    backtest,
    seasonal_level,
    seasonal_mean,
)

Array = npt.NDArray[np.float64]


def synthetic(days: int, step_s: float, seed: int, noise: float = 0.1,
              growth_per_day: float = 0.01) -> Array:
    """Diurnal double hump, quieter weekends, slow growth, multiplicative noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(days * DAY_S / step_s)) * step_s
    tod = (t % DAY_S) / DAY_S
    dow = (t // DAY_S) % 7
    base = 100 + 80 * np.sin(np.pi * tod) ** 2 + 60 * np.exp(-(((tod - 0.45) / 0.05) ** 2))
    base = base * np.where(dow >= 5, 0.6, 1.0) * (1 + growth_per_day * t / DAY_S)
    out: Array = base * rng.lognormal(0.0, noise, len(t))
    return out


# --- history on a fake clock ----------------------------------------------------------------


def test_record_buckets_arrivals_and_zero_fills_gaps() -> None:
    f = Forecaster(step_s=10, max_points=100)
    for now in (0.0, 1.0, 9.9):           # bucket 0: 3 arrivals → 0.3/s
        f.record(now)
    f.record(15.0, count=5)               # bucket 1: 0.5/s
    f.record(42.0)                        # closes 1, fills bucket 2 and 3 with zero
    assert f.history().tolist() == pytest.approx([0.3, 0.5, 0.0, 0.0])
    f.advance(60.0)                       # closes bucket 4 (1 arrival) and 5 (empty)
    assert f.history().tolist() == pytest.approx([0.3, 0.5, 0.0, 0.0, 0.1, 0.0])
    assert f.statistics().last_step_index == 5


def test_late_arrival_counts_in_open_bucket() -> None:
    f = Forecaster(step_s=10, max_points=10)
    f.record(25.0)
    f.record(3.0)   # the clock is monotonic in the shell; a late sample is not lost
    f.advance(30.0)
    assert f.history().tolist() == pytest.approx([0.2])


def test_history_is_bounded() -> None:
    f = Forecaster(step_s=1, max_points=50)
    f.extend(0, [1.0] * 40)
    for now in range(40, 1000):
        f.record(float(now))
    f.record(1e7)  # a huge gap fills at most max_points zeros
    assert len(f.history()) == 50
    assert f.statistics().points == 50


def test_record_rate_takes_the_mean_of_samples() -> None:
    f = Forecaster(step_s=60, max_points=10)
    f.record_rate(0, 10.0)
    f.record_rate(30, 20.0)
    f.advance(60)
    assert f.history().tolist() == pytest.approx([15.0])


def test_extend_only_before_live_data() -> None:
    f = Forecaster(step_s=60, max_points=10)
    f.record(0)
    with pytest.raises(ValueError):
        f.extend(600, [1.0])


# --- fallbacks --------------------------------------------------------------------------------


def test_no_history_forecasts_zero() -> None:
    assert Forecaster().forecast(0.0, 120) == 0.0
    assert Forecaster().forecast_peak(0.0, 120) == 0.0


def test_short_history_falls_back_to_recent_level() -> None:
    f = Forecaster(step_s=60, max_points=1000)
    f.extend(0, [5.0] * 100 + [50.0] * 10)     # under a day: no seasonality yet
    assert f.forecast(110 * 60, 600) == pytest.approx(50.0)
    assert f.statistics().model == "recent_level"


# --- seasonality ------------------------------------------------------------------------------


def test_forecast_anticipates_the_daily_rise() -> None:
    step = 300.0
    y = synthetic(days=15, step_s=step, seed=3, noise=0.02)
    day_steps = int(DAY_S / step)
    origin = 14 * day_steps + int(0.30 * day_steps)      # 07:12, before the midday hump
    f = Forecaster(step_s=step, max_points=len(y))
    f.extend(0, y[:origin].tolist())
    now = origin * step
    ahead = f.forecast(now, 3 * 3600)                    # 10:12, on the hump
    actual = float(y[origin + 35])
    assert ahead == pytest.approx(actual, rel=0.1)
    assert ahead > 1.3 * float(y[origin - 1])            # not just the current level
    assert f.forecast_peak(now, 3 * 3600) >= ahead


def test_level_correction_follows_a_busier_day() -> None:
    step = 300.0
    y = synthetic(days=9, step_s=step, seed=5, noise=0.02)
    y[-100:] *= 1.5                                      # today is 50 % busier
    s = Seasons.for_step(step)
    mean_only = seasonal_mean(y, 6, s)
    corrected = seasonal_level(y, 6, s)
    assert corrected / mean_only == pytest.approx(1.5, rel=0.1)


@pytest.mark.parametrize(("step_s", "horizon_s"), [(300.0, 300.0), (300.0, 1800.0),
                                                   (300.0, 3 * 3600.0), (60.0, 300.0)])
@pytest.mark.parametrize("seed", [11, 12])
def test_backtest_beats_seasonal_naive(step_s: float, horizon_s: float, seed: int) -> None:
    y = synthetic(days=21, step_s=step_s, seed=seed)
    s = Seasons.for_step(step_s)
    week = s.week
    stride = max(1, week // 300)
    errors = backtest(y, s, max(1, round(horizon_s / step_s)), start=len(y) - week,
                      stride=stride)
    assert set(errors) == set(MODELS)
    assert errors["seasonal_level"] <= errors[BASELINE]
    assert min(errors.values()) < errors[BASELINE]


def test_forecaster_selects_a_model_no_worse_than_the_baseline() -> None:
    step = 300.0
    y = synthetic(days=15, step_s=step, seed=21)
    f = Forecaster(step_s=step, max_points=len(y), selection_horizon_s=600)
    f.extend(0, y.tolist())
    f.forecast(len(y) * step, 600)
    stats = f.statistics()
    errors = dict(stats.backtest_mae)
    assert stats.model in MODELS
    assert errors[stats.model] <= errors[BASELINE]
    assert stats.backtest_mae[0][0] == stats.model


def test_backtest_rejects_impossible_windows() -> None:
    s = Seasons.for_step(60)
    with pytest.raises(ValueError):
        backtest([1.0, 2.0], s, 5, start=1)
    with pytest.raises(ValueError):
        backtest([1.0] * 10, s, 0, start=1)


def test_replay_predictive_beats_reactive() -> None:
    """The replay benchmark's headline on one seed (deterministic, about a second)."""
    from loadtest.replay import run

    report = run(seed=1, startup_min=4)
    modes = {m["mode"]: m for m in report["modes"]}  # type: ignore[attr-defined]
    reactive, predictive = modes["reactive"], modes["predictive"]
    assert predictive["over_budget_minutes"] <= 0.5 * reactive["over_budget_minutes"]
    assert predictive["gpu_hours"] <= 1.10 * reactive["gpu_hours"]
