"""Retry budget and retry policy (pure, ``now`` in).

Budget (Finagle/Envoy style): over the last ``window_s``, retries may not exceed
``max(budget_min, budget_ratio × requests)``, where *requests* counts first attempts only.
So however badly the fleet fails, the attempts sent upstream stay below
``(1 + budget_ratio) × offered + budget_min`` per window — a retry storm cannot amplify load
beyond that. Counters are bucketed (``WindowCounts``): memory is constant.

Policy (``is_retryable``): a request is retried on another worker only when it cannot have
been executed — the connection was refused or timed out before anything was sent — or when
the worker answered 503 (Triton: not ready / overloaded, the request was not run). Anything
after the request may have reached the worker (a reset, a read timeout, a 500) is not
retried: inference is expensive and possibly not idempotent.

Use::

    budget.record_request(now)                 # once per client request
    ...attempt fails...
    if attempt < max_attempts and is_retryable(stage, status) and budget.try_retry(now):
        ...retry on another worker...
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.core.breaker import WindowCounts
from gateway.core.config import RetryConfig


class AttemptStage(enum.Enum):
    """How far a failed attempt got (the values are ``gateway.fleet.upstream``'s stage names)."""

    CONNECT = "connect"      # refused / unreachable / connect timeout: nothing was sent
    SEND = "send"            # written (maybe whole), connection broke before any response byte
    RESPONSE = "response"    # a status came back (or the response broke / timed out)


RETRYABLE_STATUSES = frozenset({503})


def is_retryable(stage: AttemptStage | str, status: int | None = None) -> bool:
    """May a failed attempt be retried on another worker?

    ``connect`` → yes. ``response`` → only with status 503. ``send`` → no: the request may
    have been received whole and executed before the connection broke (the upstream pool
    already retries a *reused* keep-alive connection that broke while writing, once, on a
    fresh connection — the one "send" failure known to be harmless).
    """
    stage = AttemptStage(stage)
    if stage is AttemptStage.CONNECT:
        return True
    if stage is AttemptStage.RESPONSE:
        return status in RETRYABLE_STATUSES
    return False


class RetryVerdict(enum.Enum):
    """The answer of :func:`decide_retry`, with why (counted by the dispatcher)."""

    RETRY = "retry"
    NOT_SAFE = "not_safe"                    # the request may have run: never resend it
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    BUDGET_EXHAUSTED = "budget_exhausted"


def decide_retry(stage: AttemptStage | str, status: int | None, *, attempts: int,
                 max_attempts: int, budget_allows: bool) -> RetryVerdict:
    """Retry a failed attempt? Pure: the caller supplies the budget's answer.

    The rules apply in order: safety first (:func:`is_retryable`), then the attempt cap,
    then the budget. (A retry goes to a worker not tried yet; when none is left, routing
    says so.)
    """
    if not is_retryable(stage, status):
        return RetryVerdict.NOT_SAFE
    if attempts >= max_attempts:
        return RetryVerdict.ATTEMPTS_EXHAUSTED
    if not budget_allows:
        return RetryVerdict.BUDGET_EXHAUSTED
    return RetryVerdict.RETRY


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    window_requests: int
    window_retries: int
    retries_allowed: int          # in the current window
    retries_total: int
    denied_total: int


class RetryBudget:
    __slots__ = ("_cfg", "_counts", "denied_total", "retries_total")

    def __init__(self, cfg: RetryConfig) -> None:
        self._cfg = cfg
        self._counts = WindowCounts(cfg.window_s)   # a = requests, b = retries
        self.retries_total = 0
        self.denied_total = 0

    def reconfigure(self, cfg: RetryConfig) -> None:
        """Config reload; a new window length restarts the window."""
        if cfg.window_s != self._cfg.window_s:
            self._counts = WindowCounts(cfg.window_s)
        self._cfg = cfg

    def __repr__(self) -> str:
        return (f"<RetryBudget ratio={self._cfg.budget_ratio} min={self._cfg.budget_min} "
                f"window_s={self._cfg.window_s} retries={self.retries_total} "
                f"denied={self.denied_total}>")

    def _allowed(self, requests: int) -> int:
        return max(self._cfg.budget_min, int(self._cfg.budget_ratio * requests + 1e-9))

    def record_request(self, now: float) -> None:
        """A client request's first attempt."""
        self._counts.add(now, a=1)

    def can_retry(self, now: float) -> bool:
        requests, retries = self._counts.totals(now)
        return retries < self._allowed(requests)

    def record_retry(self, now: float) -> None:
        self._counts.add(now, b=1)
        self.retries_total += 1

    def try_retry(self, now: float) -> bool:
        """``can_retry`` and, if so, ``record_retry`` — the usual call; counts denials."""
        if self.can_retry(now):
            self.record_retry(now)
            return True
        self.denied_total += 1
        return False

    def statistics(self, now: float) -> RetryBudgetStatistics:
        requests, retries = self._counts.totals(now)
        return RetryBudgetStatistics(
            window_requests=requests, window_retries=retries,
            retries_allowed=self._allowed(requests), retries_total=self.retries_total,
            denied_total=self.denied_total)
