"""The demo's live view: what it reads from the running gateway (``/status.json`` and the
latency histogram on ``/metrics``) and how one frame of it is drawn — in place on a terminal,
one line a second otherwise. Used by :mod:`gateway.tools.demo`."""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

FETCH_TIMEOUT_S = 1.0
P99_WINDOW_S = 5.0


# ------------------------------------------------------------------ reading the gateway

_BUCKET_LINE = re.compile(
    r'^gateway_request_duration_seconds_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LE = re.compile(r'le="(?P<le>[^"]+)"')


def parse_latency_buckets(exposition: str) -> dict[float, float]:
    """Cumulative bucket counts of ``gateway_request_duration_seconds``, summed over models."""
    buckets: dict[float, float] = {}
    for line in exposition.splitlines():
        match = _BUCKET_LINE.match(line)
        if not match:
            continue
        le = _LE.search(match["labels"])
        if le is None:
            continue
        bound = math.inf if le["le"] == "+Inf" else float(le["le"])
        buckets[bound] = buckets.get(bound, 0.0) + float(match["value"])
    return buckets


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``{upper bound: count}``."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return bounds[-1]


@dataclass(frozen=True, slots=True)
class Frame:
    """What one refresh of the live view shows."""

    elapsed_s: float
    status: dict[str, Any] | None
    rps: float | None
    p99_ms: float | None
    error: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # worker id → display name


class StatusReader:
    """Polls ``/status.json`` and ``/metrics``; RPS from counter deltas, p99 over a window."""

    def __init__(self, url: str, window_s: float = P99_WINDOW_S,
                 names: dict[str, str] | None = None) -> None:
        self._url = url
        self._names = dict(names or {})
        self._window_s = window_s
        self._histograms: deque[tuple[float, dict[float, float]]] = deque()
        self._last_count: tuple[float, int] | None = None
        self.last_status: dict[str, Any] | None = None

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self._url + path, timeout=FETCH_TIMEOUT_S) as response:
            body: bytes = response.read()
            return body

    def read(self, elapsed_s: float) -> Frame:
        now = time.monotonic()
        try:
            status = json.loads(self._get("/status.json"))
            buckets = parse_latency_buckets(self._get("/metrics").decode())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Frame(elapsed_s, self.last_status, None, None, error=str(exc),
                         names=self._names)
        self.last_status = status
        requests = int(status.get("counters", {}).get("requests", 0))
        rps = None
        if self._last_count is not None and now > self._last_count[0]:
            rps = (requests - self._last_count[1]) / (now - self._last_count[0])
        self._last_count = (now, requests)
        self._histograms.append((now, buckets))
        while len(self._histograms) > 1 and now - self._histograms[1][0] >= self._window_s:
            self._histograms.popleft()
        oldest = self._histograms[0][1]
        window = {b: c - oldest.get(b, 0.0) for b, c in buckets.items()}
        p99_s = histogram_quantile(0.99, window)
        return Frame(elapsed_s, status, rps, p99_s * 1000.0 if p99_s is not None else None,
                     names=self._names)


# ------------------------------------------------------------------ the live view

_BAR_WIDTH = 10


def _bar(used: float, total: float) -> str:
    filled = 0 if total <= 0 else min(_BAR_WIDTH, round(_BAR_WIDTH * used / total))
    return "#" * filled + "." * (_BAR_WIDTH - filled)


def _memory(worker: dict[str, Any]) -> str:
    free, total = worker.get("gpu_free_bytes"), worker.get("gpu_total_bytes")
    if free is None or not total:
        return "cpu"
    gib = 1024**3
    return f"{free / gib:.1f}/{total / gib:.0f} GiB free"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def status_counts(status: dict[str, Any]) -> tuple[int, int, int]:
    c = status.get("counters", {})
    rejected, errors = int(c.get("rejected", 0)), int(c.get("errors", 0))
    return int(c.get("requests", 0)) - rejected - errors, rejected, errors


def _rejection_reasons(status: dict[str, Any]) -> str:
    reasons: dict[str, int] = {}
    for r in status.get("rejections", []):
        key = f"{r.get('status')} {r.get('reason')}"
        reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def _name(worker: dict[str, Any], names: dict[str, str]) -> str:
    wid = str(worker.get("id"))
    return names.get(wid, wid)


