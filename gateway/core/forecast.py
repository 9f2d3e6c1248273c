"""Arrival-rate forecasting from the gateway's own history, with daily and weekly seasonality.

Pure: time is an argument (any consistent clock in seconds — seasonality uses lags of one day
and one week, not the calendar, so the shell may pass ``time.time()`` or a monotonic clock as
long as it keeps to one). History is a bounded ring of per-step mean rates
(``CapacityConfig.history_step_s``, ``history_max_points``); the bucket being filled is not
part of the history until the clock moves past it. Steps with no arrivals count as zero.

Models (each a function of the closed history ``y`` and a horizon in steps):

* ``recent_level`` — mean of the last ``level_window`` steps; the fallback below one day.
* ``seasonal_naive`` — the baseline: the value one season ago (one week when the history
  holds a week and a day, else one day).
* ``seasonal_mean`` — the same time of day (or of week) averaged over up to four past
  seasons, each smoothed over ± ``smoothing_steps`` neighbours; averaging tames noise.
* ``seasonal_level`` — ``seasonal_mean`` scaled by the recent level ratio: observed over
  seasonal over the last ``level_window`` steps, clipped to [0.5, 2]. It follows growth and
  an unusual day without forgetting the shape of the day.

The :class:`Forecaster` picks, every ``refit_every`` closed steps, the model with the lowest
mean absolute error in a backtest over its own recent history (walk-forward, no peeking),
and falls back to ``recent_level`` while less than a day is known. A recorded history
(:func:`parse_history`, ``capacity.history_file``) is loaded with :meth:`Forecaster.preload`
before live recording, so the seasonal models apply from the first minute. The selection backtest
walks over the last week (or what is known) at about 400 origins, predicting
``selection_horizon_s`` ahead (the lead time the forecasts are used at).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.core.series import read_series

DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
DEFAULT_LEVEL_WINDOW_S = 600.0
DEFAULT_SMOOTHING_S = 600.0
DEFAULT_REFIT_EVERY = 180
DEFAULT_SELECTION_ORIGINS = 400
MAX_SEASONS = 4
_RATIO_BOUNDS = (0.5, 2.0)

Array = npt.NDArray[np.float64]
Model = Callable[[Array, int, "Seasons"], float]


@dataclass(frozen=True, slots=True)
class Seasons:
    """Season lengths in steps for one step size, and the smoothing/level windows."""

    day: int
    week: int
    level_window: int
    smoothing_steps: int

    @classmethod
    def for_step(cls, step_s: float, level_window_s: float = DEFAULT_LEVEL_WINDOW_S,
                 smoothing_s: float = DEFAULT_SMOOTHING_S) -> Seasons:
        if step_s <= 0:
            raise ValueError("step_s must be > 0")
        day = max(1, round(DAY_S / step_s))
        return cls(day=day, week=7 * day, level_window=max(1, round(level_window_s / step_s)),
                   smoothing_steps=max(0, round(smoothing_s / step_s)))

    def period(self, n: int) -> int | None:
        """The season to use with ``n`` points: a week once a week and a day are known (so the
        level window has a week-ago match), else a day, else none."""
        if n >= self.week + self.day:
            return self.week
        if n >= self.day + self.level_window:
            return self.day
        return None


def recent_level(y: Array, h: int, s: Seasons) -> float:
    if len(y) == 0:
        return 0.0
    return float(y[-s.level_window:].mean())


def seasonal_naive(y: Array, h: int, s: Seasons) -> float:
    n = len(y)
    period = s.period(n)
    if period is None or h > period:
        return recent_level(y, h, s)
    return float(y[n - 1 + h - period])


def _seasonal_at(y: Array, index: int, period: int, smoothing: int, n: int) -> float:
    """Mean of ``y`` around ``index − k × period`` for k = 1..MAX_SEASONS, using only points
    before ``n`` (the forecast origin)."""
    total = 0.0
    count = 0
    for k in range(1, MAX_SEASONS + 1):
        centre = index - k * period
        lo = max(0, centre - smoothing)
        hi = min(n, centre + smoothing + 1)
        if centre < 0 or hi <= lo:
            break
        total += float(y[lo:hi].mean())
        count += 1
    return total / count if count else math.nan


def seasonal_mean(y: Array, h: int, s: Seasons) -> float:
    n = len(y)
    period = s.period(n)
    if period is None:
        return recent_level(y, h, s)
    value = _seasonal_at(y, n - 1 + h, period, s.smoothing_steps, n)
    return recent_level(y, h, s) if math.isnan(value) else value


def seasonal_level(y: Array, h: int, s: Seasons) -> float:
    n = len(y)
    period = s.period(n)
    if period is None:
        return recent_level(y, h, s)
    base = _seasonal_at(y, n - 1 + h, period, s.smoothing_steps, n)
    if math.isnan(base):
        return recent_level(y, h, s)
    window = min(s.level_window, n)
    expected = 0.0
    for i in range(n - window, n):
        value = _seasonal_at(y, i, period, s.smoothing_steps, n)
        if math.isnan(value):
            return base
        expected += value
    observed = float(y[n - window:].sum())
    if expected <= 0:
        return base if observed <= 0 else observed / window
    ratio = min(_RATIO_BOUNDS[1], max(_RATIO_BOUNDS[0], observed / expected))
    return base * ratio


MODELS: dict[str, Model] = {
    "recent_level": recent_level,
    "seasonal_naive": seasonal_naive,
    "seasonal_mean": seasonal_mean,
    "seasonal_level": seasonal_level,
}
BASELINE = "seasonal_naive"


def backtest(
    values: Sequence[float] | Array,
    seasons: Seasons,
    horizon_steps: int,
    start: int,
    stride: int = 1,
    models: Iterable[str] = tuple(MODELS),
) -> dict[str, float]:
    """Walk-forward mean absolute error of each model: for every origin ``t`` in
    ``range(start, len(values) − horizon_steps + 1, stride)`` a model sees ``values[:t]`` and
    predicts ``values[t − 1 + horizon_steps]``."""
    y = np.asarray(values, dtype=np.float64)
    if horizon_steps < 1:
        raise ValueError("horizon_steps must be >= 1")
    origins = range(max(1, start), len(y) - horizon_steps + 1, max(1, stride))
    if len(origins) == 0:
        raise ValueError("history too short for this backtest")
    errors: dict[str, float] = {}
    for name in models:
        model = MODELS[name]
        total = 0.0
        for t in origins:
            total += abs(model(y[:t], horizon_steps, seasons) - y[t - 1 + horizon_steps])
        errors[name] = total / len(origins)
    return errors


def parse_history(lines: Iterable[str], source: str = "<history>"
                  ) -> tuple[list[float], list[float]]:
    """A history CSV (``capacity.history_file``): ``time_s`` and ``rate`` columns in the
    format of :mod:`gateway.core.series` (the load tests' traces read the same way);
    ``time_s`` in the capacity clock's seconds (Unix time × ``capacity.time_scale``),
    ``rate`` in requests per second. A bad row raises ValueError naming ``source`` and the
    line."""
    return read_series(lines, source, "rate")


@dataclass(frozen=True, slots=True)
class ForecasterStatistics:
    step_s: float
    points: int
    max_points: int
    model: str
    backtest_mae: tuple[tuple[str, float], ...]  # last selection's errors, best first
    last_step_index: int | None


class Forecaster:
    """Bounded arrival-rate history plus model selection. Not thread-safe; one owner."""

    __slots__ = ("_array", "_best", "_closed_since_fit", "_errors", "_last_index", "_open_count",
                 "_open_index", "_open_rate_n", "_open_rate_sum", "_refit_every",
                 "_selection_horizon", "_values", "max_points", "seasons", "step_s")

    def __init__(self, step_s: float = 60.0, max_points: int = 20_160,
                 level_window_s: float = DEFAULT_LEVEL_WINDOW_S,
                 smoothing_s: float = DEFAULT_SMOOTHING_S,
                 refit_every: int = DEFAULT_REFIT_EVERY,
                 selection_horizon_s: float = 300.0) -> None:
        if max_points < 1:
            raise ValueError("max_points must be >= 1")
        self.step_s = float(step_s)
        self.max_points = max_points
        self.seasons = Seasons.for_step(step_s, level_window_s, smoothing_s)
        self._values: deque[float] = deque(maxlen=max_points)
        self._last_index: int | None = None   # bucket index of the newest closed value
        self._open_index: int | None = None
        self._open_count = 0.0
        self._open_rate_sum = 0.0
        self._open_rate_n = 0
        self._array: Array | None = None
        self._refit_every = max(1, refit_every)
        self._selection_horizon = max(1, round(selection_horizon_s / self.step_s))
        self._closed_since_fit = self._refit_every
        self._best = "recent_level"
        self._errors: tuple[tuple[str, float], ...] = ()

    def __repr__(self) -> str:
        return (f"<Forecaster step_s={self.step_s:g} points={len(self._values)}/"
                f"{self.max_points} model={self._best}>")

    # -- recording ---------------------------------------------------------------------------

    def _bucket(self, now: float) -> int:
        return math.floor(now / self.step_s)

    def _close_through(self, index: int) -> None:
        """Close the open bucket and any empty ones before ``index``."""
        if self._open_index is None or index <= self._open_index:
            return
        rate = self._open_count / self.step_s
        if self._open_rate_n:
            rate += self._open_rate_sum / self._open_rate_n
        self._append(self._open_index, rate)
        gap = min(index - self._open_index - 1, self.max_points)
        for i in range(index - gap, index):
            self._append(i, 0.0)
        self._open_index, self._open_count = index, 0.0
        self._open_rate_sum, self._open_rate_n = 0.0, 0

    def _append(self, index: int, rate: float) -> None:
        self._values.append(max(0.0, rate))
        self._last_index = index
        self._array = None
        self._closed_since_fit += 1

    def _touch(self, now: float) -> None:
        index = self._bucket(now)
        if self._open_index is None:
            if self._last_index is not None and index <= self._last_index:
                index = self._last_index + 1  # late sample: count it in the next open bucket
            self._open_index = index
        else:
            self._close_through(index)

    def record(self, now: float, count: float = 1.0) -> None:
        """``count`` arrivals at ``now`` (late arrivals go to the bucket being filled)."""
        self._touch(now)
        self._open_count += count

    def record_rate(self, now: float, rate_per_s: float) -> None:
        """A sampled rate at ``now``; the bucket's rate is the mean of its samples.
        Use either this or :meth:`record` for one forecaster, not both."""
        self._touch(now)
        self._open_rate_sum += rate_per_s
        self._open_rate_n += 1

    def advance(self, now: float) -> None:
        """Close buckets that ended before ``now`` even if nothing arrived since."""
        if self._open_index is not None:
            self._close_through(self._bucket(now))

    def extend(self, start_s: float, rates_per_s: Iterable[float]) -> None:
        """Bulk-load closed steps (a history file, a synthetic past) starting at ``start_s``.
        Must start after what is already known."""
        index = self._bucket(start_s)
        if self._open_index is not None or (self._last_index is not None
                                            and index <= self._last_index):
            raise ValueError("extend() must come before live recording and after the history")
        for rate in rates_per_s:
            self._append(index, float(rate))
            index += 1

    def preload(self, times_s: Sequence[float] | Array, rates_per_s: Sequence[float] | Array,
                now: float) -> int:
        """Load a recorded history (``capacity.history_file``) before live recording: the
        rates at ``times_s`` (increasing, any spacing) resampled onto this forecaster's steps,
        linear between points and the last point held up to the step before ``now``'s, so
        the live steps follow without a gap; points at or after ``now``'s step are left out,
        and only the newest ``max_points`` steps are kept. Returns the steps loaded."""
        t = np.asarray(times_s, dtype=np.float64)
        r = np.asarray(rates_per_s, dtype=np.float64)
        if len(t) != len(r):
            raise ValueError("times_s and rates_per_s differ in length")
        current = self._bucket(now)
        keep = t < current * self.step_s
        t, r = t[keep], r[keep]
        if len(t) == 0:
            return 0
        first = max(self._bucket(float(t[0])), current - self.max_points)
        grid = np.arange(first, current, dtype=np.float64) * self.step_s
        self.extend(first * self.step_s, np.interp(grid, t, r).tolist())
        return len(grid)

    # -- forecasting -------------------------------------------------------------------------

    def history(self) -> Array:
        if self._array is None:
            self._array = np.fromiter(self._values, dtype=np.float64, count=len(self._values))
        return self._array

    def _maybe_refit(self) -> None:
        if self._closed_since_fit < self._refit_every:
            return
        self._closed_since_fit = 0
        y = self.history()
        s = self.seasons
        if s.period(len(y)) is None:
            self._best, self._errors = "recent_level", ()
            return
        horizon = self._selection_horizon
        start = max(s.day + s.level_window, len(y) - s.week)
        stride = max(1, (len(y) - start) // DEFAULT_SELECTION_ORIGINS)
        try:
            errors = backtest(y, s, horizon, start, stride)
        except ValueError:
            self._best, self._errors = "seasonal_level", ()
            return
        ranked = sorted(errors.items(), key=lambda kv: kv[1])
        self._errors = tuple(ranked)
        self._best = ranked[0][0]

    def _horizon_steps(self, now: float, horizon_s: float) -> int:
        if self._last_index is None:
            return 1
        return max(1, self._bucket(now + max(0.0, horizon_s)) - self._last_index)

    def forecast(self, now: float, horizon_s: float) -> float:
        """Expected mean arrival rate (per second) in the step containing ``now + horizon_s``.
        0.0 with no history at all."""
        y = self.history()
        if len(y) == 0:
            return 0.0
        self._maybe_refit()
        return max(0.0, MODELS[self._best](y, self._horizon_steps(now, horizon_s), self.seasons))

    def forecast_peak(self, now: float, horizon_s: float) -> float:
        """Highest forecast step from ``now`` to ``now + horizon_s``: what capacity ordered
        now must cover until replicas ordered next are ready."""
        y = self.history()
        if len(y) == 0:
            return 0.0
        self._maybe_refit()
        first = self._horizon_steps(now, 0.0)
        last = self._horizon_steps(now, horizon_s)
        model = MODELS[self._best]
        return max(0.0, max(model(y, h, self.seasons) for h in range(first, last + 1)))

    def statistics(self) -> ForecasterStatistics:
        return ForecasterStatistics(step_s=self.step_s, points=len(self._values),
                                    max_points=self.max_points, model=self._best,
                                    backtest_mae=self._errors, last_step_index=self._last_index)
