"""What runs in each worker process of `rcegate serve --workers N` (service/workers.py is the
supervisor): the app on the shared HTTP socket, its readiness and heartbeat reported in the
shared block, a replacement that loads its models before it accepts a connection, and a drain
of its own when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.metrics import WorkerCollector
from service.server import DrainingServer, service_config
from service.settings import Settings
from service.workers import (
    BEAT_SECONDS,
    READY,
    REPLACING,
    STARTING,
    STARTUP_FAILURE,
    Shared,
    WorkerLifecycle,
)

logger = logging.getLogger(__name__)


class WorkerServer(DrainingServer):
    """A DrainingServer that reports its readiness and heartbeat to the supervisor, and drains
    by itself if the supervisor is gone."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        settings: Settings,
        shared: Shared,
        index: int,
        parent: int,
    ) -> None:
        super().__init__(config, app, settings.drain_seconds, reuse_port=True)
        self.shared = shared
        self.index = index
        self.parent = parent
        self._beating: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        logger.info("worker %d (pid %d) is accepting connections", self.index + 1, os.getpid())
        self._beating = asyncio.create_task(self._beat())
        self._app.state.loading.add_done_callback(lambda _: self.loaded())

    def loaded(self) -> None:
        """Report this worker ready once its models loaded (and warmed up), else starting."""
        if self._app.state.repository.ready:
            logger.info("worker %d (pid %d) is ready", self.index + 1, os.getpid())
            self.shared.states[self.index] = READY
        else:  # the models did not load: this worker cannot serve, and says so
            self.shared.states[self.index] = STARTING

    def beat(self) -> None:
        """One heartbeat; drain when the supervisor is gone (this process was re-parented)."""
        self.shared.beats[self.index] = time.monotonic()
        if os.getppid() != self.parent and not self._signalled:
            logger.warning("the supervisor (pid %d) is gone: draining", self.parent)
            self.handle_exit(signal.SIGTERM, None)

    async def _beat(self) -> None:
        while not self.should_exit:
            self.beat()
            await asyncio.sleep(BEAT_SECONDS)


def load_before_accepting(app: FastAPI) -> None:
    """Hold the server's start-up until the models are loaded and warmed up: a replacement
    worker then accepts no connection it could only answer with 503."""
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with original(app) as state:
            await asyncio.shield(app.state.loading)
            yield state

    app.router.lifespan_context = lifespan


def worker_app(settings: Settings, shared: Shared, index: int) -> FastAPI:
    """The app of worker `index`: readiness and drain across workers, /metrics with the
    workers' state; a replacement loads its models before it accepts a connection."""
    app = create_app(settings, WorkerLifecycle(shared, index))
    app.state.metrics.scrape_collectors.append(WorkerCollector(shared.snapshot))
    if shared.states[index] == REPLACING:
        load_before_accepting(app)
    return app


def main(index: int, settings: Settings, sock: socket.socket, shared: Shared, parent: int) -> None:
    """A worker process's main: the app on the shared socket until drained."""
    # Its own process group: a Ctrl-C in the terminal reaches only the supervisor, which
    # drains every worker once (a signal straight to the worker would count as a second one).
    os.setpgrp()
    logging.basicConfig(
        format=f"%(asctime)s %(levelname)s [worker {index + 1}] %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    app = worker_app(settings, shared, index)
    server = WorkerServer(service_config(app, settings), app, settings, shared, index, parent)
    server.run(sockets=[sock])
    # Everything is closed by now; tearing the interpreter down (ONNX Runtime sessions and
    # all) would only delay the exit the supervisor waits for by seconds.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else STARTUP_FAILURE)
