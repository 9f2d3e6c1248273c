"""Adaptive concurrency limit per worker, gradient style (Envoy adaptive concurrency,
Netflix Gradient2). Pure: samples come in with ``now``; the shell asks ``can_admit()``.

Every ``update_interval_s`` the RTT samples of the interval are averaged and smoothed
(``smoothed ← smoothing × interval_mean + (1 − smoothing) × smoothed``; smoothing 0 turns
smoothing off), and::

    gradient = clamp(min_rtt × tolerance / smoothed_rtt, 0.5, 1.0)
    limit    ← clamp(limit × gradient + √limit, min_limit, max_limit)

* ``min_rtt`` — the RTT without queueing — is *measured*, as Envoy does: at the first sample
  and then every ``min_rtt_interval_s`` the limit drops to ``min_limit`` until
  ``PROBE_SAMPLES`` requests that started with at most ``min_limit`` in flight have
  completed (or ``PROBE_MAX_INTERVALS`` intervals passed); their mean RTT is the new
  min_rtt and the previous limit is restored. Between probes a lower smoothed RTT lowers
  min_rtt. Re-measuring (rather than a running minimum that forgets) is what lets the
  baseline follow a real change (a heavier model version) without ratcheting up on the
  limiter's own queueing.
* ``tolerance`` (config, default 1.5): the queueing accepted before shrinking; while the RTT
  stays within tolerance × min_rtt the gradient is 1 and the limit grows by √limit per
  interval. Above, it shrinks — by at most half per interval. With a worker that runs C
  requests at once, the limit settles near ``tolerance × C + √limit``.
* App-limited guard (Gradient2): the limit only grows when the interval's peak in-flight
  reached at least half of it; otherwise an idle worker's limit would run away.
* Bounds: ``min_limit`` (config) and ``max_limit`` (the worker's slots).

Knobs not in YAML are constructor arguments with ``DEFAULT_*`` values. Over the limit the
caller answers 503 (``Overloaded``) or queues, as Envoy does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.config import AdaptiveConfig

DEFAULT_UPDATE_INTERVAL_S = 0.1
DEFAULT_MIN_RTT_INTERVAL_S = 60.0     # Envoy's min_rtt_calc_params.interval default
PROBE_SAMPLES = 10
PROBE_MAX_INTERVALS = 50
MIN_GRADIENT = 0.5
MAX_GRADIENT = 1.0


@dataclass(frozen=True, slots=True)
class AdaptiveStatistics:
    limit: int
    min_rtt_s: float | None
    smoothed_rtt_s: float | None
    gradient: float
    updates: int
    probing: bool
    probes: int


class AdaptiveLimit:
    __slots__ = (
        "_cfg", "_interval_end", "_limit", "_next_probe_at", "_peak_in_flight",
        "_probe_intervals", "_probe_n", "_probe_saved", "_probe_sum", "_rtt_n", "_rtt_sum",
        "_smoothed", "gradient", "max_limit", "min_rtt_interval_s", "min_rtt_s", "probes",
        "update_interval_s", "updates",
    )

    def __init__(self, cfg: AdaptiveConfig, max_limit: int, *,
                 initial_limit: int | None = None,
                 update_interval_s: float = DEFAULT_UPDATE_INTERVAL_S,
                 min_rtt_interval_s: float = DEFAULT_MIN_RTT_INTERVAL_S) -> None:
        max_limit = max(max_limit, cfg.min_limit)
        self._cfg = cfg
        self.max_limit = max_limit
        self.update_interval_s = update_interval_s
        self.min_rtt_interval_s = min_rtt_interval_s
        start = initial_limit if initial_limit is not None else max_limit // 4
        self._limit = float(min(max(start, cfg.min_limit), max_limit))
        self._interval_end: float | None = None
        self._rtt_sum = 0.0
        self._rtt_n = 0
        self._peak_in_flight = 0
        self._smoothed: float | None = None
        self.min_rtt_s: float | None = None
        self._next_probe_at = -math.inf
        self._probe_saved: float | None = None      # not None while probing
        self._probe_sum = 0.0
        self._probe_n = 0
        self._probe_intervals = 0
        self.gradient = 1.0
        self.updates = 0
        self.probes = 0

    def __repr__(self) -> str:
        return (f"<AdaptiveLimit limit={self.limit} [{self._cfg.min_limit}, {self.max_limit}]"
                f" min_rtt_s={self.min_rtt_s}>")

    @property
    def limit(self) -> int:
        return max(self._cfg.min_limit, math.floor(self._limit))

    @property
    def is_probing(self) -> bool:
        return self._probe_saved is not None

    def can_admit(self, in_flight: int) -> bool:
        """May one more request start while ``in_flight`` are running?"""
        return in_flight < self.limit

    def on_sample(self, now: float, rtt_s: float, in_flight: int) -> None:
        """One completed request: its round-trip time and the in-flight count (itself
        included) when it started."""
        if self._interval_end is None:
            self._interval_end = now + self.update_interval_s
        elif now >= self._interval_end:
            self._update(now)
        if self._probe_saved is None and now >= self._next_probe_at:
            self._start_probe()
        if self._probe_saved is not None:
            if in_flight <= self._cfg.min_limit:
                self._probe_sum += rtt_s
                self._probe_n += 1
                if self._probe_n >= PROBE_SAMPLES:
                    self._end_probe(now)
            return
        self._rtt_sum += rtt_s
        self._rtt_n += 1
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def _start_probe(self) -> None:
        self._probe_saved = self._limit
        self._limit = float(self._cfg.min_limit)
        self._probe_sum = 0.0
        self._probe_n = 0
        self._probe_intervals = 0

    def _end_probe(self, now: float) -> None:
        if self._probe_n:
            self.min_rtt_s = self._probe_sum / self._probe_n
            self._smoothed = None            # the old smoothing mixed in the old baseline
        self.probes += 1
        self._limit = self._probe_saved if self._probe_saved is not None else self._limit
        self._probe_saved = None
        self._next_probe_at = now + self.min_rtt_interval_s
        self._reset_interval(now)

    def _reset_interval(self, now: float) -> None:
        self._rtt_sum = 0.0
        self._rtt_n = 0
        self._peak_in_flight = 0
        self._interval_end = now + self.update_interval_s

    def _update(self, now: float) -> None:
        if self._probe_saved is not None:
            self._probe_intervals += 1
            if self._probe_intervals >= PROBE_MAX_INTERVALS:
                self._end_probe(now)
            else:
                self._reset_interval(now)
            return
        if self._rtt_n and self.min_rtt_s is not None:
            mean = self._rtt_sum / self._rtt_n
            alpha = self._cfg.smoothing
            if self._smoothed is None or alpha <= 0:
                self._smoothed = mean
            else:
                self._smoothed = alpha * mean + (1.0 - alpha) * self._smoothed
            self.min_rtt_s = min(self.min_rtt_s, self._smoothed)
            self.gradient = MAX_GRADIENT if self._smoothed <= 0 else max(MIN_GRADIENT, min(
                MAX_GRADIENT, self.min_rtt_s * self._cfg.tolerance / self._smoothed))
            candidate = self._limit * self.gradient + math.sqrt(self._limit)
            app_limited = self._peak_in_flight < self._limit / 2
            if not (app_limited and candidate > self._limit):
                self._limit = min(max(candidate, float(self._cfg.min_limit)),
                                  float(self.max_limit))
            self.updates += 1
        self._reset_interval(now)

    def statistics(self) -> AdaptiveStatistics:
        return AdaptiveStatistics(limit=self.limit, min_rtt_s=self.min_rtt_s,
                                  smoothed_rtt_s=self._smoothed, gradient=self.gradient,
                                  updates=self.updates, probing=self.is_probing,
                                  probes=self.probes)
