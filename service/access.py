"""Access control, request ids and the access log: the ASGI layer just inside the `Guard`.

- API keys (optional): `Settings.api_keys` maps a client id to the sha256 of its key; a request
  presents the key as `Authorization: Bearer <key>` or `x-api-key: <key>`. The presented key is
  hashed and compared with every stored hash in constant time. Health endpoints stay open;
  /metrics needs a key only with `metrics_require_key`, and then one of `metrics_keys` (a
  client's key does not open it). A refusal is 401 with `WWW-Authenticate: Bearer`. Keys never
  reach a log line (only the client id does). `ApiKeys.authorize` takes any mapping of
  lower-case header names, so gRPC metadata can use it.
- Client addresses: a connection's peer, or, only from a configured proxy
  (`forwarded_allow_ips`), the address its X-Forwarded-For names (uvicorn does it for HTTP,
  `TrustedProxies` for gRPC); gRPC peers (`ipv4:1.2.3.4:5`, `ipv6:[2001:db8::1]:443`) are read
  by `peer_address`.
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
import ipaddress
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
from urllib.parse import unquote

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
_MAX_LOGGED_METHOD = 16
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


def peer_address(peer: str) -> str | None:
    """The address of a gRPC peer: `ipv4:10.0.0.1:5000` -> `10.0.0.1`, `ipv6:[2001:db8::1]:443`
    (brackets maybe percent-encoded) -> `2001:db8::1`, `unix:...` -> `unix`; None otherwise."""
    scheme, _, rest = unquote(peer[:256]).partition(":")
    if scheme.startswith("unix"):
        return "unix"
    if scheme == "ipv6" and rest.startswith("["):
        host = rest[1 : rest.find("]")]
    elif scheme in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
    else:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class TrustedProxies:
    """`forwarded_allow_ips`: peers whose X-Forwarded-For is believed (as uvicorn does on HTTP:
    the rightmost address that is not itself a trusted proxy)."""

    MAX_HOPS = 32

    def __init__(self, entries: Iterable[str]) -> None:
        entries = list(entries)
        self._any = "*" in entries
        self._networks = [ipaddress.ip_network(e, strict=False) for e in entries if e != "*"]

    def trusts(self, address: str | None) -> bool:
        if address is None or not (self._any or self._networks):
            return False
        if self._any:
            return True
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self._networks)

    def client(self, peer: str | None, forwarded: Iterable[str]) -> str | None:
        """Who the client is: `peer`, unless `peer` is a trusted proxy that forwarded for
        someone (then the rightmost untrusted address of X-Forwarded-For)."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded for hop in value.split(",")][-self.MAX_HOPS :]
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                return None  # a proxy we trust wrote something that is not an address
            if not self.trusts(address):
                return address
        return peer


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
            self.logger.propagate = False
        if self.logger.level == logging.NOTSET:
            # The access log is on by setting: a handler an operator attached without a level
            # must not inherit root's WARNING and silently lose every line.
            self.logger.setLevel(logging.INFO)
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
        # Reading /metrics is the operator's: its own keys, never a client's (issue 21).
        self.metrics_keys = ApiKeys(settings.metrics_keys)
        self.demo_open = settings.demo
        # Generated ids: a random per-process prefix and a counter (cheaper than uuid4 per request).
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count(1)

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    def needs_key(self, path: str) -> bool:
        return self.keys_for(path) is not None

    def keys_for(self, path: str) -> ApiKeys | None:
        """The keys that open `path`; None when it is open."""
        if path == METRICS_PATH:
            return None if self.metrics_open else self.metrics_keys
        if not self.keys.enabled or path in HEALTH_PATHS:
            return None
        if self.demo_open and demo.is_open(path):  # static: its script sends the user's key
            return None
        return self.keys

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
            keys = self.keys_for(scope["path"])
            if keys is not None:
                try:
                    identity = keys.authorize(headers)
                except Unauthorized as exc:
                    await self.render(exc)(scope, receive, send_with_id)
                    return
            if keys is self.metrics_keys and identity is not None:
                identity = Identity(f"metrics.{identity.client_id}")  # never a client's policy
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
                        "method": scope["method"][:_MAX_LOGGED_METHOD],
                        "path": scope["path"][:_MAX_LOGGED_PATH],
                        "route": route,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    }
                )
