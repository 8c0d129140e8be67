"""The HTTP/1.1 connection of `rcegate serve`: uvicorn's httptools protocol (llhttp, a C parser,
on uvloop) with the service's guards, each costing a few attribute updates per request.

Request heads
    At most `max_header_bytes` (request line and headers), counted as the bytes arrive, so a
    whole 64 KB head in one write is refused like one sent in pieces: 431, and the connection is
    closed. A head must be complete `header_timeout` seconds after the connection opened, or
    after its first byte on a keep-alive connection (slowloris, sockets that never speak); an
    idle keep-alive connection closes after `keep_alive_timeout`. One periodic sweep closes what
    is overdue: no timer per request.
Framing
    llhttp refuses faulty framing as RFC 9112 asks: Content-Length together with
    Transfer-Encoding (in either order), a duplicate Content-Length, a final transfer coding
    other than chunked, obs-fold, bare LF. The answer is 400 and the connection is closed, so the
    bytes after a body are never read as a second request.
Connections
    At most `max_connections`. Over it, the connection that has waited longest for a request head
    is closed first, never one whose request is being served: idle sockets cannot lock out
    requests that arrive with a full head (uvicorn's `limit_concurrency` counts idle sockets and
    answers 503 to everyone, health probes included).
Shedding
    A request whose head arrives while `max_concurrent_requests` requests are in flight, while
    the event loop runs more than `max_loop_lag` behind, or while the app's own head-time check
    says no (the model queues), is answered 503 with Retry-After at once, before the app sees it:
    a refusal costs one write whatever the backlog. Health and metrics paths always pass.
Lingering close
    When the server closes a connection after an answer (an error that ends the connection, 503
    while draining), it shuts its write side and discards what the client still sends, for at
    most `LINGER_SECONDS` and `LINGER_BYTES`, before closing (RFC 9112 section 9.6): a client
    that is still sending reads the answer and an orderly end instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn._types import ASGI3Application, HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from service.errors import (
    HeaderTooLarge,
    InvalidRequest,
    LoopBehind,
    ServiceError,
    TooManyRequests,
    Unavailable,
)
from service.guard import ON_DISCONNECT, OPEN_PREFIXES
from service.oip.rest import is_oip

logger = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
# How often the loop's lag is measured; every SWEEP_TICKS-th tick closes overdue connections.
TICK_SECONDS = 0.05
SWEEP_TICKS = 4
HEAD_END = b"\r\n\r\n"
# The bytes of a request line besides its method and target: two spaces, "HTTP/1.1", the CRLF
# that ends it and the one that ends the head.
_REQUEST_LINE = 14

# A head-time check of the app (method, path -> a refusal or None), e.g. the model's queue.
Admit = Callable[[str, str], Unavailable | None]


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 5.0
    keep_alive_timeout: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 1024
    max_requests: int = 256  # requests in flight (health and metrics excluded)
    max_loop_lag: float = 0.0  # seconds; 0: no shedding on lag


class Front:
    """What the connections of one server share: the connections waiting for a request head
    (oldest first) and those lingering, the requests in flight, and the event loop's lag."""

    def __init__(
        self,
        limits: Limits,
        admit: Admit | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.admit = admit
        self.on_refused = on_refused
        self.connections: set[ServiceProtocol] = set()
        self.waiting: dict[ServiceProtocol, float] = {}  # -> deadline for its head
        self.lingering: dict[ServiceProtocol, float] = {}  # -> when to close it anyway
        self.in_flight = 0
        self.lag = 0.0  # how late the last tick ran, in seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._ticks = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the ticks on `loop` (once; the first connection calls it)."""
        if self._loop is loop:
            return
        self._loop = loop
        self._due = loop.time() + TICK_SECONDS
        loop.call_later(TICK_SECONDS, self._tick)

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.lag = max(0.0, now - self._due)
        self._due = now + TICK_SECONDS
        loop.call_later(TICK_SECONDS, self._tick)
        self._ticks += 1
        if self._ticks % SWEEP_TICKS == 0:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Close the connections whose head is overdue and those done lingering."""
        for connection, deadline in list(self.waiting.items()):
            if deadline <= now:
                connection.close(evicted=False)
        for connection, deadline in list(self.lingering.items()):
            if deadline <= now:
                connection.close(evicted=False)

    def refusal(self) -> Unavailable | None:
        """Why a request whose head just arrived must be refused now, or None."""
        limits = self.limits
        if self.in_flight >= limits.max_requests:
            return TooManyRequests(
                f"more than {limits.max_requests} requests in flight; retry later"
            )
        if limits.max_loop_lag:
            # The last tick's lateness, or the next tick's if it is already overdue: a loop
            # that was just held up knows it before its timers run again.
            assert self._loop is not None
            lag = max(self.lag, self._loop.time() - self._due)
            if lag > limits.max_loop_lag:
                return LoopBehind(
                    f"the server runs {1000 * lag:.0f} ms behind its requests; retry later"
                )
        return None

    def make_room(self) -> ServiceProtocol | None:
        """A connection to close for a new one over `max_connections`: the oldest lingering,
        else the one that has waited longest for a request head; None if every connection is
        serving a request."""
        for pool in (self.lingering, self.waiting):
            for connection in pool:
                return connection
        return None


def error_response(
    error: ServiceError, path: str | None, keep_alive: bool = True
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body for `error` in the service's one error body (under /v2, the
    Open Inference Protocol's `{"error": "<message>"}`), as the app would answer it."""
    status = int(error.status)
    if path is not None and is_oip(path):
        status = 400 if status == 422 else status
        body = orjson.dumps({"error": error.message})
    else:
        detail = {"status": status, "code": error.code, "message": error.message}
        body = orjson.dumps({"error": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    extra = error.headers
    for name, value in extra.items():
        if name.lower() != "connection":
            headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    if not keep_alive or extra.get("Connection") == "close":
        headers.append((b"connection", b"close"))
    return status, headers, body


def error_bytes(
    error: ServiceError,
    path: str | None,
    keep_alive: bool = True,
    default_headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """`error_response` as the bytes of an HTTP/1.1 response, after uvicorn's default headers
    (date, server) as on every other answer."""
    status, headers, body = error_response(error, path, keep_alive)
    headers = [*(default_headers or ()), *headers]
    lines = [STATUS_LINE[status], *(b"%s: %s\r\n" % header for header in headers), b"\r\n"]
    return b"".join([*lines, body])


class _Refused(Exception):
    """Raised in a parser callback to stop parsing and answer `error`."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


class _CycleTransport:
    """The transport as a request's cycle sees it: closing after an answer lingers."""

    __slots__ = ("write", "is_closing", "close")

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.close = close


class ServiceProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection (see the module docstring). `protocol_class` binds a `Front`."""

    front: ClassVar[Front]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.front.limits
        self._max_head = limits.max_header_bytes
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # of the current head, counted as bytes arrive
        self._tail = b""  # the last bytes of an unfinished head (a split terminator)
        self._reported = 0  # of the current head, as the parser reported it
        self._transfer_encoding: bytes | None = None
        self._idle = False  # waiting after a response, no byte of the next head yet
        self._lingering = False
        self._refused_input = False  # a 400/431 is due: nothing more is parsed
        self._discarded = 0
        self._lost: Callable[[], None] | None = None  # see _on_disconnect
        self._cycle_transport: _CycleTransport
        self._extensions: dict[str, object]

    # -- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        front = self.front
        front.start(self.loop)
        self._cycle_transport = _CycleTransport(transport, self._linger)
        self._extensions = {ON_DISCONNECT: self._on_disconnect}
        front.connections.add(self)
        if len(front.connections) > front.limits.max_connections:
            victim = front.make_room() or self
            victim.close(evicted=True)
            if victim is self:
                return
        front.waiting[self] = self.loop.time() + front.limits.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)
        lost, self._lost = self._lost, None
        if lost is not None:
            lost()

    def _on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """The `rcegate.on_disconnect` extension: `callback` runs if the connection is lost
        before the returned function is called (one request at a time per connection)."""
        self._lost = callback
        return self._forget_lost

    def _forget_lost(self) -> None:
        self._lost = None

    def _forget(self) -> None:
        front = self.front
        front.connections.discard(self)
        front.waiting.pop(self, None)
        front.lingering.pop(self, None)

    def close(self, evicted: bool) -> None:
        """Close now: overdue, done lingering, or evicted to make room for a new connection."""
        if evicted:
            logger.debug("over max_connections: closing a connection that sent no request")
        self._forget()
        self.transport.close()

    def _wait_for_head(self) -> None:
        """After a response: the connection idles until the next head (keep-alive timeout)."""
        front = self.front
        front.waiting.pop(self, None)
        front.waiting[self] = self.loop.time() + front.limits.keep_alive_timeout
        self._idle = True

    def _linger(self) -> None:
        """Close after an answer: shut the write side (after the queued answer), discard what
        the client still sends, close on its end or after LINGER_SECONDS/LINGER_BYTES."""
        transport = self.transport
        if self._lingering or transport.is_closing():
            return
        self._lingering = True
        front = self.front
        front.waiting.pop(self, None)
        try:
            transport.write_eof()
        except (NotImplementedError, RuntimeError, OSError):
            self.close(evicted=False)
            return
        front.lingering[self] = self.loop.time() + LINGER_SECONDS
        self.flow.resume_reading()

    # -- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._refused_input:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.close(evicted=False)
            return
        if self._idle:  # the first byte of the next head: it has header_timeout from now
            self._idle = False
            front = self.front
            front.waiting[self] = self.loop.time() + front.limits.header_timeout
        if self._in_head and not self._count_head(data):
            self._fail(HeaderTooLarge(f"the request head is over {self._max_head} bytes"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._fail(refused.error)
            else:
                logger.debug("invalid HTTP request: %s", refused)
                self._fail(InvalidRequest("invalid HTTP request"))
        except httptools.HttpParserError as exc:
            self._fail(InvalidRequest(f"invalid HTTP request: {exc}"))
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _count_head(self, data: bytes) -> bool:
        """Count the bytes of `data` that belong to the head being received (up to its blank
        line); False once the head is over the limit."""
        tail = self._tail
        buffer = tail + data if tail else data
        end = buffer.find(HEAD_END)
        if end < 0:
            self._head_bytes += len(data)
            self._tail = buffer[-3:]
        else:
            self._head_bytes += end + len(HEAD_END) - len(tail)
            self._tail = b""
        return self._head_bytes <= self._max_head

    def _fail(self, error: ServiceError) -> None:
        """Answer a request the protocol refuses (400, 431) and close the connection; what the
        client sends after it is never parsed. A refused head pipelined behind a request still
        being served is answered after that request's answer, in order."""
        self._refused_input = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self._in_head:  # the error is in the next head: answer the current one first
                scope: Any = {"type": "http", "method": "GET", "path": "", "headers": []}
                refused = self._cycle(scope, keep_alive=False)
                self.pipeline.appendleft((refused, _answer(*error_response(error, None, False))))
                return
            if cycle.response_started:  # too late for another answer
                self.close(evicted=False)
                return
            cycle.disconnected = True  # the app stops reading and writing
            cycle.message_event.set()
        # Before routing: the service's own body shape, also under /v2.
        defaults = self.server_state.default_headers
        self.transport.write(error_bytes(error, None, False, defaults))
        self._linger()

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reported = _REQUEST_LINE
        self._transfer_encoding = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._reported += len(url)
        if self._reported > self._max_head:
            raise _Refused(HeaderTooLarge(f"the request head is over {self._max_head} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        elif name == b"transfer-encoding":
            self._transfer_encoding = value
        self.headers.append((name, value))
        self._reported += len(name) + len(value) + 4
        if self._reported > self._max_head:
            raise _Refused(HeaderTooLarge(f"the request head is over {self._max_head} bytes"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._tail = b""
        front = self.front
        front.waiting.pop(self, None)
        parser = self.parser
        method = parser.get_method()
        self._reported += len(method)
        if self._reported > self._max_head:
            raise _Refused(HeaderTooLarge(f"the request head is over {self._max_head} bytes"))
        coding = self._transfer_encoding
        if coding is not None and not coding.lower().rstrip(b" \t").endswith(b"chunked"):
            # llhttp refuses it too, but only after this callback has run.
            raise _Refused(InvalidRequest("the final transfer coding of a request must be chunked"))
        http_version = parser.get_http_version()
        scope = self.scope
        scope["method"] = method.decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        full_path = self.root_path + path
        scope["path"] = full_path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed_url.query or b""
        scope["extensions"] = self._extensions  # type: ignore[typeddict-item]
        keep_alive = http_version != "1.0" and parser.should_keep_alive()

        refusal = None
        if not full_path.startswith(OPEN_PREFIXES):
            refusal = front.refusal()
            if refusal is None and front.admit is not None:
                refusal = front.admit(scope["method"], full_path)
        existing = self.cycle
        self.cycle = self._cycle(scope, keep_alive)
        busy = existing is not None and not existing.response_complete
        if refusal is not None:
            if front.on_refused is not None:
                front.on_refused(refusal.reason)
            # A client waiting for "100 Continue" may send its body or not: the connection's
            # framing is unknown after a refusal, so it ends (RFC 9110 10.1.1).
            keep_alive = keep_alive and not self.expect_100_continue
            self.cycle.keep_alive = keep_alive
            if not busy:
                self._refuse(refusal, full_path, keep_alive)
                return
            app: ASGI3Application = _answer(*error_response(refusal, full_path, keep_alive))
        else:
            app = self.app
        if busy:  # pipelined: queued behind the request being served
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))
        else:
            self._start_asgi_task(self.cycle, app)

    def _cycle(self, scope: HTTPScope, keep_alive: bool) -> RequestResponseCycle:
        return RequestResponseCycle(
            scope=scope,
            transport=self._cycle_transport,  # type: ignore[arg-type]
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=keep_alive,
            on_response=self.on_response_complete,
        )

    def _refuse(self, refusal: Unavailable, path: str, keep_alive: bool) -> None:
        """Answer 503 now, without a task; the body that follows is read and dropped."""
        cycle = self.cycle
        cycle.response_started = cycle.response_complete = True
        defaults = self.server_state.default_headers
        self.transport.write(error_bytes(refusal, path, keep_alive, defaults))
        if keep_alive:
            self.on_response_complete()
        else:
            self._linger()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    # -- requests ----------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        task = self.loop.create_task(cycle.run_asgi(app))
        self.tasks.add(task)
        if cycle.scope["path"].startswith(OPEN_PREFIXES):
            task.add_done_callback(self.tasks.discard)
        else:
            self.front.in_flight += 1
            task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.front.in_flight -= 1

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self._lingering or self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._wait_for_head()


def _answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> ASGI3Application:
    """An app that answers with this response (a refusal queued behind a pipelined request)."""

    async def app(scope: HTTPScope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app  # type: ignore[return-value]


def protocol_class(front: Front) -> type[ServiceProtocol]:
    """ServiceProtocol bound to one server's `front` (what `uvicorn.Config(http=...)` takes)."""
    return type("BoundServiceProtocol", (ServiceProtocol,), {"front": front})
