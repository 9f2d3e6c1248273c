"""Token buckets shared by every gateway replica, kept in Redis (the one module that imports
``redis``).

One Lua script does the whole decision atomically inside Redis: it reads the bucket (a hash
``tokens``/``ts``), refills it by the time elapsed on the *Redis server's* clock (``TIME``,
so the replicas' clocks do not matter), then either takes ``cost`` tokens or says how long
until they would be there. A ``max_wait_s`` turns it into a reservation: if the tokens will
be there within that time they are taken now (the level goes negative) and the caller sleeps
the returned wait — fair, and still one round trip. Keys expire once the bucket would be full
again, so Redis holds nothing for idle buckets. The script is called with EVALSHA and falls
back to EVAL (which also caches it) on NOSCRIPT, e.g. after a restart or SCRIPT FLUSH.

Every call is bounded by ``RedisConfig.timeout_s`` (default 20 ms, Envoy's figure). A call
that times out or cannot connect raises :class:`StoreUnavailable`; the rate limiter then
applies the bucket's ``on_redis_error`` policy. After ``breaker_failures`` failures in a row a
small circuit breaker (the same state machine as the workers', see ``gateway.core.breaker``) stops
calling Redis for ``breaker_open_s`` and ``StoreUnavailable("breaker_open")`` is raised at
once, so a hung Redis costs at most a few timeouts, not one per request. redis-py's own
retries are switched off: the timeout is the whole budget.

The URL (it may carry a password) is shown masked in reprs and never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.breaker import BreakerState, CircuitBreaker
from gateway.core.config import DEFAULT_REDIS_URL, BreakerConfig, RedisConfig

DEFAULT_MAX_CONNECTIONS = 64

# Membership for replicas that share one fleet (gateway.engine.coordinator): KEYS[1] the
# members' set; ARGV: prefix of a member's key, member id, report (JSON), lease in ms, mode
# ("leave" withdraws), want (JSON {worker: {model: [target, limit, in_flight]}}). Reads every
# live report, grants this member's want against what the others hold (gateway.core.shares.
# grant_units, the same rule), stores its report with what it now holds for one lease, and
# returns {granted (JSON), every live report…}. One round trip per heartbeat; Redis runs
# scripts one at a time, so two replicas are never granted the same units.
EXCHANGE_SCRIPT = r"""
local prefix, me = ARGV[1], ARGV[2]
if ARGV[5] == 'leave' then
  redis.call('DEL', prefix .. me)
  redis.call('SREM', KEYS[1], me)
  return {}
end
local others, out = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= me then
    local v = redis.call('GET', prefix .. id)
    if v then
      table.insert(out, v)
      local ok, r = pcall(cjson.decode, v)
      if ok and type(r) == 'table' and type(r.held) == 'table' then
        for w, models in pairs(r.held) do
          if type(models) == 'table' then
            for m, n in pairs(models) do
              if type(n) == 'number' then
                local k = w .. '\n' .. m
                others[k] = (others[k] or 0) + n
              end
            end
          end
        end
      end
    else
      redis.call('SREM', KEYS[1], id)
    end
  end
end
local mine = cjson.decode(ARGV[3])
local held, granted = {}, {}
for w, models in pairs(cjson.decode(ARGV[6])) do
  held[w], granted[w] = {}, {}
  for m, t in pairs(models) do
    local g = math.max(0, math.min(t[1], t[2] - (others[w .. '\n' .. m] or 0)))
    granted[w][m] = g
    held[w][m] = math.max(g, t[3])
  end
