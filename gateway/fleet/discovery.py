"""Model discovery: which ready workers serve model M (version V), learned by asking them.

Why: a worker's ``/v2/repository/index`` does not list every model it serves (PyTriton's is
empty), so a model the gateway has not seen is looked up on the ready workers on first use,
the way one Triton would answer for it.

The rules
---------
* A name is untrusted client input. It is checked before anything is asked (1–256 UTF-8
  bytes, printable, no ``/`` or ``\\``, not ``.``/``..``; a version is 1–19 digits) and
  URL-quoted in every path built from it. An invalid name is unknown without a probe.
* ``(m, "")`` — the server's default version — is looked up with
  ``GET /v2/models/{m}/ready`` on every ready worker at once, each bounded by
  ``probe_timeout_s``. A versioned key ``(m, v)`` first resolves ``(m, "")`` (so a flood of
  random versioned names costs one round, not two), then asks
  ``/v2/models/{m}/versions/{v}/ready`` only of the workers that serve ``m``. Triton's
  ``/ready`` answers 400 ``Model version not ready`` for an unknown model *and* an unknown
  version alike; this order is what tells them apart.
* On the first positive answer, ``GET .../config`` is read once from that worker into a
  :class:`ModelFacts` (batching, instances, decoupled) for capacity and batching.
* Positive answers are kept per worker in an LRU of ``max_models`` keys. They come from a
  probe, or are seeded from what the fleet already knows (:meth:`ModelCatalog.on_worker_models`,
  the repository index and configured models). Probed ones are re-checked when the fleet
  polls a worker's models (:meth:`ModelDirectory.refresh_worker`), which is also how a worker
  that joined later learns the models found on others.
* A round with no positive answer is cached as a negative for ``negative_ttl_s`` in a
  separate LRU of ``max_negatives`` keys, so a flood of random names cannot evict real
  models, and one name asked again and again costs one round per TTL.
* Lookups of one key are coalesced: one round, one shared task, however many callers.
  New rounds are bounded twice: at most ``max_rounds_in_flight`` at once, and a token bucket
  of ``rounds_per_s`` (burst ``round_burst``). A lookup refused by either is
  :class:`Deferred` (not probed, not cached): a flood of N random names costs at most
  ``round_burst + rounds_per_s × t`` rounds in t seconds, each at most one probe per ready
  worker plus one config read.

Outcomes, and what the proxy answers (measured on tritonserver 2.51 through PyTriton, and
the same in the simulator):

=================  =====================================  ===================================
outcome            ``.../ready``                          metadata, config, infer, ...
=================  =====================================  ===================================
Found              200                                    forward to one of ``workers``
ModelUnknown       400 ``Model version not ready``        404 ``Request for unknown model:
                                                          'm' is not found``
VersionUnknown     400 ``Model version not ready``        404 ``Request for unknown model:
                                                          'm' version 9 is not found``
NoWorkerReady      400 ``Model version not ready``        503 + Retry-After
Deferred           400 ``Model version not ready``        503 + Retry-After
=================  =====================================  ===================================

:class:`ModelCatalog` is the pure core (``now`` passed in, no I/O); :class:`ModelDirectory`
is the async shell that asks the workers through an injected :class:`WorkerFetch`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from gateway.core.errors import (
    BadRequest,
    GatewayError,
    NoHealthyWorker,
    NotFound,
    Overloaded,
    UpstreamError,
)
from gateway.core.types import ModelKey, WorkerId
from gateway.fleet.upstream import Pool, fetch

log = logging.getLogger("gateway.fleet.discovery")

DEFAULT_PROBE_TIMEOUT_S = 1.0       # one /ready or /config request to one worker
DEFAULT_NEGATIVE_TTL_S = 5.0        # how long "nobody has it" is believed
DEFAULT_MAX_MODELS = 4096           # positive keys kept (LRU)
DEFAULT_MAX_NEGATIVES = 4096        # negative keys kept (LRU, and TTL)
DEFAULT_MAX_ROUNDS_IN_FLIGHT = 16   # lookup rounds running at once
DEFAULT_ROUNDS_PER_S = 20.0         # new lookup rounds per second, sustained ...
DEFAULT_ROUND_BURST = 40            # ... and in a burst
DEFAULT_MAX_REFRESH_KEYS = 64       # keys re-checked on one worker per refresh
DEFAULT_RETRY_AFTER_S = 1.0

MAX_NAME_BYTES = 256
MAX_VERSION_DIGITS = 19             # int64
NOT_READY_MESSAGE = "Model version not ready"  # Triton's body for any negative /ready


class Action(enum.Enum):
    """What the client asked about the model; decides how a negative outcome is answered."""

    READY = "ready"
    OTHER = "other"      # metadata, config, stats, infer, generate


class Source(enum.Enum):
    SEEDED = "seeded"    # the fleet said so (repository index, configured models)
    PROBED = "probed"    # a /ready probe said so


# ------------------------------------------------------------------ vocabulary

@dataclass(frozen=True, slots=True)
class DiscoveryLimits:
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
    negative_ttl_s: float = DEFAULT_NEGATIVE_TTL_S
    max_models: int = DEFAULT_MAX_MODELS
    max_negatives: int = DEFAULT_MAX_NEGATIVES
    max_rounds_in_flight: int = DEFAULT_MAX_ROUNDS_IN_FLIGHT
    rounds_per_s: float = DEFAULT_ROUNDS_PER_S
    round_burst: int = DEFAULT_ROUND_BURST
    max_refresh_keys: int = DEFAULT_MAX_REFRESH_KEYS
    retry_after_s: float = DEFAULT_RETRY_AFTER_S


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a model's config says about how much it can run at once."""

    max_batch_size: int          # 0: the model does not batch
    dynamic_batching: bool       # Triton forms batches itself
    instances: int               # Σ instance_group count (× GPUs listed)
    decoupled: bool              # may answer 0..n responses per request; never merge
    max_queue_delay_us: int = 0  # dynamic_batching.max_queue_delay_microseconds
    # the dynamic batcher's queue policy lets a request set its own ``timeout`` (Triton's
    # schedule-policy extension): the gateway passes each request's remaining time on
    timeout_override: bool = False
    # dynamic_batching.priority_levels: the gateway's priority class goes on as ``priority``
    priority_levels: int = 0
    # sequence_batching: a stateful model, whose requests are never sent twice
    sequence_batching: bool = False


