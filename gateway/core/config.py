"""The gateway's configuration: one YAML file loaded once into frozen, typed objects.

``load_config(path)`` reads, expands ``${ENV}`` references, validates (unknown keys and
repeated keys are errors; every error names its dotted path and all of a file's errors are
reported together) and returns a :class:`GatewayConfig`. Defaults are the ``DEFAULT_*``
constants and the dataclasses' own defaults; the configuration reference (docs/configuration.md) is
generated from these classes (``gateway config-reference``).

Cross-field rules live in the ``__post_init__`` of the smallest dataclass that holds both
fields (``min_replicas <= max_replicas`` in :class:`CapacityConfig`, one key per tenant in
:class:`AdmissionConfig`). Credentials in URLs never show: secrets are :class:`Secret`, and
URL-shaped strings are masked by :func:`~gateway.core.schema.mask_url` in reprs, error messages
and :func:`describe_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from gateway.core.schema import (
    ConfigError,
    ConfigIssue,
    Secret,
    build,
    check,
    fraction,
    mask_url,
    non_negative,
    positive,
    raise_issues,
)

DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # Triton's own --http-max-input-size
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_TRITON_METRICS_PORT = 8002
DEFAULT_TRITON_GRPC_PORT = 8001
AUTO_SLOTS_FALLBACK = 64  # upstream.default_slots: auto, before the model configs are read


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


def opt(default: Any, doc: str, meta: dict[str, Any] | None = None) -> Any:
    return field(default=default, metadata=_doc(doc, **(meta or {})))


def sub(factory: Any, doc: str) -> Any:
    return field(default_factory=factory, metadata=_doc(doc))


def _is_url(value: str, schemes: tuple[str, ...], *, port_required: bool) -> bool:
    """Scheme among ``schemes``, a host, and a port in 1–65535 (required or optional)."""
    parts = urlsplit(value)  # raises ValueError on a bad IPv6 literal: a failed check
    port = parts.port  # raises ValueError when out of range
    if parts.scheme not in schemes or not parts.hostname:
        return False
    if port is None:
        return not port_required and not parts.netloc.endswith(":")
    return 1 <= port <= 65535


def url_check(*schemes: str, port_required: bool = True) -> dict[str, Any]:
    shown = "|".join(schemes)
    port = "host:port (port 1–65535)" if port_required else "host[:port] (port 1–65535)"
    return check(lambda v: _is_url(v, schemes, port_required=port_required),
                 f"a URL {shown}://{port}")


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _is_redis_url(secret: Secret) -> bool:
    value = secret.reveal()
    if value == "":
        return True  # unset: global limits use DEFAULT_REDIS_URL, replicas do not coordinate
    if urlsplit(value).scheme == "unix":
        return bool(urlsplit(value).path)
    return _is_url(value, ("redis", "rediss"), port_required=False)


def _is_host_port(value: str) -> bool:
    """``host:port`` with no scheme (gRPC's target form), port 1–65535."""
    if "/" in value or "@" in value:
        return False
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and port is not None and 1 <= port <= 65535


def port_number() -> dict[str, Any]:
    return check(lambda v: 1 <= v <= 65535, "a port number 1–65535")


def _masked_repr(obj: Any) -> str:
    """Dataclass repr with credentials in URL-shaped strings masked."""
    def shown(value: object) -> str:
        return repr(mask_url(value)) if isinstance(value, str) else repr(value)

    fields = ", ".join(f"{f.name}={shown(getattr(obj, f.name))}"
                       for f in dataclasses.fields(obj) if f.repr)
    return f"{type(obj).__name__}({fields})"


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = opt("127.0.0.1", "Address the gateway binds.")
    port: int = opt(DEFAULT_PORT, "Port the gateway binds (0 picks a free one).",
                    check(lambda v: 0 <= v <= 65535,
                          "a port number 1–65535, or 0 for any free port"))
    grpc_port: int | None = opt(None, "Port of the KServe v2 gRPC listener (Triton's "
                                "inference.GRPCInferenceService; 0 picks a free one); off "
                                "unless set.", check(lambda v: 0 <= v <= 65535,
                                                     "a port number 1–65535, or 0"))


@dataclass(frozen=True, slots=True)
class AdminListenConfig:
    port: int = field(metadata=_doc("Port of the admin listener (0 picks a free one).",
                                    **check(lambda v: 0 <= v <= 65535,
                                            "a port number 1–65535, or 0 for any free port")))
    host: str = opt("127.0.0.1", "Address the admin listener binds.")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: Secret = opt(Secret(""), "Bearer token for /admin/*; empty disables the admin API. "
                        "Use ${ENV_VAR}.")
    listen: AdminListenConfig | None = opt(
        None, "A separate listener for the gateway's own pages (/metrics, /status, "
        "/status.json, /admin/*); when set, the inference port answers 404 for them. Off "
        "unless set; a change needs a restart.")
    protect_status: bool = opt(False, "Require the admin token for /metrics, /status and "
                               "/status.json too (Authorization: Bearer <token>, or HTTP Basic "
                               "with the token as password); needs admin.token.")

    def __post_init__(self) -> None:
        if self.protect_status and not self.token.reveal():
            raise ConfigError("protect_status", "expected admin.token to be set: the pages "
                              "would be closed to everyone")


# Slow clients: the deadlines of HAProxy and nginx (and Apache's minimum body rate).
DEFAULT_HEADER_TIMEOUT_S = 10.0  # HAProxy's `timeout http-request`, as its manual suggests
DEFAULT_BODY_TIMEOUT_S = 60.0  # nginx's client_body_timeout
DEFAULT_BODY_GRACE_S = 20.0  # Apache mod_reqtimeout's body=20 ...
DEFAULT_BODY_MIN_RATE_BYTES_PER_S = 500  # ... and its MinRate=500
DEFAULT_SEND_TIMEOUT_S = 60.0  # nginx's send_timeout
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 75.0  # nginx's keepalive_timeout


@dataclass(frozen=True, slots=True)
class ClientsConfig:
    header_timeout_s: float = opt(
        DEFAULT_HEADER_TIMEOUT_S, "Longest a client may take over a request head: from the "
        "connection's opening for its first request, from the head's first byte for the "
        "next ones (HAProxy's `timeout http-request`). Then 408 in Triton's JSON and the "
        "connection closed; a connection that sent nothing at all is closed without an "
        "answer.", positive())
    body_timeout_s: float = opt(
        DEFAULT_BODY_TIMEOUT_S, "Longest wait for the next bytes of a request body the "
        "gateway is reading (nginx's client_body_timeout) → 408, connection closed.",
        positive())
    body_min_rate_bytes_per_s: int = opt(
        DEFAULT_BODY_MIN_RATE_BYTES_PER_S, "Slowest average rate a request body may arrive "
        "at: a body of B bytes so far may have taken body_grace_s + B / rate seconds since "
        "its head ended (Apache mod_reqtimeout's body=20,MinRate=500), else 408 and closed. "
        "Time the gateway itself is not reading (a full buffer, Expect: 100-continue not yet "
        "answered) does not count. 0: no rate check.", non_negative())
    body_grace_s: float = opt(DEFAULT_BODY_GRACE_S, "See body_min_rate_bytes_per_s.",
                              positive())
    send_timeout_s: float = opt(
        DEFAULT_SEND_TIMEOUT_S, "Longest a client may leave an answer unread while the "
        "gateway waits to write more of it (nginx's send_timeout); then the connection is "
        "closed.", positive())
    keep_alive_timeout_s: float = opt(DEFAULT_KEEP_ALIVE_TIMEOUT_S, "How long an idle "
                                      "keep-alive connection stays open (nginx's "
                                      "keepalive_timeout).", positive())
    max_connections: int | Literal["auto"] = opt(
        "auto", "Most client connections open at once, HTTP listeners together. A new one "
        "beyond it makes room by closing, in this order, the longest-idle keep-alive "
        "connection, the oldest connection that has sent nothing, the oldest request head or "
        "body still arriving (answered 503); with none of those it is answered 503 and "
        "closed. 'auto': three quarters of the open-file limit, the rest kept for the "
        "connections to workers, logs and files, so that accept() does not run out of file "
        "descriptors.", check(lambda v: v == "auto" or v > 0, "a number > 0 or 'auto'"))
    idle_high_water: float = opt(
        0.9, "Share of max_connections above which each new connection closes one idle "
        "keep-alive connection (longest idle first): idle ones give way before the limit is "
        "reached.", fraction())
    raise_open_file_limit: bool = opt(
        True, "At start, raise the open-file soft limit (RLIMIT_NOFILE) to the hard limit, "
        "as HAProxy does and nginx's worker_rlimit_nofile can.")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    url: str = field(metadata=_doc("Triton HTTP endpoint, http://host:port (port 1–65535).",
                                   **url_check("http")))
    metrics_url: str | None = opt(None, "Triton metrics endpoint, http://host[:port]/path; "
                                  "default same host, port 8002, path /metrics.",
                                  url_check("http", port_required=False))
    pool: str = opt("default", "Name of the pool this worker belongs to.")
    slots: int | None = opt(None, "Maximum in-flight requests the gateway sends to this worker; "
                            "default upstream.default_slots.", positive())
    name: str | None = opt(None, "Display name; default host:port.")
    grpc_url: str | None = opt(None, "Triton gRPC endpoint, host:port (no scheme); default "
                               "the worker's host, port 8001.",
                               check(_is_host_port, "a host:port address (port 1–65535)"))

    __repr__ = _masked_repr

    def resolved_grpc_url(self) -> str:
        if self.grpc_url:
            return self.grpc_url
        host = urlsplit(self.url).hostname or "127.0.0.1"
        return f"[{host}]:{DEFAULT_TRITON_GRPC_PORT}" if ":" in host else \
            f"{host}:{DEFAULT_TRITON_GRPC_PORT}"

    def resolved_metrics_url(self) -> str:
        if self.metrics_url:
            return self.metrics_url
        host = urlsplit(self.url).hostname or "127.0.0.1"
        return f"http://{host}:{DEFAULT_TRITON_METRICS_PORT}/metrics"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    dns_name: str = field(metadata=_doc("DNS name resolving to every worker (a Kubernetes "
                                        "headless service)."))
    port: int = opt(8000, "Triton HTTP port on each resolved address.", port_number())
    metrics_port: int = opt(DEFAULT_TRITON_METRICS_PORT, "Triton metrics port on each address.",
                            port_number())
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
        "auto", "Maximum in-flight requests per worker when workers[].slots is not set. "
        "'auto' (the default): learned from the worker's models — per model, its instances "
        "(instance_group; × max_batch_size when Triton's dynamic batcher is on) executing plus "
        "one request waiting per instance; the rest waits in the gateway's queue, where "
        f"priority, deadlines and batching apply. {AUTO_SLOTS_FALLBACK} until the configs are "
        "read. A number fixes it for every worker.",
        check(lambda v: v == "auto" or v > 0, "a number > 0 or 'auto'"))
    model_limits: Literal["adaptive", "static", "off"] = opt(
        "adaptive", "In-flight limit per (worker, model), where the worker's slots are learned "
        "(default_slots: auto, no workers[].slots): 'adaptive' (the default) starts from the "
        "model config's static figure (its execution units plus one waiting per instance) and "
        "adapts it online from latency against the unloaded latency (gradient limiter), never "
        "below the units nor above twice the static figure; 'static' keeps the config's figure; "
        "'off' limits only each worker's total.")
    max_body_bytes: int = opt(DEFAULT_MAX_BODY_BYTES, "Largest request body accepted (→ 413).",
                              positive())
    max_header_bytes: int = opt(DEFAULT_MAX_HEADER_BYTES, "Largest request header section "
                                "accepted, names and values together (→ 431).", positive())
    max_headers: int = opt(DEFAULT_MAX_HEADERS, "Most request header fields accepted (→ 431).",
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
    expected_latency: float = opt(8.0, "Weight of the expected-latency scorer: this request's "
                                  "expected completion time on the worker (work ahead over "
                                  "its capacity × its peak-EWMA service time for the model) "
                                  "against the best candidate's.", non_negative())


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
    max_delay_ms: float = opt(2.0, "How long a batch waits for more members while an "
                              "instance of the model is free.", non_negative())
    max_bytes: int = opt(16 * 1024 * 1024, "Byte cap of one merged request.", positive())
    flush_when_idle: bool = opt(True, "Send at once when nothing of the model is in flight "
                                "(no added latency at low load); otherwise gather for up "
                                "to max_delay_ms.")
    wait_for_instance: bool = opt(True, "While every instance of the model is busy, keep "
                                  "filling the batch until one frees (or the batch is full, "
                                  "or a member's deadline needs it sent); off: max_delay_ms "
                                  "from the first member only.")


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
    repeatable: bool = opt(True, "A request of this model may be sent again to another worker "
                           "when its worker broke off before answering (a reset or EOF "
                           "before the response head) or stalled (a hedge). false: never — "
                           "for a model whose requests have side effects. A request of a "
                           "sequence (sequence_id) or of a model with sequence_batching is "
                           "never repeated, whatever this says.")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    keys: tuple[Secret, ...] = field(default_factory=tuple, metadata=_doc(
        "API keys (Authorization: Bearer … or X-Api-Key) of this tenant; never empty or "
        "blank, no surrounding whitespace, and a key belongs to one tenant only."))
    priority: Literal["critical", "standard", "sheddable"] = opt(
        "standard", "Default priority class of the tenant's requests.")
    rate_limit: BucketConfig | None = opt(None, "Token bucket for this tenant.")
    gpu_rate_limit: BucketConfig | None = opt(
        None, "Token bucket in GPU-seconds: rate_per_s GPU-seconds per second, burst in "
        "GPU-seconds; a request takes its estimated GPU time (learned per model and batch "
        "size) before it is sent.")
    weight: float = opt(1.0, "Share of the GPU time this tenant gets under contention, "
                        "relative to the other tenants' weights (anonymous traffic: 1).",
                        check(lambda v: 0 < v <= 1e6, "a number in (0, 1000000]"))

    def __post_init__(self) -> None:
        issues = []
        for i, key in enumerate(self.keys):
            value = key.reveal()
            if not value.strip():
                issues.append(ConfigIssue(f"keys[{i}]", "expected a non-empty API key, got an "
                                          "empty or blank string (is its ${VARIABLE} set?)"))
            elif value != value.strip():
                issues.append(ConfigIssue(f"keys[{i}]", "expected an API key without leading "
                                          "or trailing whitespace (a header never matches it)"))
        raise_issues(issues)


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_length: int = opt(1024, "Requests waiting for a worker slot, at most.", positive())
    max_wait_s: float = opt(5.0, "Longest a request waits for a slot (→ 503).", positive())
    default_deadline_s: float = opt(30.0, "Deadline when the request names none "
                                    "(X-Request-Timeout-Ms or Triton's timeout parameter).",
                                    positive())
    shed_sheddable_at: float = opt(0.5, "Queue fill at which sheddable requests are refused.",
                                   fraction())
    shed_standard_at: float = opt(0.9, "Queue fill at which standard requests are refused; "
                                  "at least shed_sheddable_at.", fraction())
    order: Literal["fair", "fifo"] = opt("fair", "Order inside a priority class: fair "
                                         "(tenants' weighted share of GPU-seconds, start-time "
                                         "fair queuing) or fifo (arrival).")
    idle_credit_s: float = opt(0.0, "fair: virtual GPU-seconds a tenant back from idle may "
                               "start ahead of the others' queued work, at most (0: none; "
                               "more trades weighted shares for burst latency).",
                               non_negative())

    def __post_init__(self) -> None:
        if self.shed_sheddable_at > self.shed_standard_at:
            raise ConfigError("shed_sheddable_at", f"expected at most shed_standard_at "
                              f"({self.shed_standard_at}): sheddable requests are shed first, "
                              f"got {self.shed_sheddable_at}")


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
    max_open_s: float = opt(300.0, "Cap of the open interval; at least open_s.", positive())
    jitter: float = opt(0.2, "± fraction of jitter on the open interval.", fraction())
    half_open_probes: int = opt(3, "Requests let through while half-open; all must succeed.",
                                positive())
    max_ejected_fraction: float = opt(0.5, "At most this fraction of the fleet open at once.",
                                      fraction())
    slow_start_s: float = opt(10.0, "A new or recovered worker's traffic share ramps up over "
                              "this window.", non_negative())
    latency_outlier_factor: float | None = opt(None, "Eject a worker whose latency EWMA exceeds "
                                               "this × the fleet median (null: off).", positive())

    def __post_init__(self) -> None:
        if self.open_s > self.max_open_s:
            raise ConfigError("max_open_s", f"expected at least open_s ({self.open_s}), "
                              f"got {self.max_open_s}")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = opt(2, "Attempts per request, retries and hedges included (1 = no "
                            "retries, no hedges).", positive())
    budget_ratio: float = opt(0.2, "Retries allowed as a fraction of requests in the window.",
                              fraction())
    budget_min: int = opt(3, "Retries always allowed in a window.", non_negative())
    window_s: float = opt(10.0, "Retry-budget window.", positive())


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    enabled: bool = opt(True, "Send a request that is safe to repeat (models.<m>.repeatable) "
                        "again to another worker when its worker is stalled or it has waited "
                        "past its per-try timeout; the first answer wins, the other attempt "
                        "is cancelled. A hedge is an attempt (retry.max_attempts) and is "
                        "paid from the retry budget.")
    p99_factor: float = opt(3.0, "Per-try timeout: this × the model's recent p99 latency (from "
                            "send to response head), within [min_delay_s, max_delay_s].",
                            positive())
    min_delay_s: float = opt(0.1, "Shortest per-try timeout.", positive())
    max_delay_s: float = opt(5.0, "Longest per-try timeout; also the timeout while fewer than "
                             "min_samples latencies of the model are known. At least "
                             "min_delay_s.", positive())
    min_samples: int = opt(50, "Latencies of a model needed before its p99 sets the "
                           "per-try timeout.", positive())

    def __post_init__(self) -> None:
        if self.min_delay_s > self.max_delay_s:
            raise ConfigError("max_delay_s", f"expected at least min_delay_s "
                              f"({self.min_delay_s}), got {self.max_delay_s}")


@dataclass(frozen=True, slots=True)
class StallConfig:
    enabled: bool = opt(True, "Mark a worker stalled — no new requests — when it has requests "
                        "awaiting an answer and has answered none for service_times × its "
                        "learned service time while other workers answer; it takes traffic "
                        "again once it answers.")
    service_times: float = opt(4.0, "How many service times without an answer make a stall.",
                               positive())
    min_s: float = opt(0.2, "Shortest silence that counts as a stall.", positive())
    cold_s: float = opt(30.0, "The silence that counts as a stall while the worker's service "
                        "time for the models it runs is not known yet (nothing measured).",
                        positive())
    probe_after_s: float = opt(1.0, "A stalled worker gets one request again this long after "
                               "it stalled (and after each probe that went unanswered), to "
                               "find out whether it answers again.", positive())


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: Secret = opt(Secret(""), "Redis for global limits and for replicas that share one "
                      "fleet (redis://, rediss:// or unix://); use ${ENV_VAR} for passwords. "
                      "Set: every replica naming it shares the workers' budgets, fair share "
                      "and capacity signals through it (docs/scaling.md). Unset: global "
                      "limits use redis://127.0.0.1:6379/0 and replicas do not coordinate.",
                      check(_is_redis_url, "a redis://host[:port][/db], rediss://… or "
                            "unix:///path URL"))
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
    hedge: HedgeConfig = sub(HedgeConfig, "Hedged requests: a second attempt on another "
                             "worker for a request stuck on a stalled or slow one.")
    stall: StallConfig = sub(StallConfig, "Stalled workers: found from their silence, "
                             "given no new requests until they answer again.")
    redis: RedisConfig = sub(RedisConfig, "Redis for global limits.")

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}
        issues = []
        for name, tenant in self.tenants.items():
            for i, key in enumerate(tenant.keys):
                value = key.reveal()
                other = owner.setdefault(value, name)
                if other != name:
                    issues.append(ConfigIssue(f"tenants.{name}.keys[{i}]", "expected a key of "
                                              f"this tenant only; tenant {other!r} has it too"))
        raise_issues(issues)


