"""`rcegate serve`: uvicorn with the connection limits and the graceful drain of the service.

Connections (service/protocol.py): at most `max_connections` (the oldest one still waiting for a
request head is closed first), request heads of at most `max_header_bytes`, idle keep-alive
connections closed after `keep_alive_timeout`, a connection that has not sent a complete request
head within `header_timeout` (slow headers, an idle connection that never speaks) closed, and
requests refused with 503 as their head arrives when the server is saturated.

Drain (SIGTERM or SIGINT): `/health/ready` turns 503 at once and new requests get 503
`shutting_down` while the listener stays open, so a load balancer sees the instance leave
instead of a refused connection; requests already accepted or queued finish; the process exits
when nothing is in flight, or after `drain_seconds` at most. A second signal exits at once.

gRPC (the Open Inference Protocol, service/oip/grpc.py) starts after the HTTP listener on
`grpc_port` (0: off) and shares the drain: it refuses new work with UNAVAILABLE once draining,
and stops (letting its calls finish) before the data plane closes. A gRPC port that cannot be
bound fails the start-up, as an HTTP port does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from grpc import aio
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE

from service.dataplane import DataPlane
from service.guard import Lifecycle
from service.metrics import Metrics
from service.oip.grpc import start_server as start_grpc
from service.protocol import Admit, Front, Limits, protocol_class
from service.settings import Settings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        drain_seconds: float,
        *,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(config)
        self._app = app
        self._plane: DataPlane = app.state.plane
        self._lifecycle: Lifecycle = self._plane.lifecycle
        self._drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc: aio.Server | None = None
        # Worker processes (service/workers.py) share the gRPC port with SO_REUSEPORT.
        self._reuse_port = reuse_port
        self._signalled = False  # our own first signal, whatever the shared drain flag says

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        loading: asyncio.Task[None] | None = getattr(self._app.state, "loading", None)
        if loading is not None:  # the lifespan loads the models in a thread
            loading.add_done_callback(lambda _: settle_gc())
        settings: Settings = self._app.state.settings
        if self.should_exit or not settings.grpc_port:
            return
        state = self._app.state
        try:
            self._grpc = await start_grpc(
                state.plane,
                state.repository,
                state.lifecycle,
                state.metrics,
                settings,
                reuse_port=self._reuse_port,
            )
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            logger.error("cannot serve gRPC on port %d: %s", settings.grpc_port, exc)
            for server in self.servers:
                server.close()
            await self.lifespan.shutdown()
            raise SystemExit(STARTUP_FAILURE) from None

    async def shutdown(self, sockets: Any = None) -> None:
        if self._grpc is not None:
            # The drain already waited for the calls in flight; a short grace for stragglers.
            await self._grpc.stop(grace=1.0)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal: exit now
            self.force_exit = True
            return
        self._signalled = True
        self._plane.drain()
        logger.info(
            "signal %d: draining (ready is 503, new requests refused) for at most %g s",
            sig,
            self._drain_seconds,
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self._drain_seconds
        while time.monotonic() < deadline and (self._lifecycle.in_flight or self._plane.busy):
            await asyncio.sleep(0.05)  # polling the in-flight count, not timing anything
        left = self._lifecycle.in_flight
        if left:
            logger.warning("drain time is up with %d request(s) still in flight", left)
        else:
            logger.info("drained: no request in flight")
        self.should_exit = True


# Allocations of tracked objects between collections of the youngest generation (CPython's
# default: 700). Request garbage is freed by reference counting; collecting it every 700
# allocations cost a fifth of the event loop's time at 64 connections.
GC_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once the models are loaded: what is alive now (the app, the models and their manifests,
    some 100,000 objects) is moved out of the cyclic collector's reach (`gc.freeze`), and the
    youngest generation is collected less often. Full collections of a loaded server scanned
    all of it: up to 100 ms each, every request waiting."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, oldest)
    logger.debug("gc: %d objects frozen, threshold %s", gc.get_freeze_count(), gc.get_threshold())


def uvicorn_config(
    app: ASGIApp,
    settings: Settings,
    metrics: Metrics | None = None,
    admit: Admit | None = None,
) -> uvicorn.Config:
    """uvicorn as `rcegate serve` runs it (the benchmark's echo floor uses the same): uvloop
    and the service's HTTP protocol (service/protocol.py), which also bounds connections,
    heads and requests in flight and asks `admit` (the data plane's queues) as each head
    arrives; its refusals are counted in `metrics` when given."""
    limits = Limits(
        header_timeout=settings.header_timeout,
        keep_alive_timeout=settings.keep_alive_timeout,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections,
        max_requests=settings.max_concurrent_requests,
        max_loop_lag=settings.max_loop_lag,
    )
    on_refused = None if metrics is None else (lambda reason: metrics.refused.labels(reason).inc())
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(Front(limits, admit, on_refused)),
        loop="uvloop",
        log_level=settings.log_level,
        log_config=None,  # keep the one logging configuration made by the CLI
        access_log=False,  # the metrics count every request; no line per request under load
        limit_concurrency=None,  # connections and requests are bounded by the protocol
        timeout_keep_alive=settings.keep_alive_timeout,
        timeout_graceful_shutdown=1,  # the drain already waited for the requests in flight
        # X-Forwarded-For/-Proto only from configured proxies (uvicorn trusts 127.0.0.1 else).
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )


def serve(app: FastAPI, settings: Settings) -> None:
    """Run the app with the service's connection limits and graceful drain (one process; the
    worker processes of service/workers.py run a DrainingServer each on the shared socket)."""
    DrainingServer(service_config(app, settings), app, settings.drain_seconds).run()


def service_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """`uvicorn_config` for the service's app: head-time refusals asked of its data plane and
    counted in its metrics."""
    plane: DataPlane = app.state.plane
    return uvicorn_config(app, settings, app.state.metrics, plane.refusal_at_head)
