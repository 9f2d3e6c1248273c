"""Local token buckets (aiolimiter) and the RateLimiter composite.

Retry-After values are checked on a fake clock: aiolimiter reads ``loop.time()``, so these
tests run on an event loop whose ``time()`` is the fake clock — nothing is patched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from gateway.core.config import BucketConfig, ModelConfig, parse_config
from gateway.core.errors import RateLimited
from gateway.engine.ratelimit import LocalBucket, RateLimiter, request_cost, tokens_wait_s

T = TypeVar("T")


class FakeClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.fake_now = 1000.0

    def time(self) -> float:
        return self.fake_now


@pytest.fixture
def loop() -> Any:
    fake = FakeClockLoop()
    yield fake
    fake.close()


def run(loop: FakeClockLoop, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coro)


def rejection(loop: FakeClockLoop, coro: Coroutine[Any, Any, object]) -> float:
    with pytest.raises(RateLimited) as info:
        run(loop, coro)
    assert info.value.status == 429
    assert info.value.retry_after_s is not None
    return info.value.retry_after_s


@pytest.mark.parametrize(("level", "capacity", "rate", "cost", "wait"), [
    (0.0, 5.0, 10.0, 1.0, 0.0),
    (4.0, 5.0, 10.0, 1.0, 0.0),
    (5.0, 5.0, 10.0, 1.0, 0.1),
    (5.0, 5.0, 10.0, 3.0, 0.3),
    (4.5, 5.0, 2.0, 1.0, 0.25),
    (5.0, 5.0, 0.5, 1.0, 2.0),
])
def test_tokens_wait_s(level: float, capacity: float, rate: float, cost: float,
                       wait: float) -> None:
    assert tokens_wait_s(level, capacity, rate, cost) == pytest.approx(wait)


def test_local_bucket_retry_after_on_fake_clock(loop: FakeClockLoop) -> None:
    # binary-exact figures: aiolimiter compares levels exactly
    bucket = LocalBucket("model:m", BucketConfig(rate_per_s=8.0, burst=5.0))
    for _ in range(5):
        run(loop, bucket.take(1))
    assert rejection(loop, bucket.take(1)) == pytest.approx(0.125)
    loop.fake_now += 0.0625
    assert rejection(loop, bucket.take(1)) == pytest.approx(0.0625)
    assert rejection(loop, bucket.take(3)) == pytest.approx(0.3125)
    loop.fake_now += 0.0625
    run(loop, bucket.take(1))
    loop.fake_now += 1.0                 # refills to the burst, not beyond
    for _ in range(5):
        run(loop, bucket.take(1))
    assert rejection(loop, bucket.take(1)) == pytest.approx(0.125)
    stats = bucket.statistics()
    assert (stats.admitted_total, stats.rejected_total) == (11, 4)


def test_cost_above_burst_is_clamped(loop: FakeClockLoop) -> None:
    bucket = LocalBucket("model:m", BucketConfig(rate_per_s=2.0, burst=4.0))
    run(loop, bucket.take(10))           # costs the whole bucket
    assert rejection(loop, bucket.take(10)) == pytest.approx(2.0)
    loop.fake_now += 2.0
    run(loop, bucket.take(10))


def test_burst_defaults_to_one_second(loop: FakeClockLoop) -> None:
    bucket = LocalBucket("global", BucketConfig(rate_per_s=3.0))
    for _ in range(3):
        run(loop, bucket.take(1))
    assert rejection(loop, bucket.take(1)) == pytest.approx(1 / 3)


def limiter() -> RateLimiter:
    return RateLimiter(
        global_limit=BucketConfig(rate_per_s=100.0, burst=100.0),
        tenants={"acme": BucketConfig(rate_per_s=10.0, burst=10.0)},
        models={"resnet": BucketConfig(rate_per_s=1.0, burst=2.0)})


def test_composite_refunds_when_a_later_bucket_rejects(loop: FakeClockLoop) -> None:
    rl = limiter()
    run(loop, rl.admit("acme", "resnet", 1))
    run(loop, rl.admit("acme", "resnet", 1))
    assert rejection(loop, rl.admit("acme", "resnet", 1)) == pytest.approx(1.0)
    # the model's rejection left the tenant (and global) budget whole: 8 more for others
    for _ in range(8):
        run(loop, rl.admit("acme", "bert", 1))
    assert rejection(loop, rl.admit("acme", "bert", 1)) == pytest.approx(0.1)
    stats = rl.statistics().buckets
    assert stats["model:resnet"].rejected_total == 1
    assert stats["tenant:acme"].admitted_total == 10
    assert stats["tenant:acme"].rejected_total == 1
    assert stats["global"].admitted_total == 10
    assert rl.statistics().redis is None


def test_composite_refund_after_take(loop: FakeClockLoop) -> None:
    """When the pre-check passes but a later bucket rejects at take time (a bounded wait
    that times out), the earlier buckets get their tokens back."""
    rl = RateLimiter(tenants={"acme": BucketConfig(rate_per_s=10.0, burst=2.0)},
                     models={"m": BucketConfig(rate_per_s=1.0, burst=1.0, max_wait_s=5.0)})
    run(loop, rl.admit("acme", "m", 1))
    # the model bucket would need 1 s ≤ max_wait_s: the tenant token is taken, then the
    # wait is cut short; the tenant token must come back
    task = loop.create_task(rl.admit("acme", "m", 1))
    loop.call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)
    stats = rl.statistics().buckets["tenant:acme"]
    assert stats.refunded_total == 1
    run(loop, rl.admit("acme", "other", 1))       # the refunded token is there
    assert rejection(loop, rl.admit("acme", "other", 1)) == pytest.approx(0.1)


def test_unknown_tenant_and_model_have_no_bucket(loop: FakeClockLoop) -> None:
    rl = RateLimiter(tenants={"acme": BucketConfig(rate_per_s=1.0, burst=1.0)},
                     models={"m": BucketConfig(rate_per_s=1.0, burst=1.0)})
    for i in range(100):
        run(loop, rl.admit(None, f"model-{i}", 1))
        run(loop, rl.admit(f"tenant-{i}", "x", 1))
    assert set(rl.statistics().buckets) == {"tenant:acme", "model:m"}
    assert [b.name for b in rl.chain("acme", "m")] == ["tenant:acme", "model:m"]


def test_batch_cost(loop: FakeClockLoop) -> None:
    assert request_cost(ModelConfig(), 8) == 1
    assert request_cost(ModelConfig(cost="batch_size"), 8) == 8
    assert request_cost(ModelConfig(cost="batch_size"), 0) == 1
    rl = RateLimiter(models={"m": BucketConfig(rate_per_s=10.0, burst=10.0)})
    run(loop, rl.admit(None, "m", 8))
    assert rejection(loop, rl.admit(None, "m", 4)) == pytest.approx(0.2)


async def test_bounded_wait_admits_within_max_wait() -> None:
    rl = RateLimiter(models={"m": BucketConfig(rate_per_s=50.0, burst=1.0, max_wait_s=2.0)})
    start = time.monotonic()
    for _ in range(3):
        await rl.admit(None, "m", 1)
    assert time.monotonic() - start < 2.0 * 2       # bounded, not a timing measurement
    stats = rl.statistics().buckets["model:m"]
    assert (stats.admitted_total, stats.waited_total, stats.rejected_total) == (3, 2, 0)


async def test_wait_longer_than_max_wait_is_rejected_at_once() -> None:
    rl = RateLimiter(models={"m": BucketConfig(rate_per_s=1.0, burst=1.0, max_wait_s=0.05)})
    await rl.admit(None, "m", 1)
    with pytest.raises(RateLimited) as info:
        await rl.admit(None, "m", 1)
    assert info.value.retry_after_s == pytest.approx(1.0, abs=0.2)
    assert info.value.headers()[-1] == (b"retry-after", b"1")


def test_from_config() -> None:
    cfg = parse_config({
        "workers": [{"url": "http://127.0.0.1:8000"}],
        "models": {"resnet": {"rate_limit": {"rate_per_s": 5}}, "bert": {}},
        "admission": {"global_limit": {"rate_per_s": 100, "burst": 200},
                      "tenants": {"acme": {"rate_limit": {"rate_per_s": 10}},
                                  "free": {}}},
    })
    rl = RateLimiter.from_config(cfg)
    assert set(rl.statistics().buckets) == {"global", "tenant:acme", "model:resnet"}
    assert rl.statistics().buckets["global"].capacity == 200
    assert rl.statistics().buckets["model:resnet"].capacity == 5


def test_global_scope_needs_a_store() -> None:
    with pytest.raises(ValueError):
        RateLimiter(global_limit=BucketConfig(rate_per_s=1.0, scope="global"))


@pytest.mark.parametrize(("share", "rate", "burst"), [
    (1.0, 30.0, 60.0),          # one process: the YAML's figures
    (1 / 3, 10.0, 20.0),        # serve --processes 3: a third of each local bucket
])
def test_processes_on_one_host_each_take_their_part_of_every_local_bucket(
        share: float, rate: float, burst: float) -> None:
    cfg = parse_config({
        "workers": [{"url": "http://127.0.0.1:9"}],
        "admission": {"global_limit": {"rate_per_s": 30, "burst": 60},
                      "tenants": {"t": {"keys": ["k"], "rate_limit": {"rate_per_s": 30,
                                                                      "burst": 60}}}},
    })
    limiter = RateLimiter.from_config(cfg, local_share=share)
    for bucket in limiter.chain("t", "m"):
        assert bucket.config.rate_per_s == pytest.approx(rate)
        assert bucket.config.burst == pytest.approx(burst)
