"""The gateway's configuration: one YAML file loaded once into frozen, typed objects.

``load_config(path)`` reads, expands ``${ENV}`` references, validates (unknown keys are
errors, every error names its dotted path) and returns a :class:`GatewayConfig`.
Defaults are the ``DEFAULT_*`` constants and the dataclasses' own defaults; the README's
configuration reference is generated from these classes (``gateway config-reference``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.schema import ConfigError, Secret, build, check, fraction, non_negative, positive

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # Triton's own --http-max-input-size
DEFAULT_TRITON_METRICS_PORT = 8002
AUTO_SLOTS_FALLBACK = 64  # upstream.default_slots: auto, before the model configs are read


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


def opt(default: Any, doc: str, meta: dict[str, Any] | None = None) -> Any:
    return field(default=default, metadata=_doc(doc, **(meta or {})))


def sub(factory: Any, doc: str) -> Any:
    return field(default_factory=factory, metadata=_doc(doc))


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme == "http" and bool(parts.hostname) and parts.port is not None


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = opt("127.0.0.1", "Address the gateway binds.")
    port: int = opt(DEFAULT_PORT, "Port the gateway binds (0 picks a free one).",
                    check(lambda v: 0 <= v < 65536, "a port number"))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: Secret = opt(Secret(""), "Bearer token for /admin/*; empty disables the admin API. "
                        "Use ${ENV_VAR}.")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    url: str = field(metadata=_doc("Triton HTTP endpoint, http://host:port.",
                                   check=(_is_http_url, "an http://host:port URL")))
    metrics_url: str | None = opt(None, "Triton metrics endpoint; default same host, port 8002, "
                                  "path /metrics.")
    pool: str = opt("default", "Name of the pool this worker belongs to.")
    slots: int | None = opt(None, "Maximum in-flight requests the gateway sends to this worker; "
                            "default upstream.default_slots.", positive())
    name: str | None = opt(None, "Display name; default host:port.")

    def resolved_metrics_url(self) -> str:
        if self.metrics_url:
            return self.metrics_url
        host = urlsplit(self.url).hostname or "127.0.0.1"
        return f"http://{host}:{DEFAULT_TRITON_METRICS_PORT}/metrics"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    dns_name: str = field(metadata=_doc("DNS name resolving to every worker (a Kubernetes "
                                        "headless service)."))
    port: int = opt(8000, "Triton HTTP port on each resolved address.")
    metrics_port: int = opt(DEFAULT_TRITON_METRICS_PORT, "Triton metrics port on each address.")
    interval_s: float = opt(10.0, "How often the name is re-resolved.", positive())
    pool: str = opt("default", "Pool the discovered workers join.")
    max_workers: int = opt(1024, "Bound on the number of discovered addresses kept.", positive())


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str = field(metadata=_doc("Pool name, referenced by workers[].pool."))
    priority: int = opt(0, "Lower is preferred; traffic spills to the next priority only while "
                        "every worker of the preferred pools is saturated.")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = opt(1.0, "Active health-probe interval per worker.", positive())
    timeout_s: float = opt(1.0, "Probe timeout.", positive())
    rise: int = opt(2, "Consecutive successful probes before a worker is ready.", positive())
    fall: int = opt(2, "Consecutive failed probes before a worker is marked down.", positive())


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = opt(2.0, "TCP connect timeout to a worker (→ 502).", positive())
    read_timeout_s: float = opt(60.0, "Time allowed for a worker's response (→ 504).", positive())
    max_connections_per_worker: int = opt(64, "Keep-alive pool bound per worker.", positive())
    default_slots: int | Literal["auto"] = opt(
        64, "Maximum in-flight requests per worker when workers[].slots is not set. 'auto': "
        "derived from the worker's models — 2 × the model instances Triton reports in their "
        "instance_group (one executing, one waiting per instance), at least 2; "
        f"{AUTO_SLOTS_FALLBACK} until the configs are read.",
        check(lambda v: v == "auto" or v > 0, "a number > 0 or 'auto'"))
    max_body_bytes: int = opt(DEFAULT_MAX_BODY_BYTES, "Largest request body accepted (→ 413).",
                              positive())
    drain_timeout_s: float = opt(30.0, "On SIGTERM, how long in-flight requests may finish.",
                                 non_negative())


@dataclass(frozen=True, slots=True)
class ScrapeConfig:
    enabled: bool = opt(True, "Scrape each worker's Triton metrics endpoint.")
    interval_s: float = opt(1.0, "Scrape interval.", positive())
    timeout_s: float = opt(0.5, "Scrape timeout.", positive())
    stale_after_s: float = opt(5.0, "Signals older than this are stale (scorers go neutral).",
                               positive())
    max_concurrency: int = opt(64, "Scrapes in flight at once.", positive())


@dataclass(frozen=True, slots=True)
class WeightsConfig:
    memory: float = opt(1.0, "Weight of the free-GPU-memory scorer.", non_negative())
    queue: float = opt(2.0, "Weight of the queue scorer (pending + in-flight vs slots).",
                       non_negative())
    latency: float = opt(0.0, "Weight of the latency-EWMA scorer.", non_negative())


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: Literal["load_aware", "round_robin", "random", "least_inflight"] = opt(
        "load_aware", "Routing policy; the last three are baselines for comparison.")
    picker: Literal["p2c", "full_scan"] = opt("p2c", "Best of k random candidates, or all.")
    choices: int = opt(2, "k for the p2c picker.", positive())
    weights: WeightsConfig = sub(WeightsConfig, "Scorer weights (overridable per model).")
    saturation_queue: float = opt(1.0, "A worker whose (pending + in-flight) / slots reaches "
                                  "this is saturated (pool spill-over).", positive())
    pack: bool = opt(False, "Fragmentation-aware placement: prefer workers already busy with "
                     "the model while they have room, so each GPU forms full batches.")


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    enabled: bool = opt(False, "Group concurrent small infer requests into one batch.")
    max_batch_size: int | None = opt(None, "Batch limit; default the model's max_batch_size.",
                                     positive())
    max_delay_ms: float = opt(2.0, "How long the first request of a batch waits for others.",
                              non_negative())
    max_bytes: int = opt(16 * 1024 * 1024, "Byte cap of one merged request.", positive())
    flush_when_idle: bool = opt(True, "Send at once when no batch of the model is in flight "
                                "(no added latency at low load); otherwise gather for up "
                                "to max_delay_ms.")


@dataclass(frozen=True, slots=True)
class BucketConfig:
    rate_per_s: float = field(metadata=_doc("Sustained rate (tokens per second).",
                                            **positive()))
    burst: float | None = opt(None, "Bucket size; default = rate_per_s (one second's worth).",
                              positive())
    scope: Literal["local", "global"] = opt("local", "local: per gateway process "
                                            "(aiolimiter); global: shared in Redis.")
    max_wait_s: float = opt(0.0, "Wait up to this long for a token instead of 429.",
                            non_negative())
    on_redis_error: Literal["open", "closed"] = opt("open", "Global limits when Redis is slow "
                                                    "or down: admit (open) or reject (closed).")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    memory_bytes_per_request: int | None = opt(None, "GPU memory one request needs; workers "
                                               "with less free are filtered out. Default: "
                                               "learned from observation.", positive())
    weights: WeightsConfig | None = opt(None, "Scorer weights for this model.")
    batching: BatchingConfig = sub(BatchingConfig, "Gateway-side batching.")
    rate_limit: BucketConfig | None = opt(None, "Token bucket for this model.")
    cost: Literal["request", "batch_size"] = opt("request", "Tokens a request costs.")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    keys: tuple[Secret, ...] = field(default_factory=tuple, metadata=_doc(
        "API keys (Authorization: Bearer … or X-Api-Key) of this tenant."))
    priority: Literal["critical", "standard", "sheddable"] = opt(
        "standard", "Default priority class of the tenant's requests.")
    rate_limit: BucketConfig | None = opt(None, "Token bucket for this tenant.")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_length: int = opt(1024, "Requests waiting for a worker slot, at most.", positive())
    max_wait_s: float = opt(5.0, "Longest a request waits for a slot (→ 503).", positive())
    default_deadline_s: float = opt(30.0, "Deadline when the request names none "
                                    "(X-Request-Timeout-Ms or Triton's timeout parameter).",
                                    positive())
    shed_sheddable_at: float = opt(0.5, "Queue fill at which sheddable requests are refused.",
                                   fraction())
    shed_standard_at: float = opt(0.9, "Queue fill at which standard requests are refused.",
                                  fraction())


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    enabled: bool = opt(False, "Adaptive (gradient) concurrency limit per worker.")
    min_limit: int = opt(1, "Lower bound of the adaptive limit.", positive())
    smoothing: float = opt(0.2, "EWMA factor for sample RTT.", fraction())
    tolerance: float = opt(1.5, "RTT ratio tolerated before the limit shrinks.", positive())


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    enabled: bool = opt(True, "Circuit breaker per worker.")
    consecutive_failures: int = opt(5, "Consecutive failures that open the breaker.", positive())
    error_rate: float = opt(0.5, "Failure ratio over the window that opens the breaker.",
                            fraction())
    window_s: float = opt(10.0, "Window for the error-rate rule.", positive())
    min_requests: int = opt(20, "Minimum volume in the window before the rate rule applies.",
                            positive())
    open_s: float = opt(5.0, "First open interval; doubles each consecutive opening.",
                        positive())
    max_open_s: float = opt(300.0, "Cap of the open interval.", positive())
    jitter: float = opt(0.2, "± fraction of jitter on the open interval.", fraction())
    half_open_probes: int = opt(3, "Requests let through while half-open; all must succeed.",
                                positive())
    max_ejected_fraction: float = opt(0.5, "At most this fraction of the fleet open at once.",
                                      fraction())
    slow_start_s: float = opt(10.0, "A new or recovered worker's traffic share ramps up over "
                              "this window.", non_negative())
    latency_outlier_factor: float | None = opt(None, "Eject a worker whose latency EWMA exceeds "
                                               "this × the fleet median (null: off).", positive())


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = opt(2, "Attempts per request (1 = no retries).", positive())
    budget_ratio: float = opt(0.2, "Retries allowed as a fraction of requests in the window.",
                              fraction())
    budget_min: int = opt(3, "Retries always allowed in a window.", non_negative())
    window_s: float = opt(10.0, "Retry-budget window.", positive())


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: Secret = opt(Secret("redis://127.0.0.1:6379/0"), "Redis for global limits; "
                      "use ${ENV_VAR} for passwords.")
    timeout_s: float = opt(0.02, "Per-call timeout before the limit's on_redis_error applies.",
                           positive())
    key_prefix: str = opt("gateway:", "Prefix of every Redis key.")
    breaker_failures: int = opt(3, "Consecutive Redis failures that stop calling it for a while.",
                                positive())
    breaker_open_s: float = opt(2.0, "How long Redis is skipped after that.", positive())


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    require_api_key: bool = opt(False, "Reject requests without a known API key (401).")
    tenants: dict[str, TenantConfig] = sub(dict, "Tenants by name.")
    global_limit: BucketConfig | None = opt(None, "Token bucket over all inference traffic.")
    queue: QueueConfig = sub(QueueConfig, "Bounded wait for a worker slot.")
    adaptive: AdaptiveConfig = sub(AdaptiveConfig, "Adaptive concurrency limit.")
    breaker: BreakerConfig = sub(BreakerConfig, "Circuit breakers and slow start.")
    retry: RetryConfig = sub(RetryConfig, "Retries to another worker.")
    redis: RedisConfig = sub(RedisConfig, "Redis for global limits.")


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    target_utilisation: float = opt(0.7, "Utilisation target (HPA formula, headroom).",
                                    check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    redundancy: int = opt(1, "N+k: spare replicas added to desired replicas.", non_negative())
    lead_time_s: float = opt(120.0, "Predictive horizon: the workers' warm-up time.", positive())
    history_step_s: float = opt(60.0, "Resolution of the arrival-rate history kept.", positive())
    history_max_points: int = opt(20160, "Bound on history points (default 14 days of minutes).",
                                  positive())
    min_replicas: int = opt(1, "Floor of desired replicas.", non_negative())
    max_replicas: int = opt(1000, "Ceiling of desired replicas.", positive())


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: ListenConfig = sub(ListenConfig, "Where the gateway listens.")
    admin: AdminConfig = sub(AdminConfig, "Admin API (/admin/reload, /admin/workers).")
    workers: tuple[WorkerConfig, ...] = sub(tuple, "Static worker list.")
    discovery: DiscoveryConfig | None = opt(None, "DNS discovery instead of (or beside) workers.")
    pools: tuple[PoolConfig, ...] = sub(tuple, "Pools and their priority; unnamed pools get 0.")
    models: dict[str, ModelConfig] = sub(dict, "Per-model settings; models not listed are "
                                         "still served when a worker has them.")
    health: HealthConfig = sub(HealthConfig, "Active health probes.")
    upstream: UpstreamConfig = sub(UpstreamConfig, "Connections to workers.")
    scrape: ScrapeConfig = sub(ScrapeConfig, "Triton metrics scraping.")
    routing: RoutingConfig = sub(RoutingConfig, "Routing policy.")
    admission: AdmissionConfig = sub(AdmissionConfig, "Rate limits, queueing, breakers, retries.")
    capacity: CapacityConfig = sub(CapacityConfig, "Capacity signals.")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "Log level.")

    def __post_init__(self) -> None:
        if not self.workers and self.discovery is None:
            raise ConfigError("workers", "expected at least one worker, or a discovery section")
        seen: set[str] = set()
        for i, w in enumerate(self.workers):
            if w.url in seen:
                raise ConfigError(f"workers[{i}].url", f"duplicate worker {w.url}")
            seen.add(w.url)
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError("pools", "pool names must be unique")
        known = set(names) | {"default"}
        for i, w in enumerate(self.workers):
            if self.pools and w.pool not in known:
                raise ConfigError(f"workers[{i}].pool", f"unknown pool {w.pool!r}; "
                                  f"declared: {', '.join(sorted(known))}")

    def pool_priority(self, pool: str) -> int:
        for p in self.pools:
            if p.name == pool:
                return p.priority
        return 0

    def model(self, name: str) -> ModelConfig:
        return self.models.get(name) or _DEFAULT_MODEL


_DEFAULT_MODEL = ModelConfig()


def parse_config(data: object, env: dict[str, str] | None = None) -> GatewayConfig:
    return build(GatewayConfig, data, "", env)


def load_config(path: str | Path, env: dict[str, str] | None = None) -> GatewayConfig:
    """Read and validate a YAML file; raises ConfigError with the dotted path of the bad key."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, env)


def describe_config(cfg: GatewayConfig) -> dict[str, Any]:
    """The effective configuration as plain data, secrets masked (for check-config)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Secret):
            return "***" if value else ""
        return value

    result: dict[str, Any] = plain(cfg)
    return result
