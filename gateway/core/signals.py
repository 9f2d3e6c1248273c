"""Triton's Prometheus metrics page → :class:`~gateway.core.types.WorkerSignals`.

Two pure steps, so the scraper owns the clock and the HTTP client:

* :func:`parse_metrics` reads one page of Prometheus text exposition (Triton's port 8002
  ``/metrics``) into a :class:`RawMetrics` snapshot: per-GPU gauges keyed by ``gpu_uuid``
  and per-model gauges and cumulative counters, summed by ``model`` over ``version``,
  ``gpu_uuid`` and ``reason``. Only the series the router needs are kept; everything else,
  comments and malformed lines are skipped; it never raises on page content.
* :func:`derive_signals` turns two consecutive snapshots into rates and per-request means.

Counter semantics. A counter that went *down* means the worker restarted between the two
scrapes; that model's counters are then taken as counted from zero (delta = current value).
Without a previous scrape there is no interval, so rates are 0 and the per-request times
are the lifetime means (the best estimate until the second scrape). An interval without
successful requests gives times of 0 (no new information).

A Triton without a GPU exports no ``nv_gpu_*`` series at all: ``gpus`` is then ``()``.

The parser is on the scrape hot path (up to 1,000 pages per second): lines of series it does
not read cost a prefix test and a dictionary miss; the lines it reads take a string-method
fast path for the shape Triton always writes (``name{a="x",b="y"} value``, no escapes) and
fall back to the full grammar (regular expressions, unescaping) for anything else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gateway.core.types import GpuSignal, ModelSignal, WorkerSignals

__all__ = ["ModelCounters", "RawMetrics", "derive_signals", "parse_metrics"]

GPU_TOTAL = "nv_gpu_memory_total_bytes"
GPU_USED = "nv_gpu_memory_used_bytes"
GPU_UTILISATION = "nv_gpu_utilization"

# metric name → index into the per-model accumulator list
_MODEL_FIELDS: dict[str, int] = {
    "nv_inference_pending_request_count": 0,
    "nv_inference_request_success": 1,
    "nv_inference_request_failure": 2,
    "nv_inference_count": 3,
    "nv_inference_exec_count": 4,
    "nv_inference_request_duration_us": 5,
    "nv_inference_queue_duration_us": 6,
    "nv_inference_compute_infer_duration_us": 7,
}
_GPU_FIELDS: dict[str, int] = {GPU_TOTAL: 0, GPU_USED: 1, GPU_UTILISATION: 2}

# name, optional {labels} (quoted values may hold any escaped character), value, optional
# timestamp. The label block alternates unquoted runs and quoted strings, so a '}' or ','
# inside a value does not end it.
_SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{((?:[^"}]|"(?:[^"\\\n]|\\.)*")*)\})?'
    r'[ \t]+(\S+)(?:[ \t]+-?\d+)?[ \t]*\r?$'
)
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*,?')
_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}


@dataclass(frozen=True, slots=True)
class ModelCounters:
    """One model's values from one page, summed over versions, GPUs and failure reasons."""

    pending: float = 0.0
    success: float = 0.0
    failure: float = 0.0
    inference_count: float = 0.0
    exec_count: float = 0.0
    request_duration_us: float = 0.0
    queue_duration_us: float = 0.0
    compute_infer_us: float = 0.0  # the GPU-time meter (gateway.core.fairshare) reads it

    def went_backwards(self, later: ModelCounters) -> bool:
        """True when ``later`` cannot follow ``self`` without a restart in between."""
        return (later.success < self.success or later.failure < self.failure
                or later.request_duration_us < self.request_duration_us
                or later.queue_duration_us < self.queue_duration_us
                or later.inference_count < self.inference_count
                or later.exec_count < self.exec_count)


@dataclass(frozen=True, slots=True)
class RawMetrics:
    """What one metrics page said, before any rate is computed."""

    gpus: tuple[GpuSignal, ...] = ()
    models: dict[str, ModelCounters] = field(default_factory=dict)
    samples_skipped: int = 0  # malformed sample lines (comments and blanks are not counted)


def _unescape(value: str) -> str:
    return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), value)


def _labels(block: str) -> dict[str, str] | None:
    """Label block → dict; None if it is not a well-formed label list."""
    out: dict[str, str] = {}
    pos = 0
    end = len(block)
    while pos < end:
        m = _LABEL.match(block, pos)
        if m is None:
            return None if block[pos:].strip() else out
        value = m.group(2)
        out[m.group(1)] = _unescape(value) if "\\" in value else value
        pos = m.end()
    return out


