"""KServe v2 / Triton HTTP endpoints: which path is which, as a pure function.

``classify(method, path)`` returns an :class:`Endpoint` (kind, model, version, action) or an
error kind. The proxy decides what to do per kind; nothing here does I/O.

Rules (Triton's own): the version segment is digits only; an unknown path is 404
``{"error":"Not Found"}``; a known path with the wrong method is 405.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    SERVER_METADATA = "server_metadata"
    HEALTH_LIVE = "health_live"
    HEALTH_READY = "health_ready"
    MODEL_METADATA = "model_metadata"
    MODEL_READY = "model_ready"
    MODEL_CONFIG = "model_config"
    MODEL_STATS = "model_stats"
    INFER = "infer"
    GENERATE = "generate"
    GENERATE_STREAM = "generate_stream"
    REPOSITORY_INDEX = "repository_index"
    REPOSITORY_CONTROL = "repository_control"   # .../models/{m}/load|unload
    SHARED_MEMORY = "shared_memory"
    TRACE_LOGGING = "trace_logging"
    GATEWAY = "gateway"                         # /metrics, /status, /admin/...
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: Kind
    model: str = ""
    version: str = ""
    action: str = ""  # load/unload, or the gateway's own path


_MODEL_ACTIONS: dict[str, tuple[Kind, str]] = {
    "": (Kind.MODEL_METADATA, "GET"),
    "ready": (Kind.MODEL_READY, "GET"),
    "config": (Kind.MODEL_CONFIG, "GET"),
    "stats": (Kind.MODEL_STATS, "GET"),
    "infer": (Kind.INFER, "POST"),
    "generate": (Kind.GENERATE, "POST"),
    "generate_stream": (Kind.GENERATE_STREAM, "POST"),
}

_FIXED: dict[str, tuple[Kind, str]] = {
    "/v2": (Kind.SERVER_METADATA, "GET"),
    "/v2/health/live": (Kind.HEALTH_LIVE, "GET"),
    "/v2/health/ready": (Kind.HEALTH_READY, "GET"),
    "/v2/models/stats": (Kind.MODEL_STATS, "GET"),
    "/v2/repository/index": (Kind.REPOSITORY_INDEX, "POST"),
}

GATEWAY_PATHS = frozenset({"/metrics", "/status", "/status.json", "/admin/reload",
                           "/admin/workers"})

NOT_FOUND = Endpoint(Kind.NOT_FOUND)
METHOD_NOT_ALLOWED = Endpoint(Kind.METHOD_NOT_ALLOWED)


def _check(kind: Kind, want: str, method: str, **kw: str) -> Endpoint:
    if method == want or (want == "GET" and method == "HEAD"):
        return Endpoint(kind, **kw)
    return METHOD_NOT_ALLOWED


# classify() remembers its answers for the paths it meets most (a fleet's few models), up to
# a bound: a client sending endless new paths only empties the memo now and then.
_MEMO: dict[tuple[str, str], Endpoint] = {}
_MEMO_MAX = 1024


def classify(method: str, path: str) -> Endpoint:
    """What ``method path`` asks for (see :func:`_classify`), remembered."""
    key = (method, path)
    found = _MEMO.get(key)
    if found is None:
        found = _classify(method, path)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = found
    return found


def _classify(method: str, path: str) -> Endpoint:
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    fixed = _FIXED.get(path)
    if fixed is not None:
        return _check(fixed[0], fixed[1], method)
    if path in GATEWAY_PATHS:
        return Endpoint(Kind.GATEWAY, action=path)
    parts = path.split("/")
    # ['', 'v2', ...]
    if len(parts) < 3 or parts[0] != "" or parts[1] != "v2":
        return NOT_FOUND
    if parts[2] in ("systemsharedmemory", "cudasharedmemory"):
        return Endpoint(Kind.SHARED_MEMORY)
    if parts[2] in ("trace", "logging"):
        return Endpoint(Kind.TRACE_LOGGING)
    if parts[2] == "repository":
        # /v2/repository/models/{m}/load|unload
        if len(parts) == 6 and parts[3] == "models" and parts[5] in ("load", "unload") and parts[4]:
            return _check(Kind.REPOSITORY_CONTROL, "POST", method, model=parts[4],
                          action=parts[5])
        return NOT_FOUND
    if parts[2] != "models" or len(parts) < 4 or not parts[3]:
        return NOT_FOUND
    model = parts[3]
    rest = parts[4:]
    version = ""
    if len(rest) >= 2 and rest[0] == "versions":
        version = rest[1]
        if not version.isdigit():
            return NOT_FOUND
        rest = rest[2:]
    if len(rest) > 1:
        return NOT_FOUND
    action = rest[0] if rest else ""
    spec = _MODEL_ACTIONS.get(action)
    if spec is None:
        return NOT_FOUND
    return _check(spec[0], spec[1], method, model=model, version=version)


def model_target(model: str, version: str, suffix: str) -> str:
    base = f"/v2/models/{model}"
    if version:
        base += f"/versions/{version}"
    return f"{base}/{suffix}" if suffix else base
