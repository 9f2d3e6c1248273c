"""The access log: one JSON line per request, bounded so that a flood cannot flood the log.

A line::

    {"time": "2025-01-31T12:00:00.123Z", "rid": "…", "tenant": "acme", "model": "resnet",
     "worker": "10.0.0.7:8000", "status": 200, "latency_ms": 12.3, "queue_ms": 0.0,
     "reason": null}

With tracing on (``tracing.otlp_endpoint``) a traced request's line also carries its W3C
``trace_id`` (32 hex digits), the id its spans and the worker's have.

``reason`` is the gateway's own refusal or failure (``rate_limited``, ``overloaded``,
``no_worker``, ``unauthorized``, ``bad_request``, ``upstream_timeout``, …), ``null`` when a
worker answered; a client that went away is status 499, reason ``client_disconnected``.
Fields the gateway does not know for a request are ``null`` (the worker of a request refused
before routing). Every answer has its latency: from the request's arrival to the answer,
a refusal's too; a request the connection layer answers itself (malformed: 400, too slow:
408, a head over the header bounds: 431, no room: 503) counts from the start of its head.
Text that comes from the client (the model name in the path, the request id) is
JSON-escaped and cut to ``MAX_FIELD_CHARS``.

The bounds (per one-second window, :class:`LineBudget`, pure and ``now`` in):

* successes (status < 400) are sampled: every n-th for ``success_sample`` = 1/n (1.0: all);
* error lines (status >= 400, refusals, aborts) at most ``max_error_lines_per_s``;
* every line at most ``max_lines_per_s``.

What a bound leaves out is counted, and the first write of a later window (or the
once-a-second :meth:`AccessLog.tick`) writes one summary line
``{"time": …, "suppressed": K, "suppressed_errors": E, "unsampled": U}``: the log says how
much it did not say, at most one extra line a second. Successes left out by sampling are
``unsampled``, not suppressed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import IO

from gateway.core.config import AccessLogConfig

MAX_FIELD_CHARS = 200
CLIENT_DISCONNECTED = 499  # nginx's "client closed request"

Sink = Callable[[str], None]

log = logging.getLogger("gateway.access")


def utc_timestamp(wall: float) -> str:
    """ISO 8601, UTC, milliseconds: ``2025-01-31T12:00:00.123Z``."""
    millis = int(wall * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{millis:03d}Z"


class LineBudget:
    """Which lines may be written now: the pure rules above, one-second windows."""

    __slots__ = ("_every", "_successes_seen", "_window", "errors", "lines", "max_error_lines",
                 "max_lines", "suppressed", "suppressed_errors", "unsampled")

    def __init__(self, max_lines_per_s: int, max_error_lines_per_s: int,
                 success_sample: float) -> None:
        self.max_lines = max_lines_per_s
        self.max_error_lines = max_error_lines_per_s
        # success_sample 0 writes no success; otherwise every n-th, n = round(1 / sample)
        self._every = 0 if success_sample <= 0 else max(1, round(1.0 / success_sample))
        self._successes_seen = 0
        self._window = -math.inf
        self.lines = self.errors = 0
        self.suppressed = self.suppressed_errors = self.unsampled = 0

    def __repr__(self) -> str:
        return (f"<LineBudget lines={self.lines}/{self.max_lines} errors={self.errors}/"
                f"{self.max_error_lines} suppressed={self.suppressed}>")

    def roll(self, now: float) -> tuple[int, int, int] | None:
        """Start the window ``now`` falls in, if it is a new one; returns what the last
        window left out, ``(suppressed, suppressed_errors, unsampled)``, when anything."""
        window = math.floor(now)
        if window == self._window:
            return None
        self._window = window
        self.lines = self.errors = 0
        left_out = (self.suppressed, self.suppressed_errors, self.unsampled)
        self.suppressed = self.suppressed_errors = self.unsampled = 0
        return left_out if any(left_out) else None

    def admit(self, now: float, *, is_error: bool) -> bool:
        """May the line of one request be written? Call :meth:`roll` first."""
        if not is_error:
            self._successes_seen += 1
            if self._every == 0 or self._successes_seen % self._every:
                self.unsampled += 1
                return False
        if self.lines >= self.max_lines or (is_error and self.errors >= self.max_error_lines):
            self.suppressed += 1
            if is_error:
                self.suppressed_errors += 1
            return False
        self.lines += 1
        if is_error:
            self.errors += 1
        return True


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class AccessLog:
    """Formats and writes the lines the :class:`LineBudget` lets through; ``sink`` takes one
    line (no newline). Built by :meth:`from_config` on a file or on the ``gateway.access``
    logger."""

    __slots__ = ("_file", "budget", "config", "sink")

    def __init__(self, config: AccessLogConfig, sink: Sink, file: IO[str] | None = None
                 ) -> None:
        self.config = config
        self.sink = sink
        self._file = file
        self.budget = LineBudget(config.max_lines_per_s, config.max_error_lines_per_s,
                                 config.success_sample)

    @classmethod
    def from_config(cls, config: AccessLogConfig) -> AccessLog | None:
        if not config.enabled:
            return None
        if config.path:
            # Buffered: written out by tick() once a second and on close, not per line.
            try:
                file = open(config.path, "a", buffering=1 << 16,  # noqa: SIM115
                            encoding="utf-8")
            except OSError as exc:
                log.error("access log off: cannot open %s: %s", config.path,
                          exc.strerror or exc)
                return None

            def write(line: str) -> None:
                file.write(line + "\n")

            return cls(config, write, file)
        # Its own level: access lines are written whatever the gateway's log_level.
        log.setLevel(logging.INFO)
        return cls(config, log.info)

    def __repr__(self) -> str:
        where = self.config.path or "logger gateway.access"
        return f"<AccessLog {where} {self.budget!r}>"

    def record(self, now: float, wall: float, *, rid: bytes | None, tenant: str | None,
               model: str | None, worker: str | None, status: int,
               latency_s: float | None, queue_s: float | None, reason: str | None,
               trace_id: str | None = None) -> None:
        """One request's outcome; ``now`` (monotonic) drives the bounds, ``wall`` is the
        time written."""
        self._summarise(now, wall)
        if not self.budget.admit(now, is_error=status >= 400):
            return
        line: dict[str, object] = {
            "time": utc_timestamp(wall),
            "rid": _clip(rid.decode("latin-1")) if rid is not None else None,
            "tenant": tenant, "model": _clip(model), "worker": worker, "status": status,
            "latency_ms": _ms(latency_s), "queue_ms": _ms(queue_s), "reason": reason,
        }
        if trace_id is not None:
            line["trace_id"] = trace_id
        self.sink(json.dumps(line, separators=(",", ":")))

    def tick(self, now: float, wall: float) -> None:
        """Once a second: the summary of the window just ended, and buffered lines out."""
        self._summarise(now, wall)
        if self._file is not None:
            self._file.flush()

    def _summarise(self, now: float, wall: float) -> None:
        left_out = self.budget.roll(now)
        if left_out is None:
            return
        suppressed, errors, unsampled = left_out
        self.sink(json.dumps({"time": utc_timestamp(wall), "suppressed": suppressed,
                              "suppressed_errors": errors, "unsampled": unsampled},
                             separators=(",", ":")))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
