"""Global (Redis) limits against a real redis-server: the Lua bucket, accuracy across three
OS processes, Redis down / hung (SIGSTOP) with fail-open / fail-closed, the Redis breaker,
recovery, and secrets kept out of reprs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.core.breaker import BreakerState
from gateway.core.config import BucketConfig, RedisConfig
from gateway.core.errors import Overloaded, RateLimited
from gateway.core.schema import Secret
from gateway.engine.ratelimit import RateLimiter
from gateway.engine.redis_store import RedisStore, StoreUnavailable, mask_url
from tests.redis_server import RedisServer, command

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()                    # SIGCONT + SIGTERM (+ SIGKILL): also when paused


def store_for(srv: RedisServer, **overrides: float | int) -> RedisStore:
    cfg = RedisConfig(url=Secret(srv.url), key_prefix=f"test:{uuid.uuid4().hex[:8]}:",
                      **overrides)   # type: ignore[arg-type]
    return RedisStore(cfg)


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    s = store_for(server, timeout_s=1.0)
    try:
        yield s
    finally:
        await s.aclose()


async def test_take_refill_and_retry_after(store: RedisStore) -> None:
    key = store.key("model:m")
    results = [await store.take(key, rate_per_s=2.0, burst=3.0, cost=1) for _ in range(4)]
    assert [r.admitted for r in results] == [True, True, True, False]
    assert 0.3 < results[3].wait_s <= 0.5        # one token at 2/s, minus what refilled
    assert results[0].server_time_s <= results[3].server_time_s
    await store.refund(key, rate_per_s=2.0, burst=3.0, cost=1)
    assert (await store.take(key, rate_per_s=2.0, burst=3.0, cost=1)).admitted
    too_big = await store.take(key, rate_per_s=2.0, burst=3.0, cost=3)
    assert not too_big.admitted and too_big.wait_s > 1.0
    stats = store.statistics()
    assert stats.ok_total == stats.calls_total == 7
    assert stats.breaker_state is BreakerState.CLOSED


async def test_burst_beyond_the_connection_pool_waits(server: RedisServer) -> None:
    cfg = RedisConfig(url=Secret(server.url), timeout_s=2.0, key_prefix="burst:")
    store = RedisStore(cfg, max_connections=4)
    try:
        results = await asyncio.gather(*(
            store.take(store.key("g"), rate_per_s=1.0, burst=100.0, cost=1)
            for _ in range(150)))
        assert sum(r.admitted for r in results) == 100
        stats = store.statistics()
        assert stats.ok_total == 150 and stats.errors_total == stats.timeouts_total == 0
    finally:
        await store.aclose()


async def test_keys_expire_when_full_again(server: RedisServer, store: RedisStore) -> None:
    key = store.key("tenant:t")
    await store.take(key, rate_per_s=100.0, burst=10.0, cost=5)
    pttl = int(command(server.port, "PTTL", key).strip().lstrip(b":"))
    assert 1000 < pttl <= 1050 + 100          # 5 tokens at 100/s = 50 ms, + 1 s margin


async def test_reservation_within_max_wait(store: RedisStore) -> None:
    key = store.key("global")
    first = await store.take(key, rate_per_s=20.0, burst=1.0, cost=1, max_wait_s=1.0)
    second = await store.take(key, rate_per_s=20.0, burst=1.0, cost=1, max_wait_s=1.0)
    assert first.admitted and first.wait_s == 0.0
    assert second.admitted and 0.0 < second.wait_s <= 0.05
    third = await store.take(key, rate_per_s=20.0, burst=1.0, cost=1, max_wait_s=0.01)
    assert not third.admitted and third.wait_s > 0.05


async def test_evalsha_falls_back_to_eval_after_script_flush(server: RedisServer,
                                                            store: RedisStore) -> None:
    key = store.key("m")
    await store.take(key, rate_per_s=1.0, burst=5.0, cost=1)
    assert command(server.port, "SCRIPT", "FLUSH").startswith(b"+OK")
    assert (await store.take(key, rate_per_s=1.0, burst=5.0, cost=1)).admitted
    assert (await store.take(key, rate_per_s=1.0, burst=5.0, cost=1)).admitted
    assert store.statistics().noscript_total >= 1


async def test_composite_with_redis_refunds_and_local_precheck(server: RedisServer,
                                                               store: RedisStore) -> None:
    rl = RateLimiter(
        global_limit=BucketConfig(rate_per_s=0.001, burst=3.0, scope="global"),
        tenants={"acme": BucketConfig(rate_per_s=0.001, burst=1.0, scope="global")},
        models={"m": BucketConfig(rate_per_s=0.001, burst=1.0)}, store=store)
    await rl.admit("acme", "x", 1)                  # global 2 left, acme 0 left
    with pytest.raises(RateLimited):
        await rl.admit("acme", "x", 1)              # acme rejects: the global token returns
    await rl.admit(None, "x", 1)
    await rl.admit(None, "m", 1)                    # global now 0, model m now 0
    calls = store.statistics().calls_total
    with pytest.raises(RateLimited):
        await rl.admit(None, "m", 1)                # rejected locally: no Redis call
    assert store.statistics().calls_total == calls
    with pytest.raises(RateLimited) as info:
        await rl.admit(None, "x", 1)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 100
    stats = rl.statistics()
    assert stats.buckets["global"].refunded_total == 1
    assert stats.redis is not None and stats.redis.errors_total == 0


def test_three_processes_share_one_bucket(server: RedisServer) -> None:
    """Three OS processes hammer one Redis bucket: they admit ≤ limit + 1 % and ≥ 95 % of
    it, where limit = burst + rate × (last − first) on the Redis clock."""
    rate, burst, seconds, concurrency = 400.0, 100.0, 2.0, 4
    key = f"test:{uuid.uuid4().hex[:8]}:bucket:global"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "redis_server.py"), "hammer", server.url, key,
         str(rate), str(burst), str(seconds), str(concurrency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)
        for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    admitted = sum(r["admitted"] for r in results)
    first = min(r["first_server_s"] for r in results)
    last = max(r["last_server_s"] for r in results)
    limit = burst + rate * (last - first)
    assert all(r["admitted"] > 0 for r in results)          # all three really took part
    assert sum(r["rejected"] for r in results) > admitted   # and really hammered
    print(f"admitted {admitted} of limit {limit:.1f} ({admitted / limit:.2%})")
    assert admitted <= limit * 1.01, (admitted, limit, results)
    assert admitted >= limit * 0.95, (admitted, limit, results)


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_down_follows_policy_and_breaker_skips_it(policy: str) -> None:
    srv = RedisServer().start()
    srv.stop()                                   # a port where nothing listens any more
    store = store_for(srv, timeout_s=0.05, breaker_failures=3, breaker_open_s=30.0)
    rl = RateLimiter(global_limit=BucketConfig(rate_per_s=10.0, scope="global",
                                               on_redis_error=policy),  # type: ignore[arg-type]
                     store=store)
    try:
        for _ in range(10):
            start = time.monotonic()
            if policy == "open":
                await rl.admit(None, "m", 1)
            else:
                with pytest.raises(Overloaded) as info:
                    await rl.admit(None, "m", 1)
                assert info.value.status == 503
                assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
            assert time.monotonic() - start < 2.0      # bounded by the timeout, not hanging
        stats = store.statistics()
        assert stats.calls_total == 3 and stats.errors_total + stats.timeouts_total == 3
        assert stats.skipped_total == 7
        assert stats.breaker_state is BreakerState.OPEN
        assert rl.statistics().buckets["global"].redis_errors_total == 10
    finally:
        await store.aclose()


async def test_redis_hung_then_recovers(server: RedisServer) -> None:
    timeout_s = 0.1
    store = store_for(server, timeout_s=timeout_s, breaker_failures=3, breaker_open_s=0.5)
    rl = RateLimiter(global_limit=BucketConfig(rate_per_s=1000.0, scope="global"), store=store)
    try:
        await rl.admit(None, "m", 1)
        server.pause()                            # SIGSTOP: connections hang, nothing answers
        durations = []
        for _ in range(8):
            start = time.monotonic()
            await rl.admit(None, "m", 1)          # fail open: admitted
            durations.append(time.monotonic() - start)
        assert max(durations) < timeout_s + 1.0   # each call is cut at the timeout
        stats = store.statistics()
        assert stats.timeouts_total + stats.errors_total == 3
        assert stats.skipped_total == 5           # the breaker stopped calling the hung Redis
        assert stats.breaker_state is BreakerState.OPEN
        server.resume()                           # SIGCONT
        deadline = time.monotonic() + 10.0
        while store.statistics().breaker_state is not BreakerState.CLOSED:
            assert time.monotonic() < deadline, store.statistics()
            await asyncio.sleep(0.1)
            await rl.admit(None, "m", 1)
        ok_before = store.statistics().ok_total
        await rl.admit(None, "m", 1)
        assert store.statistics().ok_total == ok_before + 1      # Redis decides again
    finally:
        server.resume()
        await store.aclose()


async def test_store_unavailable_raised_directly() -> None:
    srv = RedisServer().start()
    srv.stop()
    store = store_for(srv, timeout_s=0.05, breaker_failures=1, breaker_open_s=30.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.take("k", rate_per_s=1.0, burst=1.0, cost=1)
        assert info.value.reason in ("connection", "timeout")
        with pytest.raises(StoreUnavailable) as info:
            await store.take("k", rate_per_s=1.0, burst=1.0, cost=1)
        assert info.value.reason == "breaker_open"
        assert 29.0 < info.value.retry_after_s <= 30.0
        assert not await store.ping()
    finally:
        await store.aclose()


async def test_password_never_shown() -> None:
    with RedisServer(password="s3cret-pw") as srv:
        assert "s3cret-pw" in srv.url
        store = store_for(srv, timeout_s=1.0)
        try:
            assert (await store.take(store.key("g"), rate_per_s=1.0, burst=1.0,
                                     cost=1)).admitted
            for text in (repr(store), str(store.statistics()), repr(store._client),
                         repr(RateLimiter(global_limit=BucketConfig(rate_per_s=1.0,
                                                                    scope="global"),
                                          store=store))):
                assert "s3cret-pw" not in text
            assert "***" in repr(store)
        finally:
            await store.aclose()
        wrong = RedisStore(RedisConfig(url=Secret(srv.url.replace("s3cret-pw", "wrong-pw")),
                                       timeout_s=1.0))
        try:
            with pytest.raises(StoreUnavailable) as info:
                await wrong.take("g", rate_per_s=1.0, burst=1.0, cost=1)
            assert "wrong-pw" not in str(info.value) and "wrong-pw" not in repr(wrong)
        finally:
            await wrong.aclose()


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:pw@10.0.0.1:6380/1", "redis://:***@10.0.0.1:6380/1"),
    ("rediss://user:pw@host/0", "rediss://user:***@host/0"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


GPU_MS_PER_S = 0.001


async def test_global_gpu_quota_is_shared_by_replicas(store: RedisStore) -> None:
    """A tenant's gpu_rate_limit with scope global: two replicas draw GPU-seconds from one
    Redis bucket (no refill during the test: 1 GPU-millisecond per second)."""
    quota = {"acme": BucketConfig(rate_per_s=GPU_MS_PER_S, burst=0.1, scope="global")}
    replicas = [RateLimiter(gpu_tenants=quota, store=store) for _ in range(2)]
    await replicas[0].admit("acme", "m", 1, gpu_s=0.05)
    await replicas[1].admit("acme", "m", 1, gpu_s=0.04)
    for rl in replicas:                                  # 0.01 GPU-s left in Redis
        with pytest.raises(RateLimited) as info:
            await rl.admit("acme", "m", 1, gpu_s=0.03)
        assert info.value.retry_after_s == pytest.approx(0.02 / GPU_MS_PER_S, rel=0.05)
    await replicas[1].admit("acme", "m", 1, gpu_s=0.01)
