"""Demand traces from CSV files, for ``python -m loadtest.replay --trace FILE``.

A trace is a CSV file with a header line. Lines that start with ``#`` and blank lines are
skipped anywhere (attribution and notes go there). One column is ``time_s`` — seconds from
the start of the trace, strictly increasing, any step (a minute, 5 minutes, uneven) — and one
column holds the demand (the rows are read by gateway.core.series, as the gateway reads
``capacity.history_file``):

* ``rate`` — requests per second, used as it is (``time_s,rate`` needs no other flag);
* any other numeric column (``--column cpu_usage``) — a usage figure, scaled linearly so that
  its largest value becomes ``peak_rps``.

Every value must be a finite number, the demand ≥ 0; a bad row is an error that names the
file and the line. The replay steps the fleet once a minute, so :func:`per_minute` resamples
the trace to 60-second steps: linear interpolation between samples, the last sample held for
one more step of the trace (a 30-day trace at 5 minutes gives 43,200 minutes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.core.series import SeriesError, read_series

Array = npt.NDArray[np.float64]

RATE_COLUMN = "rate"
STEP_S = 60.0


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class Trace:
    times_s: Array      # strictly increasing, seconds from the start of the trace
    rates: Array        # requests per second (already scaled)
    column: str         # the column the demand came from
    scale: float        # rate = value × scale (1.0 for a ``rate`` column without a peak)

    @property
    def step_s(self) -> float:
        """The trace's typical step: the median gap between samples."""
        return float(np.median(np.diff(self.times_s)))


def parse_trace(lines: Iterable[str], source: str = "<trace>", column: str | None = None,
                peak_rps: float | None = None) -> Trace:
    """Read a trace from CSV lines. ``column`` picks the demand column (default ``rate``);
    ``peak_rps`` scales it so that its maximum becomes that rate (required for a column
    other than ``rate``)."""
    want = column or RATE_COLUMN
    if peak_rps is not None and not (math.isfinite(peak_rps) and peak_rps > 0):
        raise TraceError(f"{source}: --peak-rps must be a positive number, not {peak_rps}")
    if want != RATE_COLUMN and peak_rps is None:
        raise TraceError(f"{source}: column {want!r} is a usage figure, not req/s: "
                         "give --peak-rps to scale it")
    try:
        times, values = read_series(
            lines, source, want,
            other_columns_hint=("; pick one with --column ({columns}) and --peak-rps"
                                if column is None else ""))
    except SeriesError as exc:
        raise TraceError(str(exc)) from None
    if len(times) < 2:
        raise TraceError(f"{source}: {len(times)} data row(s); a trace needs at least 2")
    raw_values = np.asarray(values, dtype=np.float64)
    scale = 1.0
    if peak_rps is not None:
        top = float(raw_values.max())
        if top <= 0:
            raise TraceError(f"{source}: every {want} is 0: nothing to scale to --peak-rps")
        scale = peak_rps / top
    return Trace(np.asarray(times, dtype=np.float64), raw_values * scale, want, scale)


def read_trace(path: str | Path, column: str | None = None,
               peak_rps: float | None = None) -> Trace:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not UTF-8 text") from None
    return parse_trace(text.splitlines(), str(p), column, peak_rps)


def per_minute(trace: Trace, step_s: float = STEP_S) -> Array:
    """The rate at each ``step_s`` from the first sample: linear between samples, the last
    sample held for one more trace step."""
    t = trace.times_s - trace.times_s[0]
    end = float(t[-1]) + trace.step_s
    grid = np.arange(0.0, end - 1e-9, step_s)
    return np.asarray(np.interp(grid, t, trace.rates), dtype=np.float64)
