"""Token-bucket rate limits: global, per tenant and per model, local or shared in Redis.

Buckets
-------
A :class:`BucketConfig` holds ``rate_per_s`` tokens per second up to ``burst`` (default one
second's worth). A request costs 1 token, or its batch size (``ModelConfig.cost``); a cost
above the bucket size is clamped to it — such a request passes only with a full bucket, where
it would otherwise never pass (sizes are bounded elsewhere: 413).

* ``scope: local`` — per gateway process, in an ``aiolimiter.AsyncLimiter`` (leaky bucket of
  ``max_rate = burst`` per ``time_period = burst / rate_per_s``: the same thing as a token
  bucket, counting used capacity instead of tokens). ``has_capacity()`` is the non-blocking
  check; ``acquire()`` waits, bounded by ``max_wait_s``.
  Retry-After: aiolimiter reads the loop clock itself and offers no "how long until"; but
  right after ``has_capacity()`` its ``_level`` is exact as of now, so the wait comes from
  the pure :func:`tokens_wait_s` over that level. ``_level`` (read, and lowered for a
  refund) is the only private attribute used, only in :class:`LocalBucket`; it has been
  there since aiolimiter 1.0. Tests drive it with a fake-clock event loop.
* ``scope: global`` — one bucket for all replicas in Redis (``gateway.engine.redis_store``). When
  Redis is slow or down the bucket follows ``on_redis_error``: ``open`` admits, ``closed``
  rejects with 503 (``Overloaded``: the limiter cannot decide, the client is not at fault)
  and a Retry-After of the Redis breaker's open time.

A request that cannot get its tokens is refused at once with :class:`RateLimited` (429)
carrying ``retry_after_s`` = time until enough tokens are there; with ``max_wait_s`` > 0 it
waits instead when the tokens will come within that time.

The composite
-------------
:meth:`RateLimiter.admit` checks the global → tenant → model buckets that apply. First a
synchronous pre-check of the local buckets (no tokens consumed) rejects cheaply, without a
Redis round trip. Then the buckets are taken in order; if a later one rejects, the tokens
already taken are refunded, so a request refused by its model's bucket does not use up its
tenant's budget. (Between take and refund another request may see the bucket lower than it
will be: a brief over-rejection, never an over-admission.) On cancellation only local
refunds are made; Redis refunds are awaited (bounded by the timeout) only on rejection.

Bucket maps are bounded: buckets exist only for configured tenants and models. A config
reload builds a new limiter: local buckets start full again, Redis buckets carry on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from gateway.core.config import BucketConfig, GatewayConfig, ModelConfig
from gateway.core.errors import GatewayError, Overloaded, RateLimited
from gateway.engine.redis_store import RedisStore, RedisStoreStatistics, StoreUnavailable

_EPSILON = 1e-9

# Fail at start-up, not on the first rejection, if aiolimiter's internals ever change.
if "_level" not in AsyncLimiter.__slots__:  # pragma: no cover
    raise ImportError("aiolimiter.AsyncLimiter no longer has _level; gateway.engine.ratelimit "
                      "needs its bucket level for Retry-After")


def tokens_wait_s(level: float, capacity: float, rate_per_s: float, cost: float) -> float:
    """Seconds until ``cost`` fits in a bucket holding ``level`` used of ``capacity``, draining
    at ``rate_per_s``. 0.0 when it fits now. (Tokens available = capacity − level.)"""
    missing = level + cost - capacity
    return 0.0 if missing <= 0 else missing / rate_per_s


def request_cost(model: ModelConfig, batch_size: int) -> int:
    """Tokens one request costs: 1, or its batch size when the model says so."""
    return max(1, batch_size) if model.cost == "batch_size" else 1


def bucket_capacity(cfg: BucketConfig) -> float:
    return cfg.burst if cfg.burst is not None else cfg.rate_per_s


@dataclass(frozen=True, slots=True)
class BucketStatistics:
    name: str
    scope: str
    rate_per_s: float
    capacity: float
    admitted_total: int
    rejected_total: int
    waited_total: int          # admitted after waiting (max_wait_s)
    refunded_total: int
    redis_errors_total: int    # decisions made by on_redis_error


class _Bucket:
    __slots__ = ("admitted_total", "capacity", "config", "name", "redis_errors_total",
                 "refunded_total", "rejected_total", "waited_total")

    def __init__(self, name: str, cfg: BucketConfig) -> None:
        self.name = name
        self.config = cfg
        self.capacity = bucket_capacity(cfg)
        self.admitted_total = 0
        self.rejected_total = 0
        self.waited_total = 0
        self.refunded_total = 0
        self.redis_errors_total = 0

    def clamp(self, cost: float) -> float:
        return min(float(cost), self.capacity)

    def _reject(self, wait_s: float) -> RateLimited:
        self.rejected_total += 1
        return RateLimited(f"rate limit exceeded ({self.name})", retry_after_s=wait_s)

    def statistics(self) -> BucketStatistics:
        return BucketStatistics(
            name=self.name, scope=self.config.scope, rate_per_s=self.config.rate_per_s,
            capacity=self.capacity, admitted_total=self.admitted_total,
            rejected_total=self.rejected_total, waited_total=self.waited_total,
            refunded_total=self.refunded_total, redis_errors_total=self.redis_errors_total)


class LocalBucket(_Bucket):
    """A per-process bucket in an ``AsyncLimiter`` (bound to the loop that first uses it)."""

    __slots__ = ("_limiter",)

    def __init__(self, name: str, cfg: BucketConfig) -> None:
        super().__init__(name, cfg)
        self._limiter = AsyncLimiter(self.capacity, self.capacity / cfg.rate_per_s)

    def __repr__(self) -> str:
        return f"<LocalBucket {self.name} rate_per_s={self.config.rate_per_s} " \
               f"capacity={self.capacity} level={self._limiter._level:.3f}>"

    def wait_s(self, cost: float) -> float:
        """Time until ``cost`` tokens are available; 0.0 if now. Consumes nothing."""
        cost = self.clamp(cost)
        if self._limiter.has_capacity(cost):   # also drains the level up to the loop's now
            return 0.0
        return tokens_wait_s(self._limiter._level, self.capacity, self.config.rate_per_s, cost)

    async def take(self, cost: float) -> None:
        """Take ``cost`` tokens, waiting at most ``max_wait_s``; raises RateLimited."""
        cost = self.clamp(cost)
        if self._limiter.has_capacity(cost):
            # acquire() does not suspend when has_capacity() just said yes: atomic.
            await self._limiter.acquire(cost)
            self.admitted_total += 1
            return
        wait = self.wait_s(cost)
        max_wait = self.config.max_wait_s
        if wait > max_wait:
            raise self._reject(wait)
        try:
            await asyncio.wait_for(self._limiter.acquire(cost), max_wait)
        except TimeoutError:
            raise self._reject(max(self.wait_s(cost), _EPSILON)) from None
        self.waited_total += 1
        self.admitted_total += 1

    def refund(self, cost: float) -> None:
        self._limiter._level = max(0.0, self._limiter._level - self.clamp(cost))
        self.refunded_total += 1

    def available(self) -> float:
        """Tokens in the bucket now (drained up to the loop's clock when one runs)."""
        try:
            self._limiter.has_capacity(0)
        except RuntimeError:        # no running loop: the level as of the last check
            pass
        return max(0.0, self.capacity - self._limiter._level)


class GlobalBucket(_Bucket):
    """A bucket shared by every replica, in Redis."""

    __slots__ = ("_key", "_store")

    def __init__(self, name: str, cfg: BucketConfig, store: RedisStore) -> None:
        super().__init__(name, cfg)
        self._store = store
        self._key = store.key(name)

    def __repr__(self) -> str:
        return f"<GlobalBucket {self.name} rate_per_s={self.config.rate_per_s} " \
               f"capacity={self.capacity} key={self._key!r}>"

    async def take(self, cost: float) -> bool:
        """Take ``cost`` tokens; True when taken in Redis (refundable), False when admitted
        by the fail-open policy. Raises RateLimited, or Overloaded (fail closed)."""
        cost = self.clamp(cost)
        try:
            result = await self._store.take(
                self._key, rate_per_s=self.config.rate_per_s, burst=self.capacity, cost=cost,
                max_wait_s=self.config.max_wait_s)
        except StoreUnavailable as exc:
            self.redis_errors_total += 1
            if self.config.on_redis_error == "open":
                self.admitted_total += 1
                return False
            self.rejected_total += 1
            raise Overloaded(f"rate limit unavailable ({self.name})",
                             retry_after_s=max(exc.retry_after_s, _EPSILON)) from None
        if not result.admitted:
            raise self._reject(result.wait_s)
        if result.wait_s > 0:
            self.waited_total += 1
            await asyncio.sleep(result.wait_s)
        self.admitted_total += 1
        return True

    async def refund(self, cost: float) -> None:
        try:
            await self._store.refund(self._key, rate_per_s=self.config.rate_per_s,
                                     burst=self.capacity, cost=self.clamp(cost))
            self.refunded_total += 1
        except StoreUnavailable:
            pass


Bucket = LocalBucket | GlobalBucket


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    buckets: dict[str, BucketStatistics]
    redis: RedisStoreStatistics | None


class RateLimiter:
    """Global → tenant → model token buckets. One per process (and per event loop)."""

    __slots__ = ("_global", "_gpu", "_models", "_owns_store", "_store", "_tenants")

    def __init__(self, *, global_limit: BucketConfig | None = None,
                 tenants: Mapping[str, BucketConfig] | None = None,
                 models: Mapping[str, BucketConfig] | None = None,
                 gpu_tenants: Mapping[str, BucketConfig] | None = None,
                 store: RedisStore | None = None, owns_store: bool = False) -> None:
        self._store = store
        self._owns_store = owns_store
        self._global = self._make("global", global_limit) if global_limit else None
        self._tenants = {n: self._make(f"tenant:{n}", c) for n, c in (tenants or {}).items()}
        self._models = {n: self._make(f"model:{n}", c) for n, c in (models or {}).items()}
        # tenants' quotas in GPU-seconds (tokens are GPU-seconds; gateway.core.fairshare costs)
        self._gpu = {n: self._make(f"tenant:{n}:gpu_s", c)
                     for n, c in (gpu_tenants or {}).items()}

    @classmethod
    def from_config(cls, cfg: GatewayConfig, redis_store: RedisStore | None = None, *,
                    local_share: float = 1.0) -> RateLimiter:
        """Buckets from the YAML; a Redis store is created (and owned) when a global-scope
        bucket needs one and none is given. ``local_share``: this process's part of each
        local bucket (``gateway serve --processes N``: 1/N, so that N processes on one host
        admit what one gateway would)."""
        adm = cfg.admission

        def part(b: BucketConfig | None) -> BucketConfig | None:
            if b is None or b.scope != "local" or local_share >= 1.0:
                return b
            burst = b.burst if b.burst is not None else b.rate_per_s
            return dataclasses.replace(b, rate_per_s=b.rate_per_s * local_share,
                                       burst=max(1.0, burst * local_share))

        tenants = {n: part(t.rate_limit) for n, t in adm.tenants.items() if t.rate_limit}
        models = {n: part(m.rate_limit) for n, m in cfg.models.items() if m.rate_limit}
        gpu = {n: part(t.gpu_rate_limit) for n, t in adm.tenants.items() if t.gpu_rate_limit}
        global_limit = part(adm.global_limit)
        every = [*tenants.values(), *models.values(), *gpu.values(),
                 *([adm.global_limit] if adm.global_limit else [])]
        store, owns = redis_store, False
        if store is None and any(b is not None and b.scope == "global" for b in every):
            store, owns = RedisStore(adm.redis), True
        return cls(global_limit=global_limit,
                   tenants={n: b for n, b in tenants.items() if b is not None},
                   models={n: b for n, b in models.items() if b is not None},
                   gpu_tenants={n: b for n, b in gpu.items() if b is not None},
                   store=store, owns_store=owns)

    def _make(self, name: str, cfg: BucketConfig) -> Bucket:
        if cfg.scope == "global":
            if self._store is None:
                raise ValueError(f"bucket {name} has scope global but no Redis store is given")
            return GlobalBucket(name, cfg, self._store)
        return LocalBucket(name, cfg)

    def __repr__(self) -> str:
        return (f"<RateLimiter global={self._global is not None} tenants={len(self._tenants)} "
                f"models={len(self._models)}>")

    def chain(self, tenant: str | None, model: str) -> list[Bucket]:
        """The buckets that apply, in the order they are taken."""
        out: list[Bucket] = []
        if self._global is not None:
            out.append(self._global)
        if tenant is not None and (t := self._tenants.get(tenant)) is not None:
            out.append(t)
        if (m := self._models.get(model)) is not None:
            out.append(m)
        return out

    def has_gpu_quota(self, tenant: str | None) -> bool:
        return tenant is not None and tenant in self._gpu

    @property
    def has_any_gpu_quota(self) -> bool:
        return bool(self._gpu)

    def refusal(self, tenant: str | None, model: str) -> GatewayError | None:
        """What :meth:`admit` would refuse at once even for one token, from the local buckets
        alone (a Redis bucket is asked only by :meth:`admit`); consumes nothing. Used to
        refuse from a request's head, before its body is read."""
        for bucket in self.chain(tenant, model):
            if isinstance(bucket, LocalBucket):
                wait = bucket.wait_s(1)
                if wait > bucket.config.max_wait_s:
                    return bucket._reject(wait)
        return None

    async def admit(self, tenant: str | None, model: str, cost: int = 1,
                    gpu_s: float = 0.0) -> None:
        """Take ``cost`` tokens from every applicable bucket (and ``gpu_s`` from the
        tenant's GPU-second bucket, when it has one), or none. Raises ``RateLimited``
        (429), or ``Overloaded`` (503) for a fail-closed Redis bucket."""
        chain: list[tuple[Bucket, float]] = [(b, cost) for b in self.chain(tenant, model)]
        if tenant is not None and gpu_s > 0 and (g := self._gpu.get(tenant)) is not None:
            chain.append((g, gpu_s))
        for bucket, n in chain:     # cheap local rejection before any Redis round trip
            if isinstance(bucket, LocalBucket):
                wait = bucket.wait_s(n)
                if wait > bucket.config.max_wait_s:
                    raise bucket._reject(wait)
        taken: list[tuple[Bucket, float]] = []
        try:
            for bucket, n in chain:
                if isinstance(bucket, LocalBucket):
                    await bucket.take(n)
                    taken.append((bucket, n))
                elif await bucket.take(n):
                    taken.append((bucket, n))
        except Exception:
            for bucket, n in reversed(taken):
                if isinstance(bucket, LocalBucket):
                    bucket.refund(n)
                else:
                    await bucket.refund(n)
            raise
        except BaseException:
            for bucket, n in reversed(taken):
                if isinstance(bucket, LocalBucket):
                    bucket.refund(n)
            raise

    def describe(self) -> list[dict[str, object]]:
        """One row per bucket for /status.json: name, scope, rate, burst and the tokens
        available now (local buckets; None for global ones — that would cost a Redis call)."""
        buckets = [*([self._global] if self._global else []), *self._tenants.values(),
                   *self._models.values(), *self._gpu.values()]
        return [{"name": b.name, "scope": b.config.scope, "rate_per_s": b.config.rate_per_s,
                 "burst": b.capacity,
                 "available": b.available() if isinstance(b, LocalBucket) else None}
                for b in buckets]

    def statistics(self) -> RateLimiterStatistics:
        buckets = [*([self._global] if self._global else []), *self._tenants.values(),
                   *self._models.values(), *self._gpu.values()]
        return RateLimiterStatistics(
            buckets={b.name: b.statistics() for b in buckets},
            redis=self._store.statistics() if self._store is not None else None)

    async def aclose(self) -> None:
        if self._store is not None and self._owns_store:
            await self._store.aclose()
