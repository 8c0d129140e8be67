"""Worker processes: `rcegate serve --workers N` runs N server processes behind one HTTP port and
one gRPC port (uvicorn's and gunicorn's multi-process supervisors are the model). This module is
the supervisor and what it shares with the workers; service/worker_process.py runs in each worker.

The supervisor (the `rcegate serve` process) never loads a model. It:

- binds the HTTP listening socket once and hands it to every worker: the kernel queues new
  connections on that one socket and whichever worker is free accepts next, so a worker that
  dies takes only the connections it had accepted with it. gRPC cannot be handed a listening
  socket, so every worker binds the gRPC port with SO_REUSEPORT, after the supervisor checked
  that no other program holds it (a port in use still fails the start-up, with exit status 3);
- creates a fresh `PROMETHEUS_MULTIPROC_DIR` before any worker starts and removes it at exit:
  one scrape of /metrics on any worker merges every worker's counters and histograms, and a
  dead worker's live-only gauges (requests in flight, queue depth) are removed
  (`mark_process_dead`) while its counters keep counting in the totals;
- shares a small block of memory with the workers: each worker's state (starting, ready,
  replacing) and heartbeat, the drain flag and the restart count. Every worker's
  /health/ready, /v2/health/ready and gRPC ServerReady answer for all of them: ready only when
  every worker is;
- on SIGTERM or SIGINT sets the drain flag (every worker refuses new work at once and reports
  not ready) and forwards SIGTERM: each worker finishes what it accepted within
  `drain_seconds`, then exits. A second signal stops the workers at once;
- replaces a worker that dies, or whose event loop has not beaten for `worker_timeout` seconds
  (killed first): the replacement loads and warms up its models before it accepts a
  connection, so the live workers carry the traffic meanwhile and readiness does not drop. A
  worker that fails its start-up (exit status 3: a port it cannot bind, a broken app) stops
  the whole server, since every replacement would fail the same way.

Threads: with `intra_op_threads` 0 (ONNX Runtime's default of one thread per core), each
worker gets cores // N intra-op threads (at least 1), and unless `decode_workers` is set, at
most that many decode threads, so N workers do not oversubscribe the cores. Limits stay per
worker (queue, concurrency, connections), except the body-bytes budget, which is split so the
container's memory bound holds. `auto` picks N from the cores and the provider
(`auto_workers`; docs/serving.md, "Worker processes", has the measurements behind it).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import Any

from service.guard import Lifecycle
from service.settings import Settings

logger = logging.getLogger(__name__)

# A worker slot's state in the shared block.
STARTING, READY, REPLACING = 0, 1, 2
STATE_NAMES = {STARTING: "starting", READY: "ready", REPLACING: "replacing"}
# Flags in the shared block.
DRAIN, RESTARTS = 0, 1
# Exit status of a worker (or of `rcegate serve`) that could not start: uvicorn's own.
STARTUP_FAILURE = 3
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's switch to multi-process mode
BEAT_SECONDS = 0.5  # how often a worker's event loop writes its heartbeat
MAX_BACKOFF_SECONDS = 30.0  # between replacements of a worker that keeps dying before ready
KILL_GRACE_SECONDS = 5.0  # after drain_seconds, before the supervisor kills what is left
# Processes that each own a CUDA context stop scaling at about four on one GPU (measured on an
# H200: 727 images/s with 1, 1,751 with 4, 1,723 with 8, 1,691 with 12; docs/serving.md).
CUDA_WORKERS = 4


# -- how many workers, and their settings ---------------------------------------------------


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, bounded by a cgroup v2 CPU quota (a
    container's CPU limit), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def uses_cuda(settings: Settings) -> bool:
    """Whether the models will run on CUDA: asked for, or `auto` with onnxruntime's CUDA
    provider and a GPU visible to this process."""
    if settings.providers != "auto":
        return settings.providers == "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if not glob.glob("/dev/nvidia[0-9]*"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def auto_workers(cuda: bool, cores: int) -> int:
    """`--workers auto`. CUDA: one worker per core up to CUDA_WORKERS, where contexts on one
    GPU stop scaling. CPU: one worker per core, each with one ONNX Runtime thread: the event
    loop is what one process runs out of first, and on 2 cores two workers answered 1.19x one
    worker's images/s on a quiet machine and 0.97x on a busy one (docs/serving.md)."""
    if cuda:
        return max(1, min(CUDA_WORKERS, cores))
    return max(1, cores)


def worker_count(settings: Settings, cores: int | None = None) -> int:
    """The number of worker processes `rcegate serve` runs for these settings."""
    if settings.workers != "auto":
        return settings.workers
    return auto_workers(uses_cuda(settings), cores or available_cores())