end
mine['held'] = held
local encoded = cjson.encode(mine)
redis.call('SET', prefix .. me, encoded, 'PX', tonumber(ARGV[4]))
redis.call('SADD', KEYS[1], me)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 10)
table.insert(out, encoded)
table.insert(out, 1, cjson.encode(granted))
return out
"""

# KEYS[1] bucket; ARGV: rate_per_s, burst, cost, max_wait_s (take) or -1 (refund).
# Returns {admitted 0|1, wait_s, server_now_s} as strings (Lua numbers would be truncated to
# integers; %.17g keeps every bit of a double, tostring's %.14g would not).
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(st[1])
local ts = tonumber(st[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
end
local admitted = 0
local wait = 0
if max_wait < 0 then
  tokens = math.min(burst, tokens + cost)
  admitted = 1
elseif tokens >= cost then
  tokens = tokens - cost
  admitted = 1
else
  wait = (cost - tokens) / rate
  if wait <= max_wait then
    tokens = tokens - cost
    admitted = 1
  end
end
local function str(x) return string.format('%.17g', x) end
redis.call('HSET', KEYS[1], 'tokens', str(tokens), 'ts', str(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {str(admitted), str(wait), str(now)}
"""
TAKE_SCRIPT_SHA1 = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()
EXCHANGE_SCRIPT_SHA1 = hashlib.sha1(EXCHANGE_SCRIPT.encode()).hexdigest()


