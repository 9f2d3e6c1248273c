"""The gateway's error tree. Every error the gateway itself produces reaches the client as
Triton's own ``{"error": "..."}`` JSON with the status below and, for rejections, a
``Retry-After`` header.

    GatewayError (500)
    ├── BadRequest (400)
    │   └── SharedMemoryUnsupported (400)
    ├── Unauthorized (401)             missing or unknown API key / admin token
    ├── Forbidden (403)                an endpoint switched off by configuration
    ├── NotFound (404)                 unknown model / path
    ├── MethodNotAllowed (405)
    ├── RequestTimeout (408)           a request head or body too slow (the server layer's)
    ├── PayloadTooLarge (413)
    ├── HeaderFieldsTooLarge (431)     too many request headers, or too many header bytes
    ├── Rejected                       admission said no; always carries Retry-After
    │   ├── RateLimited (429)
    │   ├── Overloaded (503)           queue full, shed by priority, concurrency limit
    │   ├── NoHealthyWorker (503)
    │   └── DeadlineUnmeetable (503)   the deadline cannot be met at the current drain rate
    ├── UpstreamError (502)            connect refused/reset, bad response
    └── UpstreamTimeout (504)          includes queue-deadline expiry

Library exceptions are translated into this tree in one place: ``gateway.fleet.upstream``.
"""

from __future__ import annotations

import json
import math


class GatewayError(Exception):
    status: int = 500
    reason: str = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        return json.dumps({"error": self.message}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", b"application/json")]
        if self.retry_after_s is not None:
            out.append((b"retry-after", str(retry_after_header(self.retry_after_s)).encode()))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status})"


def retry_after_header(seconds: float) -> int:
    """Retry-After takes whole seconds; round up so a client never retries too early."""
    return max(1, math.ceil(seconds))


class BadRequest(GatewayError):
    status = 400
    reason = "bad_request"


class SharedMemoryUnsupported(BadRequest):
    reason = "shared_memory"


class Unauthorized(GatewayError):
    status = 401
    reason = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    reason = "forbidden"


class NotFound(GatewayError):
    status = 404
    reason = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    reason = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    reason = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    reason = "payload_too_large"


class HeaderFieldsTooLarge(GatewayError):
    status = 431
    reason = "headers_too_large"


class Rejected(GatewayError):
    """Admission control said no. Always carries Retry-After."""

    status = 503
    reason = "rejected"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s=1.0 if retry_after_s is None else retry_after_s)


class RateLimited(Rejected):
    status = 429
    reason = "rate_limited"


class Overloaded(Rejected):
    status = 503
    reason = "overloaded"


class NoHealthyWorker(Rejected):
    status = 503
    reason = "no_worker"


class DeadlineUnmeetable(Rejected):
    status = 503
    reason = "deadline"


class UpstreamError(GatewayError):
    status = 502
    reason = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    reason = "upstream_timeout"

    def __init__(self, message: str, *, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
