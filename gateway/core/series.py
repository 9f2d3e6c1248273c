"""A time series from CSV lines: one reader for every file of ``time_s`` and a value that
the project takes — the forecaster's ``capacity.history_file`` (gateway.core.forecast) and
the load tests' demand traces (loadtest/trace.py).

The format: a header line naming the columns; ``#`` lines and blank lines skipped anywhere
(attribution and notes go there); ``time_s`` ≥ 0 and strictly increasing, any step; the
value column a finite number ≥ 0. A bad row raises :class:`SeriesError` naming the source and
the line. Pure: lines in, lists out.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable

TIME_COLUMN = "time_s"


class SeriesError(ValueError):
    """A series that cannot be read; the message names the source and the line."""


def read_series(lines: Iterable[str], source: str, column: str, *,
                other_columns_hint: str = "") -> tuple[list[float], list[float]]:
    """``(times, values)`` of ``column`` against ``time_s``. ``other_columns_hint``: when the
    header lacks ``column`` but has others, appended to the error with ``{columns}``
    replaced by them (how to pick one, in the caller's words)."""
    header: list[str] | None = None
    t_index = v_index = -1
    times: list[float] = []
    values: list[float] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = next(csv.reader([line]))
        where = f"{source}:{number}"
        if header is None:
            header = [f.strip() for f in fields]
            shown = ",".join(header)
            if TIME_COLUMN not in header:
                raise SeriesError(f"{where}: the header {shown!r} has no {TIME_COLUMN!r} "
                                  "column (seconds from the start)")
            if column not in header:
                others = [h for h in header if h != TIME_COLUMN]
                hint = (other_columns_hint.format(columns=", ".join(others))
                        if others and other_columns_hint else "")
                raise SeriesError(f"{where}: the header {shown!r} has no {column!r} "
                                  f"column{hint}")
            if len(set(header)) != len(header):
                raise SeriesError(f"{where}: the header {shown!r} repeats a column")
            t_index, v_index = header.index(TIME_COLUMN), header.index(column)
            continue
        if len(fields) != len(header):
            raise SeriesError(f"{where}: {len(fields)} fields, the header has {len(header)}")
        t, v = (_number(fields[index], name, where)
                for index, name in ((t_index, TIME_COLUMN), (v_index, column)))
        if t < 0:
            raise SeriesError(f"{where}: {TIME_COLUMN} {t:g} is negative")
        if times and t <= times[-1]:
            raise SeriesError(f"{where}: {TIME_COLUMN} {t:g} does not increase "
                              f"(the row before has {times[-1]:g})")
        if v < 0:
            raise SeriesError(f"{where}: {column} {v:g} is negative")
        times.append(t)
        values.append(v)
    if header is None:
        raise SeriesError(f"{source}: empty: no header line")
    return times, values


def _number(field: str, name: str, where: str) -> float:
    text = field.strip()
    try:
        value = float(text)
    except ValueError:
        raise SeriesError(f"{where}: {name} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise SeriesError(f"{where}: {name} is {text!r}, not a finite number")
    return value
