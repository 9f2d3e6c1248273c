"""Hedged requests: when to send a stuck request again, to another worker (pure, ``now`` in).

"The Tail at Scale" (Dean and Barroso): a request that has waited much longer than its
peers almost always waits on something wrong with *its* server — send it again elsewhere,
take the first answer, cancel the other. Envoy does the same on a per-try timeout. The cost
is the few per cent of requests sent twice; here it is bounded twice over: a hedge is an
attempt (``admission.retry.max_attempts``) and is paid from the retry budget
(``gateway.core.retrybudget``) like a retry, so a fleet-wide slowdown — every request slow at
once — cannot double the load.

When (:func:`decide_hedge`), the rules in order:

1. only a request that is safe to repeat (``retrybudget.is_repeatable``) — never a sequence,
   a stateful model, a model marked not repeatable or a stream;
2. it is stuck: its worker is stalled (``gateway.core.stall``), or it has waited for its
   answer past its *per-try timeout* — the model's recent p99 latency (from send to response
   head) × ``p99_factor``, within [``min_delay_s``, ``max_delay_s``]; ``max_delay_s`` while
   fewer than ``min_samples`` latencies are known (:func:`per_try_timeout_s`);
3. an attempt is left (``max_attempts``);
4. its deadline leaves time for the model's typical latency on another worker;
5. the retry budget allows it.

The latencies are :class:`LatencyQuantiles`: per model, a log-bucketed histogram over the
last ``window_s`` (two rotating halves), bounded in models and buckets; its quantile is the
upper edge of the bucket that holds it (at most ``BUCKET_RATIO`` − 1 high), recomputed at
most every ``QUANTILE_REFRESH_S``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

from gateway.core.config import HedgeConfig

BUCKET_RATIO: Final = 1.08       # each bucket's upper edge / its lower edge
MIN_LATENCY_S: Final = 1e-4      # the first bucket's lower edge
BUCKETS: Final = math.ceil(math.log(600.0 / MIN_LATENCY_S) / math.log(BUCKET_RATIO))
QUANTILE_REFRESH_S: Final = 0.1
MAX_MODELS: Final = 256          # models with a histogram (the stalest is dropped)
_LOG_RATIO: Final = math.log(BUCKET_RATIO)


class HedgeVerdict(enum.Enum):
    """The answer of :func:`decide_hedge`, with why (counted by the shell)."""

    HEDGE = "hedge"
    WAIT = "wait"                             # not stuck (yet)
    NOT_SAFE = "not_safe"                     # never repeat it
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    NO_TIME = "no_time"                       # its deadline would pass before another answer
    BUDGET_EXHAUSTED = "budget_exhausted"


def per_try_timeout_s(p99_s: float | None, cfg: HedgeConfig) -> float:
    """How long an attempt waits for its answer before it is hedged (module doc, rule 2)."""
    if p99_s is None:
        return cfg.max_delay_s
    return min(cfg.max_delay_s, max(cfg.min_delay_s, cfg.p99_factor * p99_s))


def decide_hedge(*, now: float, sent_at: float, timeout_s: float, worker_stalled: bool,
                 repeatable: bool, attempts: int, max_attempts: int, deadline: float,
                 expected_s: float, budget_allows: bool) -> HedgeVerdict:
    """Hedge an attempt sent at ``sent_at`` that still awaits its answer? Pure: the caller
    supplies the budget's answer. ``attempts``: sent so far for the request, this one
    included; ``expected_s``: the model's typical latency elsewhere (0: unknown)."""
    if not repeatable:
        return HedgeVerdict.NOT_SAFE
    if not worker_stalled and now - sent_at < timeout_s:
        return HedgeVerdict.WAIT
    if attempts >= max_attempts:
        return HedgeVerdict.ATTEMPTS_EXHAUSTED
    if deadline - now < expected_s:
        return HedgeVerdict.NO_TIME
    if not budget_allows:
        return HedgeVerdict.BUDGET_EXHAUSTED
    return HedgeVerdict.HEDGE


def bucket_of(latency_s: float) -> int:
    if latency_s <= MIN_LATENCY_S:
        return 0
    return min(BUCKETS - 1, int(math.log(latency_s / MIN_LATENCY_S) / _LOG_RATIO))


def bucket_upper_s(index: int) -> float:
    return MIN_LATENCY_S * BUCKET_RATIO ** (index + 1)


class _Histogram:
    __slots__ = ("cached", "counts", "n", "old", "old_n", "started", "touched")

    def __init__(self, now: float) -> None:
        self.counts = [0] * BUCKETS
        self.n = 0
        self.old: list[int] | None = None
        self.old_n = 0
        self.started = now
        self.touched = now
        self.cached: dict[float, tuple[float, float]] = {}   # q -> (computed at, value)

    def rotate(self, now: float, half_s: float) -> None:
        if now - self.started < half_s:
            return
        if now - self.started < 2 * half_s:
            self.old, self.old_n = self.counts, self.n
        else:
            self.old, self.old_n = None, 0    # idle for a whole window: nothing is recent
        self.counts = [0] * BUCKETS
        self.n = 0
        self.started = now
        self.cached.clear()


@dataclass(frozen=True, slots=True)
class LatencyStatistics:
    models: int
    samples: int
    evicted: int


class LatencyQuantiles:
    """Recent latency quantiles per model (module doc). Pure: time is an argument."""

    __slots__ = ("_evicted", "_half_s", "_models", "_samples")

    def __init__(self, window_s: float = 10.0) -> None:
        self._half_s = window_s / 2
        self._models: dict[str, _Histogram] = {}
        self._samples = 0
        self._evicted = 0

    def __repr__(self) -> str:
        return f"<LatencyQuantiles models={len(self._models)} samples={self._samples}>"

    def observe(self, model: str, latency_s: float, now: float) -> None:
        if not latency_s >= 0.0 or latency_s == math.inf:
            return
        hist = self._models.get(model)
        if hist is None:
            if len(self._models) >= MAX_MODELS:
                stalest = min(self._models, key=lambda m: self._models[m].touched)
                del self._models[stalest]
                self._evicted += 1
            hist = self._models[model] = _Histogram(now)
        hist.rotate(now, self._half_s)
        hist.counts[bucket_of(latency_s)] += 1
        hist.n += 1
        hist.touched = now
        self._samples += 1

    def samples(self, model: str, now: float) -> int:
        hist = self._models.get(model)
        if hist is None:
            return 0
        hist.rotate(now, self._half_s)
        return hist.n + hist.old_n

    def quantile(self, model: str, q: float, now: float, *, min_samples: int = 1) -> float | None:
        """The ``q`` quantile (0 < q ≤ 1) of the model's recent latencies; None with fewer
        than ``min_samples`` of them."""
        hist = self._models.get(model)
        if hist is None:
            return None
        hist.rotate(now, self._half_s)
        total = hist.n + hist.old_n
        if total < max(1, min_samples):
            return None
        cached = hist.cached.get(q)
        if cached is not None and 0.0 <= now - cached[0] < QUANTILE_REFRESH_S:
            return cached[1]
        rank = math.ceil(q * total)    # the rank-th smallest sample, 1-based
        seen = 0
        value = bucket_upper_s(BUCKETS - 1)
        old = hist.old
        for i in range(BUCKETS):
            seen += hist.counts[i] + (old[i] if old is not None else 0)
            if seen >= rank:
                value = bucket_upper_s(i)
                break
        if q in hist.cached or len(hist.cached) < 8:
            hist.cached[q] = (now, value)
        return value

    def statistics(self) -> LatencyStatistics:
        return LatencyStatistics(len(self._models), self._samples, self._evicted)