@dataclass(frozen=True, slots=True)
class Found:
    key: ModelKey
    workers: frozenset[WorkerId]   # ready workers that serve the key
    facts: ModelFacts | None
    cached: bool


@dataclass(frozen=True, slots=True)
class ModelUnknown:
    """No worker knows the model. ``reason``: probed, cached, invalid_name."""

    key: ModelKey
    reason: str

    def error(self, action: Action) -> GatewayError:
        if action is Action.READY:
            return BadRequest(NOT_READY_MESSAGE)
        return NotFound(f"Request for unknown model: '{self.key.name}' is not found")


@dataclass(frozen=True, slots=True)
class VersionUnknown:
    """The model exists, that version does not. ``reason``: probed, cached, invalid_version."""

    key: ModelKey
    reason: str

    def error(self, action: Action) -> GatewayError:
        if action is Action.READY:
            return BadRequest(NOT_READY_MESSAGE)
        return NotFound(f"Request for unknown model: '{self.key.name}' version "
                        f"{self.key.version} is not found")


@dataclass(frozen=True, slots=True)
class NoWorkerReady:
    """Nobody can answer for the key right now. ``reason``: no_ready_worker (none at all),
    not_ready (known, but not on a ready worker), probe_failed (probes timed out/broke)."""

    key: ModelKey
    reason: str
    retry_after_s: float

    def error(self, action: Action) -> GatewayError:
        if action is Action.READY:
            return BadRequest(NOT_READY_MESSAGE)
        return NoHealthyWorker(f"no ready worker has model '{self.key}'",
                               retry_after_s=self.retry_after_s)


@dataclass(frozen=True, slots=True)
class Deferred:
    """Not looked up: too many lookups at once (``in_flight_limit``) or per second
    (``rate_limit``). Not cached; the next request may look it up."""

    key: ModelKey
    reason: str
    retry_after_s: float

    def error(self, action: Action) -> GatewayError:
        if action is Action.READY:
            return BadRequest(NOT_READY_MESSAGE)
        return Overloaded(f"model lookups are saturated; cannot tell yet whether model "
                          f"'{self.key}' exists", retry_after_s=self.retry_after_s)


