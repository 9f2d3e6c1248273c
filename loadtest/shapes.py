"""Load shapes for the Locust kit: how many users run at each moment of a test.

Each shape is a :class:`locust.LoadTestShape` whose curve is a pure method,
``plan(t_s, max_users, duration_s) -> (users, spawn_rate) | None`` (``None`` ends the test),
so the curve can be checked without a runner. ``tick()`` feeds it Locust's common options:
``-u`` is the peak user count and ``-t`` the duration of the whole curve.

* ``step``    — capacity sweep: users rise in equal steps, each held long enough to read a
                steady throughput and latency at that level (where does p99 bend?).
* ``spike``   — the thundering herd: a quiet baseline, then every user at once, held, then
                back to the baseline to watch recovery (queues drain, breakers close).
* ``diurnal`` — one compressed day: a night floor, a morning rise, a midday peak with a
                small lunchtime dip, an evening decline (for the predictive autoscaler).

The locustfile selects one with ``--shape`` (or ``LOCUST_SHAPE``); the classes here are not
picked up by Locust on their own, because the locustfile imports this module, not the names.
"""

from __future__ import annotations

import math
import time

from locust import LoadTestShape

DEFAULT_DURATION_S = 60.0

Plan = tuple[int, float]


class ConfiguredShape(LoadTestShape):
    """A shape whose peak and duration come from Locust's ``-u`` and ``-t`` options."""

    abstract = True
    use_common_options = True

    def plan(self, t_s: float, max_users: int, duration_s: float) -> Plan | None:
        raise NotImplementedError

    def elapsed_s(self) -> float:
        """Seconds since the test (re)started; Locust resets ``start_time``."""
        return time.perf_counter() - float(self.start_time)

    def tick(self) -> Plan | None:
        max_users, duration_s = 1, DEFAULT_DURATION_S
        if self.runner is not None and self.runner.environment.parsed_options is not None:
            options = self.runner.environment.parsed_options
            max_users = int(options.num_users or 1)
            duration_s = float(options.run_time or DEFAULT_DURATION_S)
        return self.plan(self.elapsed_s(), max(1, max_users), duration_s)


class ConstantShape(ConfiguredShape):
    """``-u`` users, started at ``-r`` per second, for ``-t`` (forever without ``-t``)."""

    spawn_rate: float = 1.0

    def plan(self, t_s: float, max_users: int, duration_s: float) -> Plan | None:
        if t_s >= duration_s:
            return None
        return max_users, self.spawn_rate

    def tick(self) -> Plan | None:
        if self.runner is None or self.runner.environment.parsed_options is None:
            return self.plan(self.elapsed_s(), 1, math.inf)
        options = self.runner.environment.parsed_options
        self.spawn_rate = float(options.spawn_rate or 1.0)
        duration_s = float(options.run_time) if options.run_time else math.inf
        return self.plan(self.elapsed_s(), max(1, int(options.num_users or 1)), duration_s)


class StepShape(ConfiguredShape):
    """Capacity sweep: ``steps`` equal stairs from peak/steps up to the peak."""

    steps: int = 5

    def plan(self, t_s: float, max_users: int, duration_s: float) -> Plan | None:
        if t_s >= duration_s:
            return None
        steps = max(1, min(self.steps, max_users))
        stair = min(steps - 1, int(t_s / (duration_s / steps)))
        users = math.ceil(max_users * (stair + 1) / steps)
        # Each stair is reached within about a second so most of it is steady state.
        return users, float(max(1, math.ceil(max_users / steps)))


class SpikeShape(ConfiguredShape):
    """Baseline (a tenth of the peak), then the whole peak within a second, then baseline."""

    spike_start: float = 0.3  # fractions of the duration
    spike_end: float = 0.6

    def plan(self, t_s: float, max_users: int, duration_s: float) -> Plan | None:
        if t_s >= duration_s:
            return None
        baseline = max(1, max_users // 10)
        herd_rate = float(max(1, max_users))  # everyone arrives within one second
        if self.spike_start * duration_s <= t_s < self.spike_end * duration_s:
            return max_users, herd_rate
        return baseline, herd_rate


class DiurnalShape(ConfiguredShape):
    """One day compressed into the duration: floor at night, peak at midday."""

    floor_fraction: float = 0.1
    lunch_dip: float = 0.15  # depth of the midday dip, as a fraction of the peak

    def level(self, x: float) -> float:
        """Load in [floor, 1] at time-of-day ``x`` in [0, 1) (0 = midnight)."""
        day = 0.5 - 0.5 * math.cos(2 * math.pi * x)  # 0 at midnight, 1 at noon
        dip = self.lunch_dip * math.exp(-(((x - 0.5) / 0.04) ** 2))
        level = day * (1.0 - dip)
        return self.floor_fraction + (1.0 - self.floor_fraction) * max(0.0, min(1.0, level))

    def plan(self, t_s: float, max_users: int, duration_s: float) -> Plan | None:
        if t_s >= duration_s:
            return None
        users = max(1, round(max_users * self.level(t_s / duration_s)))
        return users, float(max(1, math.ceil(max_users / 10)))


SHAPES: dict[str, type[ConfiguredShape]] = {
    "constant": ConstantShape,
    "step": StepShape,
    "spike": SpikeShape,
    "diurnal": DiurnalShape,
}