def worker_settings(settings: Settings, count: int, cores: int) -> Settings:
    """One worker's settings: threads and the body budget shared out between `count` workers."""
    share = max(1, cores // count)
    update: dict[str, Any] = {"workers": count}
    if settings.intra_op_threads == 0:
        update["intra_op_threads"] = share
    if "decode_workers" not in settings.model_fields_set:
        update["decode_workers"] = min(settings.decode_workers, share)
    update["max_inflight_body_bytes"] = max(
        settings.max_body_bytes, settings.max_inflight_body_bytes // count
    )
    return settings.model_copy(update=update)


# -- what the supervisor and the workers share ----------------------------------------------


class Shared:
    """A block of shared memory, inherited by every spawned worker (replacements included)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.count = count
        self.states = context.RawArray(ctypes.c_byte, count)
        self.beats = context.RawArray(ctypes.c_double, count)  # time.monotonic(), system-wide
        self.flags = context.RawArray(ctypes.c_longlong, 2)

    def snapshot(self) -> tuple[dict[str, int], int]:
        """Workers by state name, and the restart count (for /metrics)."""
        states = dict.fromkeys(STATE_NAMES.values(), 0)
        for state in self.states:
            states[STATE_NAMES[state]] += 1
        return states, int(self.flags[RESTARTS])


class WorkerLifecycle(Lifecycle):
    """A worker's lifecycle: draining once this worker was signalled or the supervisor set the
    shared drain flag; `others_unready` reports the other workers' readiness."""

    def __init__(self, shared: Shared, index: int) -> None:
        self.shared = shared
        self._index = index
        self._draining = False
        super().__init__()

    @property
    def draining(self) -> bool:
        return self._draining or bool(self.shared.flags[DRAIN])

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value

    def others_unready(self) -> str | None:
        shared = self.shared
        for i in range(shared.count):
            # A replacement takes no connection before it is ready: it does not count.
            if i != self._index and shared.states[i] == STARTING:
                return f"worker {i + 1} of {shared.count} is still starting"
        return None


# -- the worker process ---------------------------------------------------------------------


def run_worker(
    index: int, settings: Settings, sock: socket.socket, shared: Shared, parent: int
) -> None:
    """A worker process's main (service/worker_process.py). Imported there only when the worker
    runs, so the supervisor never loads the app, ONNX Runtime or a model."""
    from service.worker_process import main

    main(index, settings, sock, shared, parent)


# -- the supervisor -------------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    process: SpawnProcess

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


def grpc_port_free(host: str, port: int) -> OSError | None:
    """Whether host:port can be bound by a socket that does not share it (so no other program
    listens there); the error otherwise. The workers then bind it with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def bind_http(host: str, port: int) -> socket.socket:
    """The one HTTP listening socket every worker accepts on (listening from here on, so
    connections queue even before the first worker is up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)  # uvicorn's default backlog
    sock.set_inheritable(True)
    return sock


# What a worker process runs: run_worker, or a stand-in in the supervisor's own tests.
WorkerMain = Callable[[int, Settings, socket.socket, Shared, int], None]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        cores: int | None = None,
        target: WorkerMain = run_worker,
    ) -> None:
        self.cores = cores or available_cores()
        self._target = target
        self.settings = settings
        self.count = count
        self.worker_settings = worker_settings(settings, count, self.cores)
        self.workers: dict[int, Worker] = {}
        self._context = multiprocessing.get_context("spawn")
        self._pending: dict[int, float] = {}  # slot -> when its replacement may start
        self._failures = [0] * count  # deaths in a row before ready, per slot
        self._signals: list[int] = []
        self._draining = False
        self._kill_at: float | None = None
        self._exit_code = 0
        self.shared = Shared(count)
        self._sock: socket.socket | None = None
        self.metrics_dir: str | None = None

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until drained; the exit status of `rcegate serve`."""
        s = self.settings
        if s.grpc_port:
            error = grpc_port_free(s.host, s.grpc_port)
            if error is not None:
                logger.error("cannot serve gRPC on port %d: %s", s.grpc_port, error)
                return STARTUP_FAILURE
        try:
            self._sock = bind_http(s.host, s.port)
        except OSError as exc:
            logger.error("cannot serve HTTP on %s:%d: %s", s.host, s.port, exc)
            return 1
        given = os.environ.get(MULTIPROC_ENV)  # an operator's choice of parent directory
        self.metrics_dir = tempfile.mkdtemp(prefix="rcegate-metrics-", dir=given or None)
        os.environ[MULTIPROC_ENV] = self.metrics_dir  # inherited by every worker
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        host, port = self._sock.getsockname()[:2]
        w = self.worker_settings
        logger.info(
            "%d worker processes on http://%s:%d%s; %d ORT intra-op and %d decode threads each "
            "(%d cores); metrics of every worker in %s",
            self.count,
            host,
            port,
            f" and gRPC port {s.grpc_port}" if s.grpc_port else "",
            w.intra_op_threads,
            w.decode_workers,
            self.cores,
            self.metrics_dir,
        )
        try:
            for index in range(self.count):
                self._start(index)
            self._loop(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_read.close()
            wake_write.close()
            self._sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if given is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = given
        return self._exit_code

    def _loop(self, wake: socket.socket) -> None:
        while self.workers or (self._pending and not self._draining):
            sentinels = [worker.process.sentinel for worker in self.workers.values()]
            wait([*sentinels, wake], timeout=BEAT_SECONDS)
            try:
                while wake.recv(64):
                    pass
            except BlockingIOError:
                pass
            self._handle_signals()
            self._reap()
            self._start_replacements()
            self._check_heartbeats()
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                for worker in self.workers.values():
                    logger.error("worker %d (pid %d) still running: killed", *self._who(worker))
                    worker.process.kill()
                self._kill_at = time.monotonic() + KILL_GRACE_SECONDS
                self._exit_code = self._exit_code or 1

    # -- workers ----------------------------------------------------------------------------

    def _who(self, worker: Worker) -> tuple[int, int]:
        return worker.index + 1, worker.pid

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=self._target,
            args=(index, self.worker_settings, self._sock, self.shared, os.getpid()),
            name=f"rcegate-worker-{index + 1}",
        )
        process.start()
        worker = Worker(index, process)
        self.shared.beats[index] = 0.0
        self.workers[index] = worker
        logger.info("worker %d started (pid %d)", *self._who(worker))

    def _reap(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        for index, worker in list(self.workers.items()):
            code = worker.process.exitcode
            if code is None:
                continue
            del self.workers[index]
            worker.process.join()
            mark_process_dead(worker.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self._draining:
                if code != 0:
                    self._exit_code = self._exit_code or 1
                logger.info("worker %d (pid %d) exited with %s", *self._who(worker), code)
                continue
            if code == STARTUP_FAILURE:
                logger.error(
                    "worker %d (pid %d) could not start (exit %d): stopping",
                    *self._who(worker),
                    code,
                )
                self._exit_code = STARTUP_FAILURE
                self._drain()
                continue
            was_ready = self.shared.states[index] == READY
            self._failures[index] = 0 if was_ready else self._failures[index] + 1
            failures = self._failures[index]
            delay = 0.0 if not failures else min(MAX_BACKOFF_SECONDS, 2.0 ** (failures - 1))
            how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
            logger.error(
                "worker %d (pid %d) %s; replacing it%s",
                *self._who(worker),
                how,
                f" in {delay:g} s" if delay else "",
            )
            self.shared.flags[RESTARTS] += 1
            # The replacement of a worker that was serving takes no connection before it is
            # ready, so readiness holds meanwhile; a worker of the first start keeps it off.
            if self.shared.states[index] == READY:
                self.shared.states[index] = REPLACING
            self._pending[index] = time.monotonic() + delay

    def _start_replacements(self) -> None:
        if self._draining:
            self._pending.clear()
            return
        now = time.monotonic()
        for index, when in list(self._pending.items()):
            if when <= now:
                del self._pending[index]
                self._start(index)

    def _check_heartbeats(self) -> None:
        timeout = self.settings.worker_timeout
        if not timeout or self._draining:
            return
        now = time.monotonic()
        for worker in self.workers.values():
            beat = self.shared.beats[worker.index]
            if self.shared.states[worker.index] == READY and beat and now - beat > timeout:
                logger.error(
                    "worker %d (pid %d) has not answered for %.0f s: killing it",
                    *self._who(worker),
                    now - beat,
                )
                worker.process.kill()
                self.shared.beats[worker.index] = 0.0  # one kill per hang

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)  # handled in the loop (woken by the wakeup fd)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if not self._draining:
                logger.info(
                    "signal %d: draining %d workers for at most %g s",
                    sig,
                    len(self.workers),
                    self.settings.drain_seconds,
                )
                self._drain()
            else:
                logger.info("signal %d again: stopping the workers now", sig)
                self._terminate_all()
                self._kill_at = time.monotonic() + KILL_GRACE_SECONDS

    def _drain(self) -> None:
        self._draining = True
        self.shared.flags[DRAIN] = 1  # every worker refuses new work from now on
        self._terminate_all()
        self._kill_at = time.monotonic() + self.settings.drain_seconds + KILL_GRACE_SECONDS

    def _terminate_all(self) -> None:
        for worker in self.workers.values():
            if worker.process.exitcode is None:
                os.kill(worker.pid, signal.SIGTERM)


def run_supervisor(settings: Settings, count: int) -> int:
    """`rcegate serve` with `count` worker processes; returns the exit status."""
    return Supervisor(settings, count).run()