@dataclass(frozen=True, slots=True)
class CapacityConfig:
    target_utilisation: float = opt(0.7, "Utilisation target (HPA formula, headroom).",
                                    check(lambda v: 0 < v <= 1, "a number in (0, 1]"))
    redundancy: int = opt(1, "N+k: spare replicas added to desired replicas.", non_negative())
    lead_time_s: float = opt(120.0, "Predictive horizon: the workers' warm-up time.", positive())
    history_step_s: float = opt(60.0, "Resolution of the arrival-rate history kept.", positive())
    history_max_points: int = opt(20160, "Bound on history points (default 14 days of minutes).",
                                  positive())
    min_replicas: int = opt(1, "Floor of desired replicas; at most max_replicas.",
                            non_negative())
    max_replicas: int = opt(1000, "Ceiling of desired replicas.", positive())
    time_scale: float = opt(1.0, "Capacity seconds per real second, for time-compressed "
                            "benchmarks (loadtest.autoscale): at 300 one real second counts "
                            "as five minutes, and history_step_s, lead_time_s and the daily "
                            "and weekly seasons are in those scaled seconds; the signals are "
                            "sampled every 1/time_scale s (at least 0.05 s) and the arrival "
                            "rate's and utilisation's half-lives shrink alike, to at least "
                            "1 real second each. Rates stay in real req/s. Leave 1.0 in "
                            "production. A change needs a restart.",
                            check(lambda v: 0 < v <= 10_000, "a number in (0, 10000]"))
    history_file: str | None = opt(None, "CSV of past demand loaded into the forecaster at "
                                   "start (each model's, when first seen), so the predictive "
                                   "signal has its seasons from the first minute: a header "
                                   "with time_s (Unix seconds, x time_scale) and rate (req/s), "
                                   "# comments allowed (the same reader as loadtest.replay "
                                   "--trace: gateway/core/series.py); resampled to "
                                   "history_step_s, the last row held up to now. A bad file "
                                   "stops the start. A change needs a restart.")

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ConfigError("min_replicas", f"expected at most max_replicas "
                              f"({self.max_replicas}), got {self.min_replicas}")


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = opt(False, "Write one JSON line per request: time, rid, tenant, model, "
                        "worker, status, latency_ms, queue_ms, reason.")
    path: str | None = opt(None, "File the lines are appended to; default the gateway's own "
                           "log (stderr), logger gateway.access.")
    success_sample: float = opt(1.0, "Share of successful requests written: 1.0 every one, "
                                "0.01 one in a hundred (every n-th, not random).", fraction())
    max_lines_per_s: int = opt(1000, "Lines per second, at most; beyond, requests are counted "
                               "and one summary line a second says how many were left out.",
                               positive())
    max_error_lines_per_s: int = opt(20, "Lines per second for refused, failed or abandoned "
                                     "requests, at most (a flood of bad requests must not "
                                     "flood the log); counted and summarised beyond.",
                                     positive())


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str | None = opt(None, "OpenTelemetry collector, http(s)://host[:port]: the "
                                    "gateway's spans go to its path /v1/traces (OTLP/HTTP, "
                                    "protobuf), e.g. http://collector:4318. Unset: tracing "
                                    "off. A change needs a restart.",
                                    url_check("http", "https", port_required=False))
    sample_ratio: float = opt(1.0, "Share of requests without a sampled parent that start a "
                              "sampled trace (parent-based: a client's sampled traceparent is "
                              "always followed, an unsampled one never).", fraction())

    __repr__ = _masked_repr


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    heartbeat_s: float = opt(0.25, "How often a replica publishes its demand and reads the "
                             "others' (Redis, or the parent process under --processes N).",
                             positive())
    lease_s: float = opt(1.5, "A replica that has not reported for this long stops counting; "
                         "its share goes to the others. At least 2 x heartbeat_s.", positive())

    def __post_init__(self) -> None:
        if self.lease_s < 2 * self.heartbeat_s:
            raise ConfigError("lease_s", "expected at least 2 x heartbeat_s "
                              f"({2 * self.heartbeat_s:g})")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: ListenConfig = sub(ListenConfig, "Where the gateway listens.")
    admin: AdminConfig = sub(AdminConfig, "The gateway's own pages: admin API (/admin/reload, "
                             "/admin/workers), where /metrics and /status listen, who reads them.")
    workers: tuple[WorkerConfig, ...] = sub(tuple, "Static worker list.")
    discovery: DiscoveryConfig | None = opt(None, "DNS discovery instead of (or beside) workers.")
    pools: tuple[PoolConfig, ...] = sub(tuple, "Pools and their priority; unnamed pools get 0.")
    models: dict[str, ModelConfig] = sub(dict, "Per-model settings; models not listed are "
                                         "still served when a worker has them.")
    batching: BatchingConfig = sub(BatchingConfig, "Gateway-side batching for every model "
                                   "without a batching section of its own under models.")
    health: HealthConfig = sub(HealthConfig, "Active health probes.")
    upstream: UpstreamConfig = sub(UpstreamConfig, "Connections to workers.")
    clients: ClientsConfig = sub(ClientsConfig, "Client connections: deadlines for slow "
                                 "clients, how many may be open, the open-file limit.")
    scrape: ScrapeConfig = sub(ScrapeConfig, "Triton metrics scraping.")
    routing: RoutingConfig = sub(RoutingConfig, "Routing policy.")
    admission: AdmissionConfig = sub(AdmissionConfig, "Rate limits, queueing, breakers, retries.")
    capacity: CapacityConfig = sub(CapacityConfig, "Capacity signals.")
    cluster: ClusterConfig = sub(ClusterConfig, "Replicas sharing one fleet: on when "
                                 "admission.redis.url is set or under serve --processes N.")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "Log level.")
    access_log: AccessLogConfig = sub(AccessLogConfig, "Access log: one JSON line per "
                                      "request, bounded (off by default).")
    tracing: TracingConfig = sub(TracingConfig, "OpenTelemetry traces of the gateway's "
                                 "requests, exported over OTLP/HTTP (off by default).")

    def __post_init__(self) -> None:
        issues = []
        admin_listen = self.admin.listen
        if admin_listen is not None and admin_listen.port and \
                admin_listen.port in (self.listen.port, self.listen.grpc_port):
            issues.append(ConfigIssue("admin.listen.port", "expected a port of its own, not "
                                      f"the inference listener's ({admin_listen.port})"))
        if not self.workers and self.discovery is None:
            issues.append(ConfigIssue("workers", "expected at least one worker, or a "
                                      "discovery section"))
        seen: set[str] = set()
        for i, w in enumerate(self.workers):
            if w.url in seen:
                issues.append(ConfigIssue(f"workers[{i}].url",
                                          f"duplicate worker {mask_url(w.url)}"))
            seen.add(w.url)
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            issues.append(ConfigIssue("pools", "pool names must be unique"))
        known = set(names) | {"default"}
        for i, w in enumerate(self.workers):
            if self.pools and w.pool not in known:
                issues.append(ConfigIssue(f"workers[{i}].pool", f"unknown pool {w.pool!r}; "
                                          f"declared: {', '.join(sorted(known))}"))
        raise_issues(issues)

    def pool_priority(self, pool: str) -> int:
        for p in self.pools:
            if p.name == pool:
                return p.priority
        return 0

    def model(self, name: str) -> ModelConfig:
        return self.models.get(name) or _default_model(self.batching)


