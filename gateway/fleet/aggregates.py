"""Fleet-wide answers built from every ready worker: Triton's statistics summed, the union of
the repository indexes, and repository control broadcast to every worker.

``merge_stats`` is pure (one worker's ``model_stats`` entry folded into the running sum); the
:class:`TritonAggregates` shell asks the workers concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway.core.errors import BadRequest, UpstreamError
from gateway.fleet.upstream import fetch
from gateway.fleet.workers import Worker

STATS_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                "cache_hit", "cache_miss")


class TritonAggregates:
    """``workers()`` lists the ready workers now; ``reprobe(workers)`` re-reads their models
    (after a load/unload); ``timeout_s()`` is the upstream read timeout in force."""

    __slots__ = ("_reprobe", "_timeout_s", "_workers")

    def __init__(self, workers: Callable[[], Iterable[Worker]],
                 reprobe: Callable[[Worker], Awaitable[None]],
                 timeout_s: Callable[[], float]) -> None:
        self._workers = workers
        self._reprobe = reprobe
        self._timeout_s = timeout_s

    async def stats(self, model: str, version: str) -> tuple[int, object]:
        """Triton's statistics extension, summed over every ready worker."""
        target = "/v2/models/stats"
        if model:
            target = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + \
                "/stats"
        workers = list(self._workers())
        if not workers:
            return 503, {"error": "no ready worker"}
        results = await asyncio.gather(*(self._get_json(w, "GET", target) for w in workers))
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        first_error: tuple[int, object] | None = None
        for status, doc in results:
            if status != 200 or not isinstance(doc, dict):
                first_error = first_error or (status, doc)
                continue
            for entry in doc.get("model_stats", []):
                if isinstance(entry, dict):
                    merge_stats(merged, entry)
        if not merged and first_error is not None:
            return first_error
        return 200, {"model_stats": list(merged.values())}

    async def repository_index(self, body: bytes) -> list[dict[str, Any]]:
        ready_only = False
        if body.strip():
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                raise BadRequest("failed to parse the request JSON buffer") from None
            ready_only = isinstance(doc, dict) and bool(doc.get("ready", False))
        workers = list(self._workers())
        results = await asyncio.gather(*(self._get_json(w, "POST", "/v2/repository/index",
                                                        body or b"{}") for w in workers))
        union: dict[tuple[str, str], dict[str, Any]] = {}
        for status, doc in results:
            if status != 200 or not isinstance(doc, list):
                continue
            for e in doc:
                if not isinstance(e, dict) or "name" not in e:
                    continue
                k = (str(e["name"]), str(e.get("version", "")))
                if k not in union or e.get("state") == "READY":
                    union[k] = e
        listed = {n for n, _ in union}
        for w in workers:
            for m in w.models_ready:
                if "/" not in m and m not in listed:
                    union[(m, "")] = {"name": m, "version": "", "state": "READY"}
                    listed.add(m)
        out = sorted(union.values(), key=lambda e: (e["name"], str(e.get("version", ""))))
        return [e for e in out if e.get("state") == "READY"] if ready_only else out

    async def broadcast(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        """Send one request to every ready worker (repository load/unload); the first
        failure is the answer. The workers' models are re-read before answering, so the
        gateway knows a loaded model as soon as the client does."""
        workers = list(self._workers())
        if not workers:
            return 503, b'{"error":"no ready worker"}'
        results = await asyncio.gather(*(self._raw(w, method, target, body) for w in workers))
        with contextlib.suppress(Exception):
            await asyncio.gather(*(self._reprobe(w) for w in workers))
        for status, payload in results:
            if status != 200:
                return status, payload
        return 200, results[0][1] or b"{}"

    async def get_json(self, w: Worker, target: str) -> tuple[int, object]:
        return await self._get_json(w, "GET", target)

    async def _raw(self, w: Worker, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await fetch(w.pool, method, target, body, timeout_s=self._timeout_s())
        except UpstreamError as exc:
            return exc.status, exc.body()

    async def _get_json(self, w: Worker, method: str, target: str,
                        body: bytes = b"") -> tuple[int, object]:
        status, payload = await self._raw(w, method, target, body)
        try:
            return status, json.loads(payload) if payload else None
        except (ValueError, RecursionError):
            return 502, {"error": "worker sent invalid JSON"}


def merge_stats(merged: dict[tuple[str, str], dict[str, Any]], entry: dict[str, Any]) -> None:
    k = (str(entry.get("name", "")), str(entry.get("version", "")))
    cur = merged.get(k)
    if cur is None:
        merged[k] = json.loads(json.dumps(entry))
        return
    for f in ("inference_count", "execution_count"):
        cur[f] = int(cur.get(f, 0)) + int(entry.get(f, 0))
    cur["last_inference"] = max(int(cur.get("last_inference", 0)),
                                int(entry.get("last_inference", 0)))
    ci, ei = cur.setdefault("inference_stats", {}), entry.get("inference_stats", {})
    for f in STATS_FIELDS:
        a, b = ci.setdefault(f, {"count": 0, "ns": 0}), ei.get(f, {})
        a["count"] = int(a.get("count", 0)) + int(b.get("count", 0))
        a["ns"] = int(a.get("ns", 0)) + int(b.get("ns", 0))
    by_size = {int(b.get("batch_size", 0)): b for b in cur.get("batch_stats", [])}
    for b in entry.get("batch_stats", []):
        size = int(b.get("batch_size", 0))
        if size not in by_size:
            by_size[size] = json.loads(json.dumps(b))
            continue
        for f in ("compute_input", "compute_infer", "compute_output"):
            a, c = by_size[size].setdefault(f, {"count": 0, "ns": 0}), b.get(f, {})
            a["count"] = int(a.get("count", 0)) + int(c.get("count", 0))
            a["ns"] = int(a.get("ns", 0)) + int(c.get("ns", 0))
    cur["batch_stats"] = [by_size[s] for s in sorted(by_size)]
