"""The head of an infer request, read once (pure).

The proxy reads what admission, routing and batching need from an infer request exactly
once, into a :class:`RequestHead` carried in the dispatcher's ``Call``: one decompressor
(``tensors.decode_content``), one peeker (``tensors.peek_infer_header``), bounded in size
(the body limit) and depth (a too-deeply nested header is a 400, never a traceback).

Rules:

* ``Content-Encoding`` is undone before anything is read (Triton does the same, and
  ``Inference-Header-Content-Length`` counts the decoded JSON). A body that cannot be
  decoded is a 400; one that decodes past the body limit is a 413.
* Fast path: when nothing downstream needs the tensors' shapes and none of the keys that
  change routing (``sequence_id``, ``timeout``, ``priority``, shared-memory parameters) can
  occur in the header bytes, no JSON is parsed at all.
* A header the peeker cannot make sense of (malformed JSON, a wrong type) gives an *opaque*
  head: defaults, not batchable, forwarded as it is — the worker answers with Triton's own
  message, exactly as it would without the gateway.
* Client input never escapes as anything but :class:`BadRequest` or an opaque head: no
  ``RecursionError``, ``ValueError`` or ``UnicodeError`` reaches the server layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.core.errors import BadRequest
from gateway.core.tensors import InferPeek, decode_content, peek_infer_header

_ROUTING_KEYS = (b'"sequence_id"', b"shared_memory", b'"timeout"', b'"priority"')
# A body's ``parameters.timeout`` above this (~32 years) is taken as this: any larger
# integer means "no deadline", and one too large for a float must not become a 500.
MAX_TIMEOUT_US = 10**15


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the gateway knows about one infer request before it is dispatched.

    ``body`` is the content-decoded body when the request was compressed (the wire body is
    still what is forwarded); ``peek`` is None on the fast path and for opaque heads."""

    body: bytes
    header_length: int | None
    peek: InferPeek | None = None
    sequence_id: str | None = None
    sequence_end: bool = False
    shared_memory: bool = False
    batch_size: int = 1
    timeout_us: int | None = None
    priority: int | None = None

    @property
    def is_opaque(self) -> bool:
        return self.peek is None


def parse_header_length(value: bytes | None) -> int | None:
    """``Inference-Header-Content-Length`` as an int; None when absent (pure JSON body)."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length must be an integer") from None
    if n < 0:
        raise BadRequest("Inference-Header-Content-Length must not be negative")
    return n


def read_head(body: bytes, header_length: bytes | None, content_encoding: bytes | None, *,
              max_bytes: int, need_peek: bool) -> RequestHead:
    """Read an infer request's head. ``need_peek``: shapes are needed (batching, cost by
    batch size), so the header is parsed even when no routing key occurs in it."""
    hl = parse_header_length(header_length)
    if content_encoding:
        body = decode_content(body, content_encoding.decode("latin-1"), max_bytes=max_bytes)
    if hl == 0:  # one raw input, batch 1: nothing to read
        return RequestHead(body, hl)
    header = body[:hl] if hl is not None else body
    if not need_peek and not any(k in header for k in _ROUTING_KEYS):
        return RequestHead(body, hl)
    try:
        peek = peek_infer_header(body, hl)
    except BadRequest as exc:
        if "nested too deeply" in str(exc):
            raise
        return RequestHead(body, hl)
    except RecursionError:
        raise BadRequest("request JSON is nested too deeply") from None
    except (ValueError, TypeError, OverflowError):
        # Whatever else a hostile header trips over: the worker judges it, as it would
        # without the gateway.
        return RequestHead(body, hl)
    params = peek.parameters
    timeout = params.get("timeout")
    prio = params.get("priority")
    batch = peek.batch_size
    return RequestHead(
        body=body, header_length=hl, peek=peek,
        sequence_id=None if peek.sequence_id is None else str(peek.sequence_id),
        sequence_end=params.get("sequence_end") is True,
        shared_memory=peek.uses_shared_memory,
        batch_size=batch if batch is not None and batch > 0 else 1,
        timeout_us=min(timeout, MAX_TIMEOUT_US) if isinstance(timeout, int)
        and not isinstance(timeout, bool) and timeout > 0 else None,
        priority=prio if isinstance(prio, int) and not isinstance(prio, bool)
        and prio > 0 else None,
    )


def with_parameters(body: bytes, header_length: int | None,
                    parameters: Mapping[str, int]) -> tuple[bytes, int | None]:
    """``body`` with request-level ``parameters`` set (Triton's schedule-policy ``timeout``
    in microseconds, ``priority``); returns the new body and its
    ``Inference-Header-Content-Length`` (None for a pure JSON body). Only for a body whose
    header is a JSON object; the caller decides which of the client's own values stand."""
    header = body[:header_length] if header_length is not None else body
    doc = json.loads(header)
    if not isinstance(doc, dict):
        raise ValueError("the infer header is not a JSON object")
    params = doc.get("parameters")
    if params is None:
        params = doc["parameters"] = {}
    if not isinstance(params, dict):
        raise ValueError("parameters is not a JSON object")
    for name, value in parameters.items():
        params[name] = max(1, int(value))
    new_header = json.dumps(doc, separators=(",", ":")).encode()
    if header_length is None:
        return new_header, None
    return new_header + body[header_length:], len(new_header)
