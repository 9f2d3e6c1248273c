"""The HTTP/1.1 front end: the gateway's own connection protocol (httptools on uvloop).

uvicorn still runs the listeners (sockets, start-up, graceful shutdown: it is handed this
class as its ``http`` protocol), but each connection is this protocol, not uvicorn's: the
request/response cycle below is the ASGI interface the :class:`~gateway.http.proxy.ProxyApp`
and the Starlette admin pages are written against, kept to what the gateway needs and cheap
where it counts (see docs/http.md, "The front end"):

* **one write per answer**: the response head is held until the body, then written with it
  (uvicorn writes the head and the body separately: two system calls per request); a
  streamed answer (``generate_stream``) is chunked as it comes;
* **refusals before the body**: an inference request is shown to the application's
  ``refuse_early(method, path, headers)`` as soon as its head is parsed; what it refuses is
  answered there and then from precomputed bytes — no task, no body read (the body is
  discarded, or the connection closed when it is large or the client waits for
  ``100 Continue``);
* **health probes answered in the callback that parsed them**, not as tasks queued behind a
  herd (:func:`run_eagerly`);
* no per-header regular expressions on the way out (the headers are the gateway's own or a
  worker's, already parsed by httptools), no ``asyncio.Event`` per request (a future only
  when a body must be waited for).

The connection-level rules are the same as before (tests/test_hostile_input.py,
tests/test_slow_clients.py): a malformed request is a 400 in Triton's JSON; a head growing past
the header bounds is a 431 before it is buffered; each connection is counted and watched by
the :class:`~gateway.http.guard.ConnectionGuard` (its phase, bytes received, requests begun),
which may answer it 408/503 and close it; keep-alive, pipelining (answered in order),
``Expect: 100-continue``, HTTP/1.0, ``HEAD`` and flow control (reading paused past 64 KiB of
unread body, writing paused while the client does not read) as HTTP/1.1 requires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import httptools

from gateway.core.connections import Phase, Seen
from gateway.core.errors import GatewayError, HeaderFieldsTooLarge
from gateway.http.proxy import CANCELS_ON_DISCONNECT, http_date, new_request_id

log = logging.getLogger("gateway.http.frontend")

Message = MutableMapping[str, Any]
# The application's refusal hook: (method, path, headers) → the whole answer, or None.
RefuseEarly = Callable[[bytes, str, list[tuple[bytes, bytes]]], "bytes | None"]

# Room for the request line and separators beyond the header bounds, before a 431.
REQUEST_LINE_ALLOWANCE_BYTES = 64 * 1024
# A client still sending its head is read and dropped this long after its 431, then closed.
LINGER_S = 2.0
# Answered as soon as their head is parsed (see run_eagerly).
EAGER_PATHS = frozenset({"/v2/health/ready", "/v2/health/live"})
# Reads handled per turn of the event loop, at most (see ReadBudget).
DEFAULT_READS_PER_TURN = 64
# Reads that are never held by the budget: health probes and the gateway's own pages.
_NEVER_HELD = (b"GET /v2/health/", b"GET /metrics", b"GET /status")
# Unread request body buffered before reading from the socket pauses.
HIGH_WATER_BYTES = 65536
# A refused request's body is read and dropped up to this size; a larger one closes the
# connection instead (reading it would cost more than a new connection).
DISCARD_BODY_MAX_BYTES = 65536


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _resume(coro: Coroutine[Any, Any, None], awaited: object) -> None:
    """Carry on a coroutine that was started by hand and suspended on ``awaited`` (what it
    yielded: an asyncio future, or None for a bare yield), as a task would have."""
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                future = cast("asyncio.Future[Any]", awaited)
                # As a task does with what it is handed: the flag says "yielded by await",
                # and awaiting the future again sets it anew.
                future._asyncio_future_blocking = False
                await future
        except asyncio.CancelledError as exc:
            if not (isinstance(awaited, asyncio.Future) and awaited.done()):
                try:  # this task was cancelled: so is the coroutine
                    awaited = coro.throw(exc)
                except StopIteration:
                    return
                continue
        except BaseException:
            pass  # the future's own outcome: the coroutine reads it when resumed
        try:
            awaited = coro.send(None)
        except StopIteration:
            return


def run_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
                ) -> asyncio.Task[None] | None:
    """Run ``coro`` now, in this callback, up to its first suspension; a task carries it on
    from there (None when it finished without suspending)."""
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, awaited))


class Exchange:
    """One request and its answer on a connection: the ASGI ``receive``/``send`` pair."""

    __slots__ = (
        "_waiter",
        "body",
        "chunked",
        "complete",
        "conn",
        "declared",
        "delivered",
        "discard",
        "disconnected",
        "expect_100",
        "head_method",
        "keep_alive",
        "left",
        "more_body",
        "out_headers",
        "scope",
        "started",
        "status",
        "task",
    )

    def __init__(self, conn: FrontEnd, scope: dict[str, Any], keep_alive: bool,
                 expect_100: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.head_method = scope["method"] == "HEAD"
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.discard = False      # answered before its body: what arrives is dropped
        self.declared = -1        # the body's Content-Length; -1 chunked (or not known)
        self.delivered = False    # the body's last part handed to the application
        self.started = False      # http.response.start received
        self.complete = False     # the whole answer written
        self.chunked = False
        self.left = -1            # bytes of body still to write (-1: not known yet)
        self.status = 0
        self.out_headers: list[tuple[bytes, bytes]] = []
        self._waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if cancelled and self.disconnected:
                return
            if not cancelled:
                log.error("exception in the ASGI application", exc_info=exc)
            if not self.started and not self.disconnected:
                self._answer_instead(cancelled)
            else:
                self.conn.transport.close()
            if cancelled:
                raise
        else:
            if self.started and not self.complete and not self.disconnected:
                log.error("the ASGI application returned without completing its answer")
                self.conn.transport.close()
            elif not self.started and not self.disconnected:
                task = asyncio.current_task()
                cancelled = task is not None and task.cancelling() > 0
                if not cancelled:
                    log.error("the ASGI application returned without answering")
                self._answer_instead(cancelled)

    def _answer_instead(self, cancelled: bool) -> None:
        """The answer of a request the application did not answer: 503 when its task was
        cancelled (a drain that ran out of time), else 500; the connection closes after it."""
        self.keep_alive = False
        if cancelled:
            status, extra = 503, b"retry-after: 1\r\n"
            body = b'{"error": "the gateway stopped before the request was answered"}'
        else:
            status, extra, body = 500, b"", b'{"error": "internal gateway error"}'
        self.started = self.complete = True
        transport = self.conn.transport
        if not transport.is_closing():
            transport.write(b"".join([
                STATUS_LINE[status], b"content-type: application/json\r\n", extra,
                b"content-length: ", str(len(body)).encode(), b"\r\ndate: ", http_date(),
                b"\r\nconnection: close\r\n\r\n", body]))
        self.conn.answered(self)

    # ASGI receive --------------------------------------------------------------------------
    async def receive(self) -> Message:
        conn = self.conn
        if self.expect_100:
            self.expect_100 = False
            if not conn.transport.is_closing() and not self.started:
                conn.transport.write(_CONTINUE)
        # Once the whole body is handed over, receive() waits for the client to go away
        # (what an application watching for a disconnect relies on).
        while not self.disconnected and not self.complete and (
                self.delivered or (self.more_body and not self.body)):
            conn.resume_reading()
            self._waiter = conn.loop.create_future()
            await self._waiter
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        body = bytes(self.body)
        self.body.clear()
        if self.more_body:
            conn.resume_reading()
        else:
            self.delivered = True
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    # ASGI send -----------------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected or self.complete:
            if self.complete and not self.disconnected:
                raise RuntimeError(f"unexpected ASGI message {message['type']!r} after the "
                                   f"answer was complete")
            return
        if not self.started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {message['type']!r}")
            self.started = True
            self.expect_100 = False
            self.status = message["status"]
            self.out_headers = list(message.get("headers", ()))
            return
        if message["type"] != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {message['type']!r}")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        transport = conn.transport
        if self.left < 0 and not self.chunked:
            # The first body message: the head goes out with it.
            head = self._head(body, more)
            if self.head_method or self.status in (204, 304):
                transport.write(head)
                self.left = 0
                body = b""
            elif self.chunked:
                transport.write(head + _chunk(body, more))
            else:
                if len(body) > self.left:
                    raise RuntimeError("response body longer than its Content-Length")
                self.left -= len(body)
                if len(body) > HIGH_WATER_BYTES:
                    transport.writelines((head, body))
                else:
                    transport.write(head + body)
        elif self.head_method or self.status in (204, 304):
            pass
        elif self.chunked:
            if body or not more:
                transport.write(_chunk(body, more))
        else:
            if len(body) > self.left:
                raise RuntimeError("response body longer than its Content-Length")
            self.left -= len(body)
            if body:
                transport.write(body)
        if not more:
            if self.left > 0:
                raise RuntimeError("response body shorter than its Content-Length")
            self.complete = True
            self.wake()
            conn.answered(self)

    def _head(self, body: bytes, more: bool) -> bytes:
        parts = [STATUS_LINE[self.status]]
        length = -1
        for name, value in self.out_headers:
            if name == b"content-length":
                if length < 0:
                    length = int(value)
                continue
            elif name == b"transfer-encoding":
                continue  # framed here, by what the body is
            elif name == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            parts += (name, b": ", value, b"\r\n")
        if length >= 0:
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        elif self.head_method or self.status in (204, 304):
            pass  # no body, and no length to say
        elif more:
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            length = len(body)
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        self.left = max(length, 0)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Rules:
    """What a connection is told by the server that runs it (see :func:`front_end`)."""

    limits: Callable[[], tuple[int, int]]
    on_error: Callable[[int, bytes, float], None] | None = None
    guard: Any = None
    refuse_early: RefuseEarly | None = None
    budget: ReadBudget = field(default_factory=lambda: ReadBudget())


class ReadBudget:
    """At most ``per_turn`` reads handled in one turn of the event loop; the connections
    beyond it hold what they read, stop reading, and are handled first thing in the next
    turns, in order.

    Why: a thundering herd's requests arrive in one poll. Handled in the callbacks that read
    them, they would all be parsed, judged and answered (or made tasks) in one turn — a
    quarter of a second for a few thousand — while the workers' answers, which free the
    slots, and the health probes wait for the turn to end. A turn of at most ``per_turn``
    reads lets the loop poll again in between: completions and dispatch come before more
    new requests. Reads that begin a health probe or a gateway page (``GET /v2/health/``,
    ``GET /metrics``, ``GET /status``) are never held. Under ordinary load fewer reads than
    ``per_turn`` come in a turn and nothing is held.
    """

    __slots__ = ("_armed", "_held", "held_total", "left", "per_turn")

    def __init__(self, per_turn: int = DEFAULT_READS_PER_TURN) -> None:
        self.per_turn = per_turn
        self.left = per_turn
        self._armed = False
        self._held: collections.deque[FrontEnd] = collections.deque()
        self.held_total = 0

    def take(self, loop: asyncio.AbstractEventLoop) -> bool:
        """May a read be handled now? (No while others are held: they go first.)"""
        if self.left <= 0 or self._held:
            return False
        self.left -= 1
        if not self._armed:
            self._arm(loop)
        return True

    def hold(self, conn: FrontEnd, loop: asyncio.AbstractEventLoop) -> None:
        self._held.append(conn)
        self.held_total += 1
        self._arm(loop)

    @property
    def holding(self) -> int:
        return len(self._held)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._armed:
            self._armed = True
            loop.call_soon(self._turn, loop)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._armed = False
        self.left = self.per_turn
        held = self._held
        while held and self.left > 0:
            self.left -= 1
            held.popleft().release_held()
        if held or self.left < self.per_turn:
            self._arm(loop)


def front_end(limits: Callable[[], tuple[int, int]],
              on_error: Callable[[int, bytes, float], None] | None = None,
              guard: Any = None,
              refuse_early: RefuseEarly | None = None) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http=``, with the gateway's connection rules bound:

    * ``limits()`` gives ``(max_header_bytes, max_headers)``, read live so a reload applies:
      a head growing past them is answered 431 and the connection closed;
    * ``on_error(status, request_id, latency_s)`` hears of each answer made at the
      connection level (the access log);
    * ``guard``: the :class:`~gateway.http.guard.ConnectionGuard`, told of each connection;
    * ``refuse_early``: see the module's docstring.
    """
    rules = Rules(limits, on_error, guard, refuse_early)
    return type("FrontEnd", (FrontEnd,), {"rules": rules})


