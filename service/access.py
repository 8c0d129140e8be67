"""Access control, request ids and the access log: the ASGI layer just inside the `Guard`.

- API keys (optional): `Settings.api_keys` maps a client id to the sha256 of its key; a request
  presents the key as `Authorization: Bearer <key>` or `x-api-key: <key>`. The presented key is
  hashed and compared with every stored hash in constant time. Health endpoints stay open;
  /metrics needs a key only with `metrics_require_key`. A refusal is 401 with
  `WWW-Authenticate: Bearer`. Keys never reach a log line (only the client id does).
  `ApiKeys.authorize` takes any mapping of lower-case header names, so gRPC metadata can use it.
- Request ids: a client's `X-Request-ID` (1-128 of A-Z a-z 0-9 . _ : -) is echoed, anything else
  replaced by a fresh one; every response carries it.
- Access log: one JSON line per request (id, client, method, path, route, status, duration), no
  bodies, no query, no headers. JSON escapes every control character, so client input cannot
  split a line. Lines go through a bounded buffer to a writer thread that logs them in batches:
  under overload the event loop only appends, and when the writer falls behind lines are
  dropped and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import demo
from service.errors import Unauthorized
from service.guard import RenderError
from service.metrics import Metrics
from service.settings import Settings

# Always open: probes must work without credentials. Exact paths, not prefixes, so no other
# path can ever fall under them.
HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MAX_LOGGED_PATH = 256
ACCESS_LOGGER = "rcegate.access"
ACCESS_QUEUE = 10_000


@dataclass(frozen=True)
class Identity:
    """Who sent a request: an API key's client id, or None when keys are off."""

    client_id: str


class ApiKeys:
    """The configured keys (as sha256 digests); `authorize` checks a request's headers."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._digests = [(ident, bytes.fromhex(digest)) for ident, digest in digests.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authorize(self, headers: Mapping[str, str]) -> Identity | None:
        """The identity behind `headers` (lower-case names); None when keys are off.

        Raises Unauthorized when keys are on and no valid key was presented.
        """
        if not self._digests:
            return None
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for ident, stored in self._digests:  # no early exit: every key costs the same
            if hmac.compare_digest(digest, stored) and found is None:
                found = ident
        if found is None:
            raise Unauthorized("the API key is not valid")
        return Identity(found)


# Where the access layer leaves who asks, in the ASGI scope's state, for `request_client`.
_CLIENT = "client"


def request_client(scope: Scope) -> str | None:
    """Who sent this request (`key:<id>` or `addr:<ip>`), as the access layer named it; None
    when no access layer ran (a bare app in tests)."""
    client: str | None = scope.get("state", {}).get(_CLIENT)
    return client


def client_name(identity: Identity | None, address: str | None) -> str:
    """How a client is known to prober tracking and the access log: `key:<id>` or `addr:<ip>`."""
    if identity is not None:
        return f"key:{identity.client_id}"
    return f"addr:{address or 'unknown'}"


def presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def hash_key(key: str) -> str:
    """The sha256 (hex) of an API key, as `Settings.api_keys` stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}


def printable(text: str, limit: int = 1024) -> str:
    """`text` safe for one log line: control characters escaped, length bounded."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class AccessLog:
    """One JSON line per request, written in batches by a thread from a bounded buffer
    (dropped and counted when full). The event loop only appends a line: no lock, no wake-up;
    the writer collects what is there every `FLUSH_SECONDS` and logs it as one record."""

    FLUSH_SECONDS = 0.1

    def __init__(self, metrics: Metrics, capacity: int = ACCESS_QUEUE) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)
        if not self.logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False
        self._lines: deque[str] = deque()
        self._capacity = capacity
        self._dropped = metrics.access_log_dropped
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, record: dict[str, object]) -> None:
        if self._thread is None:
            self._closing.clear()
            self._thread = threading.Thread(target=self._run, name="rcegate-access", daemon=True)
            self._thread.start()
        if len(self._lines) >= self._capacity:
            self._dropped.inc()
            return
        line = orjson.dumps(record).decode()
        if not line.isascii():  # escape as json does, so no line separator (U+2028...) is raw
            line = json.dumps(record, separators=(",", ":"))
        self._lines.append(line)

    def _flush(self) -> None:
        lines = self._lines
        batch = [lines.popleft() for _ in range(len(lines))]
        if batch:
            self.logger.info("\n".join(batch))

    def _run(self) -> None:
        while not self._closing.wait(self.FLUSH_SECONDS):
            self._flush()
        self._flush()

    def close(self) -> None:
        """Write what is buffered, then stop the writer thread."""
        if self._thread is not None:
            self._closing.set()
            self._thread.join(timeout=5)
            self._thread = None


class AccessLayer:
    """Request id, API-key check and access log for every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        keys: ApiKeys,
        render: RenderError,
        log: AccessLog | None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.render = render
        self.log = log
        self.metrics_open = not settings.metrics_require_key
        self.demo_open = settings.demo
        # Generated ids: a random per-process prefix and a counter (cheaper than uuid4 per request).
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    def needs_key(self, path: str) -> bool:
        if not self.keys.enabled or path in HEALTH_PATHS:
            return False
        if self.demo_open and demo.is_open(path):  # static: its script sends the user's key
            return False
        return not (path == METRICS_PATH and self.metrics_open)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = _headers(scope["headers"])
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else self._new_id()
        status = 500
        peer = scope.get("client")
        who = client_name(None, peer[0] if peer else None)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            identity = None
            if self.needs_key(scope["path"]):
                try:
                    identity = self.keys.authorize(headers)
                except Unauthorized as exc:
                    await self.render(exc)(scope, receive, send_with_id)
                    return
            who = client_name(identity, peer[0] if peer else None)
            # Read by the data plane's prober tracking (via the adapters) and by the routes.
            scope.setdefault("state", {})[_CLIENT] = who
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log is not None:
                route = getattr(scope.get("route"), "path", None)
                self.log.write(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": request_id,
                        "client": who,
                        "method": scope["method"],
                        "path": scope["path"][:_MAX_LOGGED_PATH],
                        "route": route,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    }
                )