_DEFAULT_MODELS: dict[BatchingConfig, ModelConfig] = {}


def _default_model(batching: BatchingConfig) -> ModelConfig:
    """The settings of a model not listed under ``models``: defaults, with the fleet-wide
    batching (one object per distinct batching section: reloads only ever make a few)."""
    model = _DEFAULT_MODELS.get(batching)
    if model is None:
        if len(_DEFAULT_MODELS) >= 16:
            _DEFAULT_MODELS.clear()
        model = _DEFAULT_MODELS[batching] = ModelConfig(batching=batching)
    return model


def _with_fleet_batching(cfg: GatewayConfig, data: object) -> GatewayConfig:
    """A model listed under ``models`` without a ``batching`` section of its own gets the
    top-level one (an explicit section, even ``{enabled: false}``, stands)."""
    if not isinstance(data, dict) or "batching" not in data or not cfg.models:
        return cfg
    raw = data.get("models")
    raw_models = raw if isinstance(raw, dict) else {}
    models = {name: m if isinstance(raw_models.get(name), dict)
              and "batching" in raw_models[name] else replace(m, batching=cfg.batching)
              for name, m in cfg.models.items()}
    return replace(cfg, models=models)


def parse_config(data: object, env: dict[str, str] | None = None) -> GatewayConfig:
    return _with_fleet_batching(build(GatewayConfig, data, "", env), data)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: plain
    PyYAML keeps the last value silently, so the setting an operator reads first in the file
    would not be the one in force."""

    refuse_duplicates = True

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if self.refuse_duplicates:
            for issue in duplicate_keys(node, recurse=False):
                raise yaml.constructor.ConstructorError(None, None, issue.problem,
                                                        node.start_mark)
        return super().construct_mapping(node, deep=deep)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def duplicate_keys(node: yaml.Node, path: str = "", *, recurse: bool = True,
                   _open: frozenset[int] = frozenset()) -> list[ConfigIssue]:
    """Every key repeated within one mapping under ``node``, with its dotted path and lines."""
    if id(node) in _open:  # a recursive alias
        return []
    inside = _open | {id(node)}
    issues: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            where = (f"{path}.{key}" if path else str(key)) if key is not None else path
            if key is not None and key_node.tag != _MERGE_TAG:
                line = key_node.start_mark.line + 1
                seen = first_line.get((key_node.tag, key))
                if seen is None:
                    first_line[(key_node.tag, key)] = line
                else:
                    issues.append(ConfigIssue(where, f"duplicate key {key!r} at line {line} "
                                              f"(first at line {seen}); a key may appear "
                                              "once per mapping"))
            if recurse:
                issues += duplicate_keys(value_node, where, _open=inside)
    elif isinstance(node, yaml.SequenceNode) and recurse:
        for i, item in enumerate(node.value):
            issues += duplicate_keys(item, f"{path}[{i}]", _open=inside)
    return issues


def load_config(path: str | Path, env: dict[str, str] | None = None) -> GatewayConfig:
    """Read and validate a YAML file; raises ConfigError listing every problem of the file,
    each with the dotted path of the bad key."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError("", f"cannot read {path}: {reason}") from None
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        repeated = duplicate_keys(node) if node is not None else []
        # Found above with their paths; reported with the schema's problems, not one by one.
        loader.refuse_duplicates = False
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()
    try:
        cfg = parse_config(data, env)
    except ConfigError as exc:
        raise ConfigError.of([*repeated, *exc.errors]) from None
    raise_issues(repeated)
    return cfg


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
        if isinstance(value, str):
            return mask_url(value)
        return value

    result: dict[str, Any] = plain(cfg)
    return result
