"""The gateway's own pages, as a Starlette app (the only module importing Starlette):
``/metrics`` (Prometheus), ``/status`` (HTML), ``/status.json``, ``/admin/reload`` and
``/admin/workers`` (bearer token from ``admin.token``; disabled when no token is set).

Who may read what:

* ``/admin/*`` needs the admin token, always;
* ``/metrics``, ``/status`` and ``/status.json`` are open unless ``admin.protect_status``,
  then they need the token too (``Authorization: Bearer <token>``, or HTTP Basic with the
  token as password, so that a browser can open the status page);
* ``/status.json`` names tenants (limit rows, recent rejections) only to a request that
  carries the admin token; others read ``tenant:(hidden)``.

Where: on the inference port (the proxy hands these paths over), or, with ``admin.listen``,
only on a listener of their own (``gateway.server``), the inference port then answering
:data:`not_here` — Triton's 404 JSON.

None of these queue behind inference traffic: they read snapshots and answer at once.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gateway import __version__
from gateway.core import routing
from gateway.ops.telemetry import CONTENT_TYPE, Telemetry

if TYPE_CHECKING:
    from gateway.core.types import WorkerSignals
    from gateway.fleet.workers import Worker
    from gateway.ops.state import GatewayState


HIDDEN = "(hidden)"
TENANT_PREFIX = "tenant:"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# The inference port's answer for the gateway's pages when they listen elsewhere.
not_here = _error(404, "Not Found")


def presented_token(authorization: str) -> str | None:
    """The token in an ``Authorization`` header: Bearer, or the password of HTTP Basic."""
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def is_admin(svc: GatewayState, authorization: str) -> bool:
    """Does the header carry the admin token? Never, when no token is configured."""
    token = svc.cfg.admin.token.reveal()
    got = presented_token(authorization)
    return bool(token) and got is not None and hmac.compare_digest(got.encode(),
                                                                   token.encode())


def redact_tenants(doc: dict[str, Any]) -> dict[str, Any]:
    """``status_document`` for someone who is not the admin: tenant names hidden."""
    limits = [dict(row, name=TENANT_PREFIX + HIDDEN)
              if str(row.get("name", "")).startswith(TENANT_PREFIX) else row
              for row in doc["limits"]]
    rejections = [dict(r, tenant=HIDDEN) if r.get("tenant") else r
                  for r in doc["rejections"]]
    fair = doc.get("fair_share")
    if isinstance(fair, dict):
        fair = {**fair, "tenants": [dict(row, tenant=HIDDEN) for row in fair["tenants"]]}
    return {**doc, "limits": limits, "rejections": rejections, "fair_share": fair}


def status_document(svc: GatewayState, t: Telemetry) -> dict[str, Any]:
    """The data behind /status (and /status.json); shape documented in docs/operations.md."""
    now = svc.clock()
    view = t.fleet_view(now)
    board = svc.breakers
    stale = svc.cfg.scrape.stale_after_s
    workers = []
    breakers = board.statistics(now).workers
    by_worker: dict[str, dict[str, dict[str, object]]] = {}
    for m in svc.model_limits():
        by_worker.setdefault(m.worker, {})[m.model] = {
            "limit": m.limit, "units": m.units, "static": m.static,
            "adaptive": m.adaptive, "probing": m.probing,
            "min_latency_ms": m.min_rtt_s * 1000 if m.min_rtt_s is not None else None,
            "latency_ms": m.smoothed_rtt_s * 1000 if m.smoothed_rtt_s is not None else None}
    cluster = svc.cluster()
    shared: dict[tuple[str, str], int] = {}
    if cluster is not None:
        units = cluster.get("units")
        if isinstance(units, dict):
            shared = {(str(wid), str(m)): int(n) for wid, per in units.items()
                      if isinstance(per, dict) for m, n in per.items()}
    for w in svc.workers():
        sig = w.signals
        fresh = w.fresh_signals(now, stale)
        breaker = board.state(w.id, now).value if w.id in board else "closed"
        workers.append({
            "id": w.id,
            "pool": w.pool_name,
            "state": w.state.value,
            "ready": w.is_routable,
            "breaker": breaker,
            "breaker_opened_total": breakers[w.id].opened_total if w.id in breakers else 0,
            "traffic_share": breakers[w.id].traffic_share if w.id in breakers else 1.0,
            # silent while the others answer (gateway.core.stall): serving|stalled|probing
            "stall": svc.stall_state(w.id),
            "stalled": svc.stall_state(w.id) != "serving",
            "name": w.name,
            "score": _display_score(svc, w, fresh) if w.is_routable else None,
            "in_flight": w.in_flight,
            "slots": w.slots,
            # learned from the worker's model configs unless the YAML sets slots
            "slots_source": ("configured" if w.configured_slots is not None else
                             "learned" if w.derived_slots is not None else "default"),
            "capacity_units": w.capacity_units,
            # per model: its learned in-flight limit here (gateway.core.concurrency)
            "model_limits": {name: {**entry, "in_flight": w.in_flight_by_model.get(name, 0),
                                    "share": shared.get((w.id, name))}
                             for name, entry in by_worker.get(w.id, {}).items()},
            "pending": fresh.pending() if fresh else None,
            "gpu_free_bytes": fresh.free_memory_bytes if fresh and fresh.has_gpu else None,
            "gpu_total_bytes": fresh.total_memory_bytes if fresh and fresh.has_gpu else None,
            "gpu_utilisation": fresh.gpu_utilisation if fresh and fresh.has_gpu else None,
            "latency_ms": w.latency_ewma_s * 1000 if w.latency_ewma_s else None,
            "signals_age_s": (now - sig.scraped_at) if sig else None,
            "models": sorted(m for m in w.models_ready if "/" not in m),
        })
    counters = t.requests
    totals = {"requests": 0, "ok": 0, "rejected": 0, "errors": 0}
    for metric in counters.collect():
        for sample in metric.samples:
            if not sample.name.endswith("_total"):
                continue
            n = int(sample.value)
            totals["requests"] += n
            outcome = sample.labels.get("outcome")
            if outcome == "ok":
                totals["ok"] += n
            elif outcome == "rejected":
                totals["rejected"] += n
            else:
                totals["errors"] += n
    return {
        "gateway": {"version": __version__, "uptime_s": time.time() - svc.started_at,
                    "config_generation": svc.generation,
                    "event_loop_lag_s": svc.loop_lag_s(),
                    "event_loop_worst_lag_s": svc.loop_lag_worst_s()},
        "fleet": {
            "utilisation": view["utilisation"],
            "headroom": view["headroom"],
            "saturation": view["saturation"],
            "arrival_rate_per_s": view["arrival_rate_per_s"],
            "desired_replicas": {"reactive": view["desired_reactive"],
                                 "predictive": view["desired_predictive"]},
            "workers_ready": sum(1 for w in svc.workers() if w.is_routable),
            "workers_total": sum(1 for _ in svc.workers()),
            "queue_length": svc.queue_length,
        },
        "counters": totals,
        # replicas as one: this replica's share of the fleet (null: a gateway alone)
        "cluster": svc.cluster(),
        "dispatch": svc.dispatch_statistics(),
        "fair_share": _fair_share_document(svc),
        "workers": workers,
        "limits": svc.limits_description(),
        "rejections": list(t.recent_rejections)[::-1],
    }


def _fair_share_document(svc: GatewayState) -> dict[str, Any]:
    fair = svc.fair_share()
    return {
        "order": svc.cfg.admission.queue.order,
        "jain_index": fair.jain_index,
        "tenants": [{"tenant": ts.tenant, "weight": ts.weight, "gpu_s": ts.gpu_s,
                     "share": ts.share, "requests": ts.requests,
                     "mean_queue_ms": ts.mean_queue_s * 1000} for ts in fair.tenants],
    }


def _display_score(svc: GatewayState, w: Worker, sig: WorkerSignals | None) -> float:
    """The worker's load-aware score as the router would weigh it now (default weights;
    latency neutral), in [0, 1], 1 best — for people reading the status page."""
    weights = routing.normalised_weights(svc.cfg.routing.weights)
    pending = sig.pending() if sig is not None else 0.0
    return round(routing.combined_score(
        weights, routing.memory_score(sig),
        routing.queue_score(pending, w.in_flight, w.slots), routing.NEUTRAL_SCORE), 3)


ReloadFn = Callable[[], tuple[bool, str]]


def build_admin_app(svc: GatewayState, telemetry: Telemetry, reload_config: ReloadFn
                    ) -> Starlette:
    def authorised(request: Request) -> Response | None:
        if not svc.cfg.admin.token.reveal():
            return _error(404, "admin API disabled: set admin.token in the configuration")
        if not is_admin(svc, request.headers.get("authorization", "")):
            return _error(401, "missing or wrong admin token",
                          {"www-authenticate": 'Basic realm="gateway", charset="UTF-8"'})
        return None

    def page_denied(request: Request) -> Response | None:
        return authorised(request) if svc.cfg.admin.protect_status else None

    async def metrics(request: Request) -> Response:
        denied = page_denied(request)
        if denied is not None:
            return denied
        return Response(telemetry.exposition(), media_type=CONTENT_TYPE)

    async def status_html(request: Request) -> Response:
        denied = page_denied(request)
        if denied is not None:
            return denied
        page = resources.files("gateway.ops").joinpath("status.html").read_text()
        return HTMLResponse(page)

    async def status_json(request: Request) -> Response:
        denied = page_denied(request)
        if denied is not None:
            return denied
        doc = status_document(svc, telemetry)
        if not is_admin(svc, request.headers.get("authorization", "")):
            doc = redact_tenants(doc)
        return JSONResponse(doc)

    async def reload(request: Request) -> Response:
        if request.method != "POST":
            return _error(405, "Method Not Allowed")
        denied = authorised(request)
        if denied is not None:
            return denied
        ok, message = reload_config()
        if not ok:
            return _error(400, message)
        return JSONResponse({"reloaded": True, "generation": svc.generation,
                             "message": message})

    async def workers(request: Request) -> Response:
        denied = authorised(request)
        if denied is not None:
            return denied
        return JSONResponse(status_document(svc, telemetry)["workers"])

    async def http_error(request: Request, exc: Exception) -> Response:
        # Triton's error shape for the admin listener's own 404/405 too.
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error(status, "Not Found" if status == 404 else
                      "Method Not Allowed" if status == 405 else "error")

    return Starlette(routes=[
        Route("/metrics", metrics),
        Route("/status", status_html),
        Route("/status.json", status_json),
        Route("/admin/reload", reload, methods=["GET", "POST"]),
        Route("/admin/workers", workers),
    ], exception_handlers={HTTPException: http_error})