class FrontEnd(asyncio.Protocol):
    """One client connection (see the module's docstring); made by :func:`front_end`."""

    rules: ClassVar[Rules]

    def __init__(self, config: Any, server_state: Any, app_state: Any = None,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        self.keep_alive_s: float = float(config.timeout_keep_alive)
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # httptools < 0.6.3
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.read_paused = False
        self.write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        # the request being parsed, the one being answered, those waiting behind it
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.pipeline: collections.deque[Exchange] = collections.deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect_100 = False
        # the guard's measures and the head bound
        self._head_bytes = 0
        self._in_head = False
        self._began_in_chunk = False
        self._discarding = False
        self._began_at = 0.0
        self._received = 0
        self._requests = 0
        # bytes read while over the turn's read budget (see ReadBudget), handled later
        self._held: list[bytes] | None = None

    # asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        self.server = self.transport.get_extra_info("sockname")
        peer = self.transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 \
            else None
        guard = self.rules.guard
        if guard is not None:
            self.keep_alive_s = guard.limits().keep_alive_timeout_s
            guard.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.rules.guard
        if guard is not None:
            guard.closed(self)
        self.connections.discard(self)
        self._cancel_keep_alive()
        for ex in (self.active, self.parsing, *self.pipeline):
            if ex is not None and not ex.complete:
                ex.disconnected = True
                ex.wake()
        active = self.active
        if active is not None and not active.complete and active.delivered \
                and active.task is not None:
            # The client is gone after its whole request was read: its answer is of no use,
            # and the work for it (a worker's slot, a place in the queue) stops here.
            active.task.cancel()
        self.pipeline.clear()
        self._held = None
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()
        await self._drained

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._received += len(data)
        if self._held is not None:
            self._held.append(data)
            return
        if not self.rules.budget.take(self.loop) and not data.startswith(_NEVER_HELD):
            # Over this turn's budget: keep the bytes, stop reading, go on in a later turn.
            self._held = [data]
            if not self.read_paused:
                self.transport.pause_reading()
            self.rules.budget.hold(self, self.loop)
            return
        self._feed(data)

    def release_held(self) -> None:
        """The budget's turn for this connection: what it held is handled now."""
        held = self._held
        self._held = None
        if held is None or self._discarding or self.transport.is_closing():
            return
        if not self.read_paused:
            self.transport.resume_reading()
        self._feed(b"".join(held))

    def _feed(self, data: bytes) -> None:
        self._began_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol to upgrade to: the request was plain HTTP
        except httptools.HttpParserCallbackError:
            # A bug of the gateway's, not the client's doing: logged, and answered 500.
            log.exception("internal error reading a request")
            self._write_error(500, json.dumps({"error": "internal gateway error"}).encode())
            return
        except httptools.HttpParserError:
            self._write_error(400, json.dumps({"error": "malformed HTTP request"}).encode())
            return
        # The chunk a head began in may also hold the end of the previous request: only
        # whole chunks after it are counted (an undercount of one read, at most).
        if not self._in_head or self._began_in_chunk or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        max_bytes, max_headers = self.rules.limits()
        cap = max_bytes + 4 * max_headers + REQUEST_LINE_ALLOWANCE_BYTES
        if self._head_bytes > cap:
            exc = HeaderFieldsTooLarge(f"request head exceeds {cap} bytes")
            self._write_error(exc.status, exc.body(), linger=True)

    # parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect_100 = False
        self._head_bytes = 0
        self._in_head = True
        self._began_in_chunk = True
        self._began_at = time.monotonic()
        self._requests += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 §5.5 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect_100 = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        http_version = parser.get_http_version()
        method = parser.get_method()
        url = self._url
        if url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url:
            raw_path, query = url, b""
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        headers = self._headers
        keep_alive = http_version != "1.0" and parser.should_keep_alive()
        busy = self.active is not None and not self.active.complete
        refuse = self.rules.refuse_early
        if refuse is not None and not busy and method == b"POST":
            answer = refuse(method, path, headers)
            if answer is not None:
                self._answer_refusal(answer, headers, keep_alive)
                return
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": http_version, "server": self.server, "client": self.client,
            "scheme": "http", "root_path": "", "method": method.decode("ascii"),
            "path": path, "raw_path": raw_path, "query_string": query, "headers": headers,
            "state": {},
            # (the task answering it is cancelled when the client goes: no watch needed)
            CANCELS_ON_DISCONNECT: True,
        }
        ex = Exchange(self, scope, keep_alive, self._expect_100)
        ex.declared = _declared_length(headers)
        self.parsing = ex
        if busy:
            # Pipelined: answered in order, after the one in progress.
            self.pause_reading()
            self.pipeline.append(ex)
        else:
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.discard or ex.complete:
            return
        ex.body += body
        if len(ex.body) > HIGH_WATER_BYTES:
            self.pause_reading()
        ex.wake()

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.more_body = False
        if ex.discard:
            self.parsing = None
            self._next()
            return
        ex.wake()

    # answering -----------------------------------------------------------------------------
    def _start(self, ex: Exchange) -> None:
        self.active = ex
        scope = ex.scope
        if scope["path"] in EAGER_PATHS and scope["method"] == "GET":
            # Health probes run at once, in the callback that parsed them, rather than as a
            # task queued behind every request that arrived in the same instant: when a
            # herd of thousands lands in one poll, the loop's next turn runs all their
            # tasks, and a readiness probe among them would wait for the lot.
            task = run_eagerly(self.loop, ex.run(self.app))
        else:
            task = self.loop.create_task(ex.run(self.app))
        if task is not None:
            ex.task = task
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _answer_refusal(self, answer: bytes, headers: list[tuple[bytes, bytes]],
                        keep_alive: bool) -> None:
        """A refusal from the head alone: written now; the body, if any, is dropped as it
        arrives, or the connection closed when reading it would cost more."""
        ex = Exchange(self, {"method": "POST"}, keep_alive, False)
        ex.discard = True
        ex.started = ex.complete = True
        ex.declared = length = _declared_length(headers)
        close = not keep_alive or self._expect_100 or not 0 <= length <= DISCARD_BODY_MAX_BYTES
        self.parsing = ex
        self.active = ex
        self.server_state.total_requests += 1
        if close:
            self.transport.write(_with_close(answer))
            self.transport.close()
            return
        self.transport.write(answer)

    def answered(self, ex: Exchange) -> None:
        """``ex``'s answer is written: close, or go on to the next request."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        if not ex.keep_alive:
            self.transport.close()
            return
        if ex.more_body and ex is self.parsing:
            # Answered before its request was all read (an error found in the head, a health
            # probe answered as its head was parsed): the rest is read and dropped, then the
            # next request follows — or, when that rest is large or of unknown size, the
            # connection closes rather than read it.
            if 0 <= ex.declared <= DISCARD_BODY_MAX_BYTES:
                ex.discard = True
                ex.body.clear()
                self.resume_reading()
            else:
                self.transport.close()
            return
        self._next()

    def _next(self) -> None:
        if self.pipeline:
            ex = self.pipeline.popleft()
            if not self.pipeline:
                self.resume_reading()
            self._start(ex)
            return
        self.active = None
        self.resume_reading()
        # Idle from now: closed after keep_alive_s unless a request comes. One timer per
        # connection, re-armed only when it finds the connection busy or idle anew — not a
        # timer made and cancelled per request.
        self._idle_since = self.loop.time()
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_later(self.keep_alive_s,
                                                          self._idle_timeout)

    def _idle(self) -> bool:
        return self.active is None and not self._in_head and self._held is None

    def _idle_timeout(self) -> None:
        self._keep_alive_timer = None
        if self.transport.is_closing() or not self._idle():
            return  # busy: the request's end re-arms it
        left = self._idle_since + self.keep_alive_s - self.loop.time()
        if left > 0.001:
            self._keep_alive_timer = self.loop.call_later(left, self._idle_timeout)
            return
        self.transport.close()

    def _cancel_keep_alive(self) -> None:
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None

    def shutdown(self) -> None:
        """The server is stopping: close now when idle, else after the answer in progress."""
        ex = self.active
        if ex is None or ex.complete:
            self.transport.close()
        else:
            ex.keep_alive = False
            for waiting in self.pipeline:
                waiting.disconnected = True
            self.pipeline.clear()

    # the connection guard's side -----------------------------------------------------------
    def seen(self) -> Seen:
        return Seen(self._phase(), self._requests, self._received)

    def _phase(self) -> Phase:
        if self._discarding:
            return Phase.WORKING  # answered 431 and closing: the gateway's own doing
        if self._in_head:
            return Phase.HEAD
        ex = self.parsing
        if ex is None:
            return Phase.NEW if not self._requests else Phase.IDLE
        if ex.more_body and not ex.disconnected and (not ex.complete or ex.discard):
            # The gateway not reading (its buffer full, or 100 Continue not yet sent) is its
            # own wait, not the client's slowness.
            if self.read_paused or ex.expect_100:
                return Phase.WORKING
            return Phase.BODY
        active = self.active
        if active is not None and not active.complete:
            return Phase.SENDING if self.write_paused else Phase.WORKING
        return Phase.IDLE

    def answer_and_close(self, error: GatewayError) -> None:
        if self.transport.is_closing():
            return
        extra = b"".join(k + b": " + v + b"\r\n" for k, v in error.headers()
                         if k != b"content-type")
        self._write_error(error.status, error.body(), extra=extra)

    def close(self) -> None:
        self.transport.close()  # a no-op when already closing

    def _write_error(self, status: int, body: bytes, *, linger: bool = False,
                     extra: bytes = b"") -> None:
        ex = self.parsing
        active = self.active
        # A request whose body is still arriving has no answer yet: this is it, and the
        # application reading the body hears that the client is gone.
        body_arriving = ex is not None and ex.more_body and not ex.started \
            and not ex.complete
        idle = active is None or active.complete
        if idle or body_arriving:
            if body_arriving and ex is not None:
                ex.disconnected = True
                ex.wake()
            rid = new_request_id()
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\n",
                b"date: ", http_date(), b"\r\n",
                b"x-request-id: ", rid, b"\r\n", extra,
                b"connection: close\r\n\r\n", body]))
            on_error = self.rules.on_error
            if on_error is not None:
                on_error(status, rid,
                               time.monotonic() - self._began_at if self._in_head else 0.0)
        if not linger:
            self.transport.close()
            return
        # A client still sending its head would get a reset instead of the answer if the
        # connection closed now: read and drop the rest for a moment, then close.
        self._discarding = True
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def _with_close(answer: bytes) -> bytes:
    """``answer`` (a whole HTTP/1.1 response) saying that the connection closes after it."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    return head + b"\r\nconnection: close" + sep + body


def _chunk(body: bytes, more: bool) -> bytes:
    """``body`` as one chunk of a chunked answer, and the last chunk after it unless ``more``."""
    return (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") \
        + (b"" if more else b"0\r\n\r\n")


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The request body's declared length: its Content-Length, 0 when it has neither that nor
    Transfer-Encoding, -1 when chunked (httptools has refused anything malformed)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return -1
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return 0