def render_frame(frame: Frame, *, title: str) -> list[str]:
    """The full-screen view: a header, one row per worker, the fleet's totals."""
    names = frame.names
    lines = [f"{title}   t = {frame.elapsed_s:4.0f} s"]
    status = frame.status
    if status is None:
        return [*lines, f"  waiting for the gateway … {frame.error or ''}"]
    fleet = status.get("fleet", {})
    lines.append(f"  {'worker':<16} {'state':<9} {'breaker':<10} {'in flight / slots':<24} "
                 f"{'pending':>7}  {'memory':<16} {'latency':>9}")
    for w in status.get("workers", []):
        slots = int(w.get("slots") or 0)
        in_flight = int(w.get("in_flight") or 0)
        lines.append(
            f"  {_name(w, names)[:16]:<16} {str(w.get('state'))[:9]:<9} "
            f"{w.get('breaker')!s:<10} {_bar(in_flight, slots)} {in_flight:>3} / {slots:<5}   "
            f"{_num(w.get('pending')):>7}  {_memory(w):<16} {_ms(w.get('latency_ms')):>9}")
    admitted, shed, errors = status_counts(status)
    total = admitted + shed + errors
    shed_pct = f" ({100.0 * shed / total:.1f} %)" if total else ""
    desired = fleet.get("desired_replicas", {})
    lines += [
        f"  admitted {admitted:<8} shed {shed}{shed_pct:<10} errors {errors:<6} "
        f"queue {fleet.get('queue_length', 0)}",
        f"  RPS {_num(frame.rps):<7} p99 {_ms(frame.p99_ms):<9} "
        f"utilisation {100.0 * float(fleet.get('utilisation') or 0.0):.0f} %   "
        f"desired replicas: reactive {desired.get('reactive', '-')}, "
        f"predictive {desired.get('predictive', '-')}   "
        f"(ready {fleet.get('workers_ready', '-')}/{fleet.get('workers_total', '-')})",
        f"  recent rejections: {_rejection_reasons(status) or 'none'}",
    ]
    return lines


def render_line(frame: Frame) -> str:
    """One line per second, for pipes and dumb terminals."""
    names = frame.names
    head = f"[{frame.elapsed_s:4.0f} s]"
    status = frame.status
    if status is None:
        return f"{head} waiting for the gateway … {frame.error or ''}"
    admitted, shed, errors = status_counts(status)
    fleet = status.get("fleet", {})
    desired = fleet.get("desired_replicas", {})
    workers = " | ".join(
        f"{_name(w, names)} {w.get('in_flight', 0)}/{w.get('slots', 0)} "
        f"pend {_num(w.get('pending'))} {_memory(w)} {w.get('breaker')}"
        for w in status.get("workers", []))
    return (f"{head} RPS {_num(frame.rps)} p99 {_ms(frame.p99_ms)} admitted {admitted} "
            f"shed {shed} errors {errors} queue {fleet.get('queue_length', 0)} "
            f"desired {desired.get('reactive', '-')}/{desired.get('predictive', '-')} "
            f"|| {workers}")


class LiveView:
    """Redraws the frame in place on an ANSI terminal; prints one line a second otherwise."""

    def __init__(self, out: TextIO, *, title: str, redraw: bool | None = None) -> None:
        self._out = out
        self._title = title
        if redraw is None:
            term = os.environ.get("TERM", "")
            redraw = out.isatty() and term not in ("", "dumb")
        self._redraw = redraw
        self._drawn = 0

    def show(self, frame: Frame) -> None:
        if not self._redraw:
            print(render_line(frame), file=self._out, flush=True)
            return
        lines = render_frame(frame, title=self._title)
        parts = [f"\x1b[{self._drawn}F"] if self._drawn else []
        parts += [f"\x1b[2K{line}\n" for line in lines]
        if self._drawn > len(lines):  # clear what a longer previous frame left
            parts += ["\x1b[2K\n"] * (self._drawn - len(lines))
            parts.append(f"\x1b[{self._drawn - len(lines)}F")
        self._out.write("".join(parts))
        self._out.flush()
        self._drawn = len(lines)