def _find_label(block: str, name: str) -> str | None:
    """Value of label ``name`` in a block without escapes, None if absent or odd."""
    needle = name + '="'
    pos = block.find(needle)
    while pos >= 0:
        # a real label name starts the block or follows a separator, outside any quotes
        if (pos == 0 or block[pos - 1] in ", ") and block.count('"', 0, pos) % 2 == 0:
            start = pos + len(needle)
            end = block.find('"', start)
            return block[start:end] if end >= 0 else None
        pos = block.find(needle, pos + 1)
    return None


def _strict(line: str, key: str) -> tuple[str | None, float] | None:
    """Full-grammar reading of one sample line: (value of label ``key``, value)."""
    m = _SAMPLE.match(line)
    if m is None:
        return None
    try:
        value = float(m.group(3))
    except ValueError:
        return None
    block = m.group(2)
    labels = _labels(block) if block else {}
    if labels is None:
        return None
    return labels.get(key), value


def parse_metrics(text: str) -> RawMetrics:
    """Parse a Prometheus text page; unknown series, comments and bad lines are skipped."""
    models: dict[str, list[float]] = {}
    gpus: dict[str, list[float]] = {}
    skipped = 0
    model_fields = _MODEL_FIELDS
    gpu_fields = _GPU_FIELDS
    for line in text.split("\n"):
        if not line.startswith("nv_"):
            # Every series we read starts "nv_"; anything else that is not a comment or
            # blank is still checked so that malformed lines are counted.
            if line and not line.startswith("#") and not line.isspace() \
                    and _SAMPLE.match(line) is None:
                skipped += 1
            continue
        brace = line.find("{")
        name = line[:brace] if brace > 0 else line.split(None, 1)[0]
        model_index = model_fields.get(name)
        gpu_index = gpu_fields.get(name) if model_index is None else None
        if model_index is None and gpu_index is None:
            continue
        key = "model" if model_index is not None else "gpu_uuid"
        # Fast path for the shape every Triton writes: name{a="x",b="y"} value, no escapes.
        found: tuple[str | None, float] | None = None
        close = line.rfind("}")
        if brace > 0 and close > brace and "\\" not in line:
            block = line[brace + 1:close]
            rest = line[close + 1:].split()
            if len(rest) == 1 and block.count('"') % 2 == 0:
                label = _find_label(block, key)
                if label is not None:
                    try:
                        found = label, float(rest[0])
                    except ValueError:
                        found = None
        if found is None:
            found = _strict(line, key)
        label = found[0] if found is not None else None
        if found is None or label is None:
            skipped += 1
            continue
        value = found[1]
        if not math.isfinite(value):
            continue
        if model_index is not None:
            acc = models.get(label)
            if acc is None:
                acc = models[label] = [0.0] * 8
            acc[model_index] += value
        elif gpu_index is not None:
            gacc = gpus.get(label)
            if gacc is None:
                gacc = gpus[label] = [0.0, 0.0, 0.0]
            gacc[gpu_index] = value
    return RawMetrics(
        gpus=tuple(GpuSignal(uuid=u, total_bytes=g[0], used_bytes=g[1],
                             utilisation=min(1.0, max(0.0, g[2])))
                   for u, g in gpus.items()),
        models={name: ModelCounters(*acc) for name, acc in models.items()},
        samples_skipped=skipped,
    )


def _per_request_s(duration_us: float, requests: float) -> float:
    return duration_us / requests / 1e6 if requests > 0 and duration_us > 0 else 0.0


def _model_signal(prev: ModelCounters | None, cur: ModelCounters,
                  interval_s: float | None) -> ModelSignal:
    if prev is None or interval_s is None:
        # First sight of this model: no interval for rates; lifetime means for times.
        return ModelSignal(
            pending=cur.pending,
            queue_time_s=_per_request_s(cur.queue_duration_us, cur.success),
            request_time_s=_per_request_s(cur.request_duration_us, cur.success),
        )
    base = ModelCounters() if prev.went_backwards(cur) else prev
    d_success = cur.success - base.success
    d_failure = cur.failure - base.failure
    return ModelSignal(
        pending=cur.pending,
        queue_time_s=_per_request_s(cur.queue_duration_us - base.queue_duration_us, d_success),
        request_time_s=_per_request_s(cur.request_duration_us - base.request_duration_us,
                                      d_success),
        success_per_s=d_success / interval_s,
        failure_per_s=d_failure / interval_s,
    )


def derive_signals(prev: RawMetrics | None, cur: RawMetrics, scraped_at: float,
                   prev_at: float | None) -> WorkerSignals:
    """Signals of the interval (prev_at, scraped_at]; times are monotonic seconds."""
    interval_s: float | None = None
    if prev is not None and prev_at is not None and scraped_at > prev_at:
        interval_s = scraped_at - prev_at
    prev_models = prev.models if prev is not None else {}
    return WorkerSignals(
        scraped_at=scraped_at,
        gpus=cur.gpus,
        models={name: _model_signal(prev_models.get(name), counters, interval_s)
                for name, counters in cur.models.items()},
    )
