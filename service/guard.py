"""The outermost ASGI layer: what every HTTP request passes before the app sees it.

- Metrics: requests by route template, method and status, latency, requests in flight.
- Concurrency cap: more than `max_concurrent_requests` requests at once get a fast 503.
- Drain: after SIGTERM, new requests get 503 `shutting_down` (health and metrics stay open).
- Bodies: the whole body must arrive within `body_timeout` (408 and the connection closed
  otherwise: a stalled, lying or endless upload cannot hold a worker), and the bodies being
  received together stay under `max_inflight_body_bytes` (503 beyond).
- A client that goes away mid-upload becomes `ClientDisconnected` (499), never a 500.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BodyBudgetExceeded,
    BodyTimeout,
    ClientDisconnected,
    ServiceError,
    ShuttingDown,
    TooManyRequests,
)
from service.metrics import Metrics
from service.settings import Settings

# The app's error renderer: a ServiceError -> an ASGI response in the one error body shape.
RenderError = Callable[[ServiceError], ASGIApp]
# Always answered, even while overloaded or draining: probes and scrapes must see the truth.
OPEN_PREFIXES = ("/health/", "/metrics", "/v2/health/")
# The method label of the HTTP metrics: the RFC 9110 methods; anything else counts as "other".
METHOD_LABELS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


@dataclass
class Lifecycle:
    """Shared between the guard, the health routes and the draining server."""

    in_flight: int = 0  # guarded requests being served
    body_bytes: int = 0  # bytes of bodies received by requests still in flight
    draining: bool = False  # set on SIGTERM, together with the data plane's own flag

    def others_unready(self) -> str | None:
        """Why another worker process is not ready (service/workers.py overrides this); None
        when every other one is, or when this process is the only one."""
        return None


@dataclass
class Guard:
    app: ASGIApp
    metrics: Metrics
    settings: Settings
    lifecycle: Lifecycle
    render: RenderError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            if scope["path"].startswith(OPEN_PREFIXES):
                await self.app(scope, receive, send_with_status)
            else:
                await self._guarded(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            # A closed set: any other token a client sends is "other" (issue 21: bounded series).
            method = scope["method"] if scope["method"] in METHOD_LABELS else "other"
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_duration.labels(route, method).observe(time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        life = self.lifecycle
        refusal: ShuttingDown | TooManyRequests | None = None
        if life.draining:
            refusal = ShuttingDown("the service is shutting down; retry on another instance")
        elif life.in_flight >= self.settings.max_concurrent_requests:
            refusal = TooManyRequests(
                f"more than {self.settings.max_concurrent_requests} requests in flight; retry later"
            )
        if refusal is not None:
            self.metrics.refused.labels(refusal.reason).inc()
            await self.render(refusal)(scope, receive, send)
            return
        life.in_flight += 1
        body = BodyReader(receive, self.settings, life)
        try:
            await self.app(scope, body.receive, send)
        finally:
            life.in_flight -= 1
            life.body_bytes -= body.received


class BodyReader:
    """Wraps `receive` while the body streams in: deadline, shared byte budget, disconnects."""

    def __init__(self, receive: Receive, settings: Settings, lifecycle: Lifecycle) -> None:
        self._receive = receive
        self._deadline = time.monotonic() + settings.body_timeout
        self._timeout = settings.body_timeout
        self._budget = settings.max_inflight_body_bytes
        self._life = lifecycle
        self.received = 0
        self.complete = False

    async def receive(self) -> Message:
        if self.complete:  # after the body: only http.disconnect is left to wait for
            return await self._receive()
        left = self._deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(left, 0.0)):  # a timer, not a task per message
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {self._timeout:g} s"
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected during the upload")
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            self.received += size
            self._life.body_bytes += size
            if self._life.body_bytes > self._budget:
                raise BodyBudgetExceeded(
                    "too many request bodies are being received at once; retry later"
                )
            if not message.get("more_body", False):
                self.complete = True
        return message


# An ASGI scope extension of the service's HTTP front (service/protocol.py): a function that
# registers a callback for the loss of the connection and returns what unregisters it.
ON_DISCONNECT = "rcegate.on_disconnect"
OnDisconnect = Callable[[Callable[[], None]], Callable[[], None]]


class CancelOnDisconnect:
    """See `cancel_on_disconnect`."""

    def __init__(self, receive: Receive, scope: Scope | None) -> None:
        self._receive = receive
        self._register: OnDisconnect | None = None
        if scope is not None:
            self._register = scope.get("extensions", {}).get(ON_DISCONNECT)
        self._gone = False
        self._stop: Callable[[], None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        if self._register is not None:
            self._stop = self._register(self._lost)
        else:
            self._watcher = asyncio.create_task(self._watch())

    def _lost(self) -> None:
        self._gone = True
        self._task.cancel()

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._lost()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self._stop is not None:
            self._stop()
        if self._watcher is not None:
            self._watcher.cancel()
        if isinstance(exc, asyncio.CancelledError) and self._gone:
            self._task.uncancel()
            raise ClientDisconnected("the client disconnected before the answer") from None


def cancel_on_disconnect(receive: Receive, scope: Scope | None = None) -> CancelOnDisconnect:
    """Cancel the current task when the client disconnects (the body must be fully read).

    The task then raises `ClientDisconnected`, so queued work is given back at once. Behind
    the service's own HTTP front, pass the request's `scope`: the connection itself reports
    its loss (no watcher task per request); elsewhere a task waits for `http.disconnect`.
    """
    return CancelOnDisconnect(receive, scope)