Lookup = Found | ModelUnknown | VersionUnknown | NoWorkerReady | Deferred
Negative = ModelUnknown | VersionUnknown | NoWorkerReady


@dataclass(frozen=True, slots=True)
class NeedsProbe:
    """The core's answer when only the workers can tell. ``base_first``: resolve
    ``(m, "")`` first, then decide again."""

    key: ModelKey
    targets: tuple[WorkerId, ...]
    base_first: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryStatistics:
    models_known: int
    negatives_cached: int
    rounds_in_flight: int
    rounds_started: int
    probes_sent: int
    probe_failures: int
    config_reads: int
    hits: int
    negative_hits: int
    deferred: int
    invalid_names: int
    found: int
    model_unknown: int
    version_unknown: int
    no_worker_ready: int
    tokens: float


# ------------------------------------------------------------------ pure helpers

def is_valid_name(name: str) -> bool:
    if name in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable():
        return False
    try:
        return len(name.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False


def is_valid_version(version: str) -> bool:
    return version == "" or (len(version) <= MAX_VERSION_DIGITS and version.isascii()
                             and version.isdigit())


def model_path(key: ModelKey, suffix: str = "") -> str:
    """``/v2/models/{m}[/versions/{v}][/suffix]`` with the name URL-quoted."""
    path = "/v2/models/" + quote(key.name, safe="")
    if key.version:
        path += "/versions/" + quote(key.version, safe="")
    return path + ("/" + suffix if suffix else "")


def parse_key(entry: str) -> ModelKey | None:
    """A fleet ``models_ready`` entry (``name``, ``name/version``; ``name/?`` = versions not
    known) as a key; None for the ``?`` marker."""
    name, _, version = entry.partition("/")
    if version == "?" or not is_valid_name(name) or not is_valid_version(version):
        return None
    return ModelKey(name, version)


def model_facts(config: object) -> ModelFacts | None:
    """The facts in a Triton model config document (None: not a config)."""
    if not isinstance(config, dict):
        return None
    raw_batch = config.get("max_batch_size", 0)
    batching = config.get("dynamic_batching")
    policy = config.get("model_transaction_policy")
    delay = batching.get("max_queue_delay_microseconds", 0) if isinstance(batching, dict) else 0
    if isinstance(delay, str) and delay.isdigit():  # protobuf JSON may spell uint64 as text
        delay = int(delay)
    return ModelFacts(
        max_batch_size=raw_batch if isinstance(raw_batch, int) and raw_batch > 0 else 0,
        dynamic_batching=isinstance(batching, dict),
        instances=_instances(config.get("instance_group")),
        decoupled=isinstance(policy, dict) and policy.get("decoupled") is True,
        max_queue_delay_us=delay if isinstance(delay, int) and delay > 0 else 0,
        timeout_override=isinstance(batching, dict) and _allows_timeout_override(batching),
        priority_levels=_priority_levels(batching),
        sequence_batching=isinstance(config.get("sequence_batching"), dict),
    )


def _priority_levels(batching: object) -> int:
    if not isinstance(batching, dict):
        return 0
    levels = batching.get("priority_levels", 0)
    if isinstance(levels, str) and levels.isdigit():  # protobuf JSON spells uint64 as text
        levels = int(levels)
    return levels if isinstance(levels, int) and not isinstance(levels, bool) \
        and 0 < levels <= 1_000_000 else 0


def _allows_timeout_override(batching: dict[str, object]) -> bool:
    """Whether the default queue policy (or every priority level's) allows a request's own
    ``timeout``: only then does Triton honour the parameter."""
    default = batching.get("default_queue_policy")
    if isinstance(default, dict) and default.get("allow_timeout_override") is True:
        return True
    levels = batching.get("priority_queue_policy")
    return (isinstance(levels, dict) and bool(levels)
            and all(isinstance(v, dict) and v.get("allow_timeout_override") is True
                    for v in levels.values()))


def _instances(groups: object) -> int:
    if not isinstance(groups, list) or not groups:
        return 1  # Triton's default: one instance
    total = 0
    for g in groups:
        if not isinstance(g, dict):
            continue
        count = g.get("count", 1)
        count = count if isinstance(count, int) and count > 0 else 1
        gpus = g.get("gpus")
        total += count * (len(gpus) if isinstance(gpus, list) and gpus else 1)
    return max(total, 1)


# ------------------------------------------------------------------ the pure core

class _Entry:
    __slots__ = ("facts", "serving")

    def __init__(self) -> None:
        self.serving: dict[WorkerId, Source] = {}
        self.facts: ModelFacts | None = None


@dataclass(frozen=True, slots=True)
class _NegativeEntry:
    result: Negative
    until: float


class ModelCatalog:
    """What is known about which worker serves which model; decisions, no I/O."""

    __slots__ = ("_absent", "_counts", "_known", "_rounds_in_flight", "_seeds", "_tokens",
                 "_tokens_at", "limits")

    def __init__(self, limits: DiscoveryLimits = DiscoveryLimits(), *, now: float = 0.0) -> None:
        self.limits = limits
        self._known: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._absent: OrderedDict[ModelKey, _NegativeEntry] = OrderedDict()
        self._seeds: dict[WorkerId, frozenset[ModelKey]] = {}
        self._rounds_in_flight = 0
        self._tokens = float(limits.round_burst)
        self._tokens_at = now
        self._counts: dict[str, int] = dict.fromkeys(
            ("rounds_started", "probes_sent", "probe_failures", "config_reads", "hits",
             "negative_hits", "deferred", "invalid_names", "found", "model_unknown",
             "version_unknown", "no_worker_ready"), 0)

    def __repr__(self) -> str:
        return (f"<ModelCatalog known={len(self._known)}/{self.limits.max_models} "
                f"negatives={len(self._absent)} rounds_in_flight={self._rounds_in_flight}/"
                f"{self.limits.max_rounds_in_flight}>")

    # questions ----------------------------------------------------------------------------
    def decide(self, key: ModelKey, ready: Collection[WorkerId], now: float) -> Lookup | NeedsProbe:
        """The answer from what is known, or which workers to ask."""
        if not is_valid_name(key.name):
            self._counts["invalid_names"] += 1
            return self._count(ModelUnknown(key, "invalid_name"))
        if not is_valid_version(key.version):
            self._counts["invalid_names"] += 1
            return self._count(VersionUnknown(key, "invalid_version"))
        entry = self._known.get(key)
        if entry is not None:
            self._known.move_to_end(key)
            workers = frozenset(w for w in entry.serving if w in ready)
            if workers:
                self._counts["hits"] += 1
                return self._count(Found(key, workers, entry.facts, cached=True))
        if not ready:
            return self._count(NoWorkerReady(key, "no_ready_worker", self.limits.retry_after_s))
        cached = self._cached_negative(key, now)
        if cached is not None:
            return cached
        if not key.version:
            asked = entry.serving if entry is not None else {}
            return NeedsProbe(key, tuple(sorted(w for w in ready if w not in asked)))
        base = ModelKey(key.name)
        base_entry = self._known.get(base)
        serving_base = sorted(w for w in base_entry.serving if w in ready) if base_entry else []
        if serving_base:
            asked = entry.serving if entry is not None else {}
            return NeedsProbe(key, tuple(w for w in serving_base if w not in asked))
        base_negative = self._cached_negative(base, now)
        if base_negative is None:
            return NeedsProbe(key, (), base_first=True)
        if isinstance(base_negative, NoWorkerReady):
            return self._count(NoWorkerReady(key, base_negative.reason,
                                             base_negative.retry_after_s))
        return self._count(ModelUnknown(key, "cached"))

    def facts(self, key: ModelKey) -> ModelFacts | None:
        entry = self._known.get(key)
        return entry.facts if entry is not None else None

    def workers_for(self, key: ModelKey) -> frozenset[WorkerId]:
        """Every worker known to serve ``key``, ready or not."""
        entry = self._known.get(key)
        return frozenset(entry.serving) if entry is not None else frozenset()

    def _cached_negative(self, key: ModelKey, now: float) -> Negative | None:
        neg = self._absent.get(key)
        if neg is None:
            return None
        if neg.until <= now:
            del self._absent[key]
            return None
        self._counts["negative_hits"] += 1
        self._count(neg.result)
        return neg.result

    # lookup rounds ------------------------------------------------------------------------
    def admit_round(self, key: ModelKey, now: float) -> Deferred | None:
        """Start a round (None) or refuse it. A started round must be ended with
        :meth:`round_finished`."""
        lim = self.limits
        self._tokens = min(float(lim.round_burst),
                           self._tokens + max(0.0, now - self._tokens_at) * lim.rounds_per_s)
        self._tokens_at = max(self._tokens_at, now)
        refused: str | None = None
        if self._rounds_in_flight >= lim.max_rounds_in_flight:
            refused = "in_flight_limit"
        elif self._tokens < 1.0:
            refused = "rate_limit"
        if refused is not None:
            self._counts["deferred"] += 1
            return Deferred(key, refused, lim.retry_after_s)
        self._tokens -= 1.0
        self.begin_round()
        return None

    def begin_round(self) -> None:
        """Count a round that is part of one already admitted (a versioned key's base)."""
        self._rounds_in_flight += 1
        self._counts["rounds_started"] += 1

    def round_finished(self) -> None:
        self._rounds_in_flight -= 1

    def record_round(self, key: ModelKey, answers: Mapping[WorkerId, bool | None],
                     facts: ModelFacts | None, now: float) -> Lookup:
        """What one round learned: per asked worker True (ready), False (not), None (no
        answer: timeout, broken connection, unexpected status)."""
        self._counts["probes_sent"] += len(answers)
        self._counts["probe_failures"] += sum(a is None for a in answers.values())
        positive = [w for w, a in answers.items() if a is True]
        entry = self._known.get(key)
        if entry is not None:
            for w, a in answers.items():
                if a is False and entry.serving.get(w) is Source.PROBED:
                    del entry.serving[w]
        if positive:
            entry = self._remember(key)
            for w in positive:
                entry.serving.setdefault(w, Source.PROBED)
            if facts is not None:
                entry.facts = facts
            self._absent.pop(key, None)
            return self._count(Found(key, frozenset(positive), entry.facts, cached=False))
        result: Negative
        if entry is not None and entry.serving:
            result = NoWorkerReady(key, "not_ready", self.limits.retry_after_s)
        elif any(a is None for a in answers.values()):
            result = NoWorkerReady(key, "probe_failed", self.limits.retry_after_s)
        elif key.version:
            result = VersionUnknown(key, "probed")
        else:
            result = ModelUnknown(key, "probed")
        self._absent[key] = _NegativeEntry(result, now + self.limits.negative_ttl_s)
        self._absent.move_to_end(key)
        while len(self._absent) > self.limits.max_negatives:
            self._absent.popitem(last=False)
        return self._count(result)

    def _remember(self, key: ModelKey) -> _Entry:
        entry = self._known.get(key)
        if entry is None:
            entry = self._known[key] = _Entry()
            while len(self._known) > self.limits.max_models:
                self._known.popitem(last=False)
        self._known.move_to_end(key)
        return entry

    def _count(self, result: Lookup) -> Lookup:
        name = {Found: "found", ModelUnknown: "model_unknown", VersionUnknown: "version_unknown",
                NoWorkerReady: "no_worker_ready", Deferred: "deferred"}[type(result)]
        if name != "deferred":
            self._counts[name] += 1
        return result

    # what the fleet knows -----------------------------------------------------------------
    def on_worker_models(self, worker: WorkerId, models_ready: Iterable[str]) -> None:
        """Seed from the fleet's view of one worker (``Worker.models_ready`` entries); keys
        it no longer lists lose that worker."""
        keys = frozenset(k for k in map(parse_key, models_ready) if k is not None)
        old = self._seeds.get(worker, frozenset())
        for key in old - keys:
            entry = self._known.get(key)
            if entry is not None and entry.serving.get(worker) is Source.SEEDED:
                del entry.serving[worker]
        for key in keys:
            entry = self._remember(key)
            entry.serving[worker] = Source.SEEDED
            self._absent.pop(key, None)
        if keys:
            self._seeds[worker] = keys
        else:
            self._seeds.pop(worker, None)

    def forget_worker(self, worker: WorkerId) -> None:
        """The worker left the fleet: it serves nothing any more."""
        self._seeds.pop(worker, None)
        for entry in self._known.values():
            entry.serving.pop(worker, None)

    def refresh_plan(self, worker: WorkerId) -> tuple[ModelKey, ...]:
        """Keys to re-check on ``worker``: those a probe found there, and those found
        elsewhere it was never asked about; most recently used first, bounded."""
        plan: list[ModelKey] = []
        for key in reversed(self._known):
            if len(plan) >= self.limits.max_refresh_keys:
                break
            src = self._known[key].serving.get(worker)
            if src is Source.PROBED or (src is None and self._known[key].serving):
                plan.append(key)
        return tuple(plan)

    def record_refresh(self, worker: WorkerId, answers: Mapping[ModelKey, bool | None],
                       facts: Mapping[ModelKey, ModelFacts]) -> None:
        self._counts["probes_sent"] += len(answers)
        self._counts["probe_failures"] += sum(a is None for a in answers.values())
        for key, ok in answers.items():
            entry = self._known.get(key)
            if entry is None:
                continue
            if ok is True:
                entry.serving.setdefault(worker, Source.PROBED)
                self._absent.pop(key, None)
            elif ok is False and entry.serving.get(worker) is Source.PROBED:
                del entry.serving[worker]
        for key, f in facts.items():
            entry = self._known.get(key)
            if entry is not None:
                entry.facts = f

    def facts_missing(self, worker: WorkerId) -> tuple[ModelKey, ...]:
        """Keys ``worker`` serves whose config has not been read yet, bounded."""
        return tuple(k for k, e in self._known.items()
                     if e.facts is None and worker in e.serving)[:self.limits.max_refresh_keys]

    def note_config_read(self) -> None:
        self._counts["config_reads"] += 1

    def statistics(self, now: float) -> DiscoveryStatistics:
        lim = self.limits
        tokens = min(float(lim.round_burst),
                     self._tokens + max(0.0, now - self._tokens_at) * lim.rounds_per_s)
        negatives = sum(n.until > now for n in self._absent.values())
        return DiscoveryStatistics(models_known=len(self._known), negatives_cached=negatives,
                                   rounds_in_flight=self._rounds_in_flight, tokens=tokens,
                                   **self._counts)


# ------------------------------------------------------------------ the async shell

class WorkerFetch(Protocol):
    """One small GET to one worker; the whole response. Raises ``GatewayError`` (e.g.
    ``UpstreamError``) or ``OSError`` when there is none; ``gateway.fleet.upstream.fetch`` on the
    worker's pool fits."""

    async def __call__(self, worker: WorkerId, method: str, target: str, *,
                       timeout_s: float) -> tuple[int, bytes]: ...


def fetch_via_pools(pool_of: Callable[[WorkerId], Pool | None]) -> WorkerFetch:
    """A :class:`WorkerFetch` over the workers' own keep-alive pools (``Worker.pool``)."""

    async def fetch_from(worker: WorkerId, method: str, target: str, *,
                         timeout_s: float) -> tuple[int, bytes]:
        pool = pool_of(worker)
        if pool is None:
            raise UpstreamError(f"worker {worker} is gone")
        return await fetch(pool, method, target, timeout_s=timeout_s)

    return fetch_from


class ModelDirectory:
    """Answers "which ready workers serve this model?", asking the workers when it must."""

    __slots__ = ("_clock", "_fetch", "_rounds", "catalog")

    def __init__(self, fetch: WorkerFetch, limits: DiscoveryLimits = DiscoveryLimits(), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._clock = clock
        self.catalog = ModelCatalog(limits, now=clock())
        self._rounds: dict[ModelKey, asyncio.Task[Lookup]] = {}

    def __repr__(self) -> str:
        return f"<ModelDirectory {self.catalog!r} rounds={sorted(map(str, self._rounds))[:4]}>"

    @property
    def limits(self) -> DiscoveryLimits:
        return self.catalog.limits

    def lookup_nowait(self, key: ModelKey, ready: Collection[WorkerId]) -> Lookup | None:
        """The answer if it is known without asking a worker; None: :meth:`lookup` must ask."""
        decided = self.catalog.decide(key, ready, self._clock())
        return None if isinstance(decided, NeedsProbe) else decided

    async def lookup(self, key: ModelKey, ready: Collection[WorkerId]) -> Lookup:
        """Which of ``ready`` serve ``key``; asks them (coalesced, bounded) when unknown.
        Cancelling the caller does not cancel a round other callers share."""
        decided = self.catalog.decide(key, ready, self._clock())
        if not isinstance(decided, NeedsProbe):
            return decided
        task = self._rounds.get(key)
        if task is None:
            refused = self.catalog.admit_round(key, self._clock())
            if refused is not None:
                return refused
            task = self._start(key, frozenset(ready))
        return await asyncio.shield(task)

    def _start(self, key: ModelKey, ready: frozenset[WorkerId]) -> asyncio.Task[Lookup]:
        task = asyncio.get_running_loop().create_task(self._round(key, ready),
                                                      name=f"discover {key}")
        self._rounds[key] = task

        def done(t: asyncio.Task[Lookup]) -> None:
            self.catalog.round_finished()
            if self._rounds.get(key) is t:
                del self._rounds[key]
            if not t.cancelled() and t.exception() is not None:
                log.error("model lookup of %s failed", key, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def _round(self, key: ModelKey, ready: frozenset[WorkerId]) -> Lookup:
        decided = self.catalog.decide(key, ready, self._clock())
        if isinstance(decided, NeedsProbe) and decided.base_first:
            base = ModelKey(key.name)
            base_task = self._rounds.get(base)
            if base_task is None:
                self.catalog.begin_round()  # part of this admitted round
                base_task = self._start(base, ready)
            await asyncio.shield(base_task)
            decided = self.catalog.decide(key, ready, self._clock())
            if isinstance(decided, NeedsProbe) and decided.base_first:
                # The base was forgotten at once (LRU churn): do not loop.
                return NoWorkerReady(key, "probe_failed", self.limits.retry_after_s)
        if not isinstance(decided, NeedsProbe):
            return decided
        targets = decided.targets
        oks = await asyncio.gather(*(self._probe(w, key) for w in targets))
        answers = dict(zip(targets, oks, strict=True))
        facts = self.catalog.facts(key)
        if facts is None:
            first = next((w for w, ok in answers.items() if ok), None)
            if first is not None:
                facts = await self._read_facts(first, key)
        return self.catalog.record_round(key, answers, facts, self._clock())

    async def _probe(self, worker: WorkerId, key: ModelKey) -> bool | None:
        try:
            status, _ = await self._fetch(worker, "GET", model_path(key, "ready"),
                                          timeout_s=self.limits.probe_timeout_s)
        except (GatewayError, OSError):
            return None
        if status == 200:
            return True
        if status in (400, 404):  # Triton: 400 not ready / unknown; 404 no such path
            return False
        return None

    async def _read_facts(self, worker: WorkerId, key: ModelKey) -> ModelFacts | None:
        self.catalog.note_config_read()
        try:
            status, body = await self._fetch(worker, "GET", model_path(key, "config"),
                                             timeout_s=self.limits.probe_timeout_s)
            return model_facts(json.loads(body)) if status == 200 else None
        except (GatewayError, OSError, ValueError):
            return None

    # what the fleet calls -----------------------------------------------------------------
    def on_worker_models(self, worker: WorkerId, models_ready: Iterable[str]) -> None:
        self.catalog.on_worker_models(worker, models_ready)

    def forget_worker(self, worker: WorkerId) -> None:
        self.catalog.forget_worker(worker)

    async def refresh_worker(self, worker: WorkerId) -> None:
        """Re-check on ``worker`` what probes found (there or elsewhere), and read the
        configs not read yet. Bounded by ``max_refresh_keys`` each; call it from the fleet's
        model poll of a ready worker."""
        keys = self.catalog.refresh_plan(worker)
        oks = await asyncio.gather(*(self._probe(worker, k) for k in keys))
        answers = dict(zip(keys, oks, strict=True))
        self.catalog.record_refresh(worker, answers, {})
        missing = self.catalog.facts_missing(worker)
        read = await asyncio.gather(*(self._read_facts(worker, k) for k in missing))
        facts = {k: f for k, f in zip(missing, read, strict=True) if f is not None}
        self.catalog.record_refresh(worker, {}, facts)

    def statistics(self) -> DiscoveryStatistics:
        return self.catalog.statistics(self._clock())

    async def aclose(self) -> None:
        """Cancel the rounds still running (at shutdown)."""
        tasks = list(self._rounds.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
