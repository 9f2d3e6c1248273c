"""Retry budget and retry policy (pure, ``now`` in).

Budget (Finagle/Envoy style): over the last ``window_s``, retries may not exceed
``max(budget_min, budget_ratio × requests)``, where *requests* counts first attempts only.
So however badly the fleet fails, the attempts sent upstream stay below
``(1 + budget_ratio) × offered + budget_min`` per window — a retry storm cannot amplify load
beyond that. Counters are bucketed (``WindowCounts``): memory is constant.

Policy (``is_retryable``): a request is retried on another worker when it cannot have been
executed — the connection was refused or timed out before anything was sent — or when the
worker answered 503 (Triton: not ready / overloaded, the request was not run). A request
that is *safe to repeat* (``is_repeatable``) is also retried when the connection broke (a
reset, an EOF) before any byte of the response came back: the worker died or dropped it, and
nobody got an answer. A read timeout or a 500 is never retried (a slow worker is hedged
instead: ``gateway.core.hedge``): the request may still be running there.

Safe to repeat (``is_repeatable``): inference on a model without sequence state, by default.
Never: a request of a sequence (``sequence_id``: its state lives on one worker, and a second
run would advance it twice), a request of a model whose config has ``sequence_batching`` (a
stateful model), a model marked ``models.<m>.repeatable: false``, or a streamed response that
has started (the client has part of it already).

=================  ============  =====================================
stage              status        retried when
=================  ============  =====================================
connect            —             always (nothing was sent)
send               —             the request is safe to repeat
response           503           always (Triton did not run it)
response           other / none  never (it ran, or may be running)
=================  ============  =====================================

Use::

    budget.record_request(now)                 # once per client request
    ...attempt fails...
    if attempt < max_attempts and is_retryable(stage, status, repeatable=...) \
            and budget.try_retry(now):
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


def is_repeatable(*, sequence: bool, stateful: bool, model_repeatable: bool = True,
                  stream_started: bool = False) -> bool:
    """May this request run twice (module doc)? ``sequence``: it carries a ``sequence_id``;
    ``stateful``: its model's config has ``sequence_batching``; ``model_repeatable``:
    ``models.<m>.repeatable``; ``stream_started``: part of a streamed answer went out."""
    return model_repeatable and not (sequence or stateful or stream_started)


def is_retryable(stage: AttemptStage | str, status: int | None = None, *,
                 repeatable: bool = False) -> bool:
    """May a failed attempt be retried on another worker?

    ``connect`` → yes. ``response`` → only with status 503. ``send`` → only a request that
    is ``repeatable``: it may have been received whole and executed before the connection
    broke, but no answer came back (the upstream pool already retries a *reused* keep-alive
    connection that broke while writing, once, on a fresh connection — the one "send"
    failure known to be harmless for any request).
    """
    stage = AttemptStage(stage)
    if stage is AttemptStage.CONNECT:
        return True
    if stage is AttemptStage.RESPONSE:
        return status in RETRYABLE_STATUSES
    return repeatable


class RetryVerdict(enum.Enum):
    """The answer of :func:`decide_retry`, with why (counted by the dispatcher)."""

    RETRY = "retry"
    NOT_SAFE = "not_safe"                    # the request may have run: never resend it
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    BUDGET_EXHAUSTED = "budget_exhausted"


def decide_retry(stage: AttemptStage | str, status: int | None, *, attempts: int,
                 max_attempts: int, budget_allows: bool,
                 repeatable: bool = False) -> RetryVerdict:
    """Retry a failed attempt? Pure: the caller supplies the budget's answer.

    The rules apply in order: safety first (:func:`is_retryable`), then the attempt cap,
    then the budget. (A retry goes to a worker not tried yet; when none is left, routing
    says so.)
    """
    if not is_retryable(stage, status, repeatable=repeatable):
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