def mask_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` → ``redis://user:***@host:6379/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


class StoreUnavailable(Exception):
    """Redis did not answer in time, refused, or is being skipped by the breaker."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason               # timeout | connection | error | breaker_open
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class TakeResult:
    admitted: bool
    wait_s: float          # admitted: sleep this long first (reservation); else: until available
    server_time_s: float   # Redis TIME when decided


@dataclass(frozen=True, slots=True)
class RedisStoreStatistics:
    calls_total: int
    ok_total: int
    timeouts_total: int
    errors_total: int          # connection and other Redis errors
    skipped_total: int         # calls not made because the breaker was open
    noscript_total: int        # EVALSHA fell back to EVAL
    breaker_state: BreakerState


class RedisStore:
    """Async shell around the Lua bucket; one per process, shared by all global buckets."""

    def __init__(self, cfg: RedisConfig, *, clock: Callable[[], float] = time.monotonic,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self._cfg = cfg
        self._clock = clock
        # A blocking pool: a burst beyond max_connections waits for a connection (within
        # the call's timeout) instead of failing with "too many connections" and tripping
        # the breaker while Redis is healthy.
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url.reveal() or DEFAULT_REDIS_URL, max_connections=max_connections,
            timeout=cfg.timeout_s,
            socket_timeout=cfg.timeout_s * 10, socket_connect_timeout=cfg.timeout_s * 10,
            retry=Retry(NoBackoff(), 0))
        self._client = aioredis.Redis.from_pool(pool)
        self._breaker = CircuitBreaker(
            BreakerConfig(consecutive_failures=cfg.breaker_failures, error_rate=1.0,
                          min_requests=2 ** 31, open_s=cfg.breaker_open_s,
                          max_open_s=cfg.breaker_open_s, jitter=0.0, half_open_probes=1,
                          slow_start_s=0.0),
            random.Random(0), clock(), slow_start=False)
        self.calls_total = 0
        self.ok_total = 0
        self.timeouts_total = 0
        self.errors_total = 0
        self.skipped_total = 0
        self.noscript_total = 0

    def __repr__(self) -> str:
        return (f"<RedisStore {mask_url(self._cfg.url.reveal() or DEFAULT_REDIS_URL)} "
                f"timeout_s={self._cfg.timeout_s} breaker={self._breaker.state.value}>")

    def key(self, name: str) -> str:
        return f"{self._cfg.key_prefix}bucket:{name}"

    async def take(self, key: str, *, rate_per_s: float, burst: float, cost: float,
                   max_wait_s: float = 0.0) -> TakeResult:
        """Take ``cost`` tokens (or reserve them within ``max_wait_s``). Raises
        :class:`StoreUnavailable`."""
        return await self._run(key, rate_per_s, burst, cost, max(0.0, max_wait_s))

    async def refund(self, key: str, *, rate_per_s: float, burst: float, cost: float) -> None:
        """Give back tokens taken by a request that was rejected further down the chain."""
        await self._run(key, rate_per_s, burst, cost, -1.0)

    async def exchange(self, member: str, payload: bytes, want: bytes, lease_s: float, *,
                       timeout_s: float) -> tuple[bytes, list[bytes]]:
        """Publish this replica's report for ``lease_s``, be granted its ``want``, and read
        every live report (the coordinator's heartbeat; off the request path, so its own
        ``timeout_s``): (granted, reports). Raises :class:`StoreUnavailable`."""
        prefix = self._cfg.key_prefix
        args = (f"{prefix}member:", member, payload, str(max(1, int(lease_s * 1000))), "",
                want)
        reply = await self._membership(f"{prefix}members", args, timeout_s)
        if not reply:
            raise StoreUnavailable("error", self._cfg.breaker_open_s)
        return reply[0], reply[1:]

    async def leave(self, member: str, *, timeout_s: float) -> None:
        prefix = self._cfg.key_prefix
        await self._membership(f"{prefix}members",
                               (f"{prefix}member:", member, b"", "1", "leave", b""),
                               timeout_s)

    async def _membership(self, key: str, args: tuple[str | bytes, ...],
                          timeout_s: float) -> list[bytes]:
        try:
            reply = await asyncio.wait_for(self._script(EXCHANGE_SCRIPT, EXCHANGE_SCRIPT_SHA1,
                                                        key, args), timeout_s)
        except (TimeoutError, RedisTimeoutError):
            raise StoreUnavailable("timeout", self._cfg.breaker_open_s) from None
        except (RedisError, OSError) as exc:
            kind = "connection" if isinstance(exc, RedisConnectionError | OSError) else "error"
            raise StoreUnavailable(kind, self._cfg.breaker_open_s) from None
        return [bytes(x) for x in reply]

    async def _script(self, script: str, sha1: str, key: str,
                      args: tuple[str | bytes, ...]) -> list[bytes]:
        try:
            reply = await self._client.evalsha(sha1, 1, key, *args)  # type: ignore[misc]
        except NoScriptError:
            reply = await self._client.eval(script, 1, key, *args)  # type: ignore[misc]
        return list(reply)

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), self._cfg.timeout_s))
        except (TimeoutError, RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _run(self, key: str, rate_per_s: float, burst: float, cost: float,
                   max_wait_s: float) -> TakeResult:
        now = self._clock()
        if not self._breaker.allow(now):
            self.skipped_total += 1
            reopen = self._breaker.reopen_at
            raise StoreUnavailable("breaker_open", max(0.0, (reopen or now) - now))
        self.calls_total += 1
        args = (rate_per_s, burst, cost, max_wait_s)
        outcome: bool | None = None
        try:
            reply = await asyncio.wait_for(self._eval(key, args), self._cfg.timeout_s)
            outcome = True
        except (TimeoutError, RedisTimeoutError):
            outcome = False
            self.timeouts_total += 1
            raise StoreUnavailable("timeout", self._cfg.breaker_open_s) from None
        except (RedisError, OSError) as exc:
            outcome = False
            self.errors_total += 1
            kind = "connection" if isinstance(exc, RedisConnectionError | OSError) else "error"
            raise StoreUnavailable(kind, self._cfg.breaker_open_s) from None
        finally:
            if outcome is None:            # cancelled: no verdict on Redis
                self._breaker.cancel(self._clock())
            else:
                done_at = self._clock()
                trip_reason = self._breaker.record(done_at, outcome)
                if trip_reason is not None:
                    self._breaker.trip(done_at, trip_reason)
        self.ok_total += 1
        admitted, wait_s, server_now = (float(x) for x in reply)
        return TakeResult(admitted=admitted >= 1, wait_s=wait_s, server_time_s=server_now)

    async def _eval(self, key: str, args: tuple[float, ...]) -> list[bytes]:
        argv = [repr(float(a)) for a in args]
        try:
            reply = await self._client.evalsha(TAKE_SCRIPT_SHA1, 1, key, *argv)  # type: ignore[misc]
        except NoScriptError:
            self.noscript_total += 1
            reply = await self._client.eval(TAKE_SCRIPT, 1, key, *argv)  # type: ignore[misc]
        return list(reply)

    def statistics(self) -> RedisStoreStatistics:
        return RedisStoreStatistics(
            calls_total=self.calls_total, ok_total=self.ok_total,
            timeouts_total=self.timeouts_total, errors_total=self.errors_total,
            skipped_total=self.skipped_total, noscript_total=self.noscript_total,
            breaker_state=self._breaker.advance(self._clock()))
