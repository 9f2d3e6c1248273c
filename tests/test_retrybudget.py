"""Retry budget arithmetic on a fake clock, and the retry policy table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.config import RetryConfig
from gateway.core.retrybudget import (
    AttemptStage,
    RetryBudget,
    RetryVerdict,
    decide_retry,
    is_retryable,
)


@pytest.mark.parametrize(("stage", "status", "expected"), [
    ("connect", None, True),
    (AttemptStage.CONNECT, None, True),
    ("send", None, False),            # may have been received whole and executed
    ("response", None, False),        # broke / timed out mid-response
    ("response", 503, True),
    (AttemptStage.RESPONSE, 503, True),
    ("response", 500, False),
    ("response", 502, False),
    ("response", 504, False),
    ("response", 429, False),
    ("response", 200, False),
])
def test_is_retryable(stage: AttemptStage | str, status: int | None, expected: bool) -> None:
    assert is_retryable(stage, status) is expected


@pytest.mark.parametrize(("stage", "status", "repeatable", "expected"), [
    ("connect", None, False, True),     # nothing was sent: any request
    ("send", None, True, True),         # reset / EOF before any answer: if safe to repeat
    ("send", None, False, False),       # a sequence, a stateful model, repeatable: false
    ("response", None, True, False),    # a read timeout is not a reset (hedged instead)
    ("response", 500, True, False),     # it ran
    ("response", 503, False, True),     # not run
])
def test_is_retryable_for_requests_safe_to_repeat(stage: str, status: int | None,
                                                  repeatable: bool, expected: bool) -> None:
    assert is_retryable(stage, status, repeatable=repeatable) is expected


@pytest.mark.parametrize(("stage", "repeatable", "attempts", "budget", "verdict"), [
    ("send", True, 1, True, RetryVerdict.RETRY),
    ("send", False, 1, True, RetryVerdict.NOT_SAFE),
    ("send", True, 2, True, RetryVerdict.ATTEMPTS_EXHAUSTED),
    ("send", True, 1, False, RetryVerdict.BUDGET_EXHAUSTED),
    ("response", True, 1, True, RetryVerdict.NOT_SAFE),
])
def test_decide_retry_after_a_broken_connection(stage: str, repeatable: bool, attempts: int,
                                                budget: bool, verdict: RetryVerdict) -> None:
    assert decide_retry(stage, None, attempts=attempts, max_attempts=2, budget_allows=budget,
                        repeatable=repeatable) is verdict


def test_unknown_stage_is_an_error() -> None:
    with pytest.raises(ValueError):
        is_retryable("sometime", None)


def test_budget_min_then_ratio() -> None:
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, budget_min=3, window_s=10.0))
    assert [budget.try_retry(0.0) for _ in range(4)] == [True, True, True, False]
    for _ in range(25):
        budget.record_request(0.1)
    # 25 requests → 5 retries allowed in the window, 3 used
    assert [budget.try_retry(0.2) for _ in range(3)] == [True, True, False]
    stats = budget.statistics(0.2)
    assert (stats.window_requests, stats.window_retries, stats.retries_allowed) == (25, 5, 5)
    assert stats.denied_total == 2
    # the window moves on: everything has expired 10 s later
    assert budget.can_retry(10.3)
    assert budget.statistics(10.3).window_requests == 0


def test_retry_storm_is_bounded() -> None:
    """Every attempt fails for 100 s at 100 req/s, each request may try 5 times: the
    attempts sent upstream stay ≤ 1.2 × offered (+ the per-window minimum)."""
    cfg = RetryConfig(max_attempts=5, budget_ratio=0.2, budget_min=3, window_s=10.0)
    budget = RetryBudget(cfg)
    offered = attempts = 0
    now = 0.0
    for _ in range(10_000):
        now += 0.01
        offered += 1
        attempts += 1
        budget.record_request(now)
        for _retry in range(cfg.max_attempts - 1):      # the worker keeps failing
            if not (is_retryable("connect") and budget.try_retry(now)):
                break
            attempts += 1
    windows = now / cfg.window_s + 1
    assert attempts <= 1.2 * offered + cfg.budget_min * windows
    assert attempts >= 1.15 * offered                   # and the budget is actually usable
    assert budget.statistics(now).denied_total > 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2), st.integers(0, 20), st.integers(0, 20)),
                max_size=60))
def test_a_retry_is_granted_only_within_the_window_budget(
        steps: list[tuple[float, int, int]]) -> None:
    cfg = RetryConfig(budget_ratio=0.2, budget_min=2, window_s=10.0)
    budget = RetryBudget(cfg)
    now = 0.0
    for dt, requests, retries in steps:
        now += dt
        for _ in range(requests):
            budget.record_request(now)
        for _ in range(retries):
            before = budget.statistics(now)
            granted = budget.try_retry(now)
            expected = before.window_retries < max(
                cfg.budget_min, int(cfg.budget_ratio * before.window_requests + 1e-9))
            assert granted is expected


def test_reconfigure() -> None:
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, budget_min=1))
    assert budget.try_retry(0.0) and not budget.try_retry(0.0)
    budget.reconfigure(RetryConfig(budget_ratio=0.2, budget_min=2))
    assert budget.try_retry(0.0) and not budget.try_retry(0.0)
