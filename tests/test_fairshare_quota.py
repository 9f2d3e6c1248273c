"""Quotas in GPU-seconds: a tenant's ``gpu_rate_limit`` bucket holds GPU-seconds and a
request takes its estimated GPU time, beside the request-count buckets (shared in Redis:
``tests/test_redis_limits.py``)."""

from __future__ import annotations

import pytest

from gateway.core.config import BucketConfig, parse_config
from gateway.core.errors import RateLimited
from gateway.engine.ratelimit import RateLimiter

# no refill during a test: 1 GPU-millisecond per second
SLOW = 0.001


async def test_local_gpu_quota_charges_estimated_gpu_seconds() -> None:
    rl = RateLimiter(tenants={"acme": BucketConfig(rate_per_s=100.0, burst=100.0)},
                     gpu_tenants={"acme": BucketConfig(rate_per_s=SLOW, burst=0.1)})
    assert rl.has_gpu_quota("acme") and not rl.has_gpu_quota("other") \
        and not rl.has_gpu_quota(None)
    await rl.admit("acme", "m", 1, gpu_s=0.06)
    with pytest.raises(RateLimited) as info:
        await rl.admit("acme", "m", 1, gpu_s=0.06)      # 0.04 GPU-s left
    assert info.value.retry_after_s == pytest.approx(0.02 / SLOW, rel=0.05)
    await rl.admit("acme", "m", 1, gpu_s=0.03)          # a smaller request still fits
    await rl.admit("other", "m", 1, gpu_s=10.0)         # no quota: GPU time not limited
    stats = rl.statistics().buckets
    # the GPU bucket refused in the local pre-check: no request-count token was taken
    assert stats["tenant:acme"].admitted_total == 2 and stats["tenant:acme"].refunded_total == 0
    assert stats["tenant:acme:gpu_s"].rejected_total == 1
    assert [r["name"] for r in rl.describe()] == ["tenant:acme", "tenant:acme:gpu_s"]


def test_config_gpu_rate_limit_builds_a_bucket() -> None:
    cfg = parse_config({"workers": [{"url": "http://w:8000"}], "admission": {"tenants": {
        "acme": {"keys": ["k"], "weight": 2, "gpu_rate_limit": {"rate_per_s": 0.5}}}}})
    tenant = cfg.admission.tenants["acme"]
    assert tenant.weight == 2 and tenant.gpu_rate_limit is not None
    assert RateLimiter.from_config(cfg).has_gpu_quota("acme")
