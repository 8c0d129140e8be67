"""Stand-in worker processes for the supervisor's tests (tests/service/test_workers.py).

Real spawned processes that follow the worker protocol of service/workers.py (state, heartbeat,
exit on SIGTERM) without loading any model; what each does depends on the restart count it
starts with. A module of its own, importing little, so that each spawn starts in a fraction of
a second.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from service.settings import Settings
from service.workers import READY, RESTARTS, STARTING, STARTUP_FAILURE, Shared


def _stand_in(behaviour: str, index: int, shared: Shared) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    first_life = shared.flags[RESTARTS] == 0
    if behaviour == "fail_start":
        os._exit(STARTUP_FAILURE)
    shared.beats[index] = time.monotonic()
    shared.states[index] = READY
    if index == 0 and first_life and behaviour == "crash":
        os._exit(1)
    while True:
        if not (index == 0 and first_life and behaviour == "hang"):
            shared.beats[index] = time.monotonic()
        time.sleep(0.05)


def fail_start(index: int, settings: Settings, sock: socket.socket, shared: Shared, _: int) -> None:
    """Every worker fails its start-up (exit 3)."""
    _stand_in("fail_start", index, shared)


def crash(index: int, settings: Settings, sock: socket.socket, shared: Shared, _: int) -> None:
    """Worker 1 dies (exit 1) once it was ready; its replacement and worker 2 serve on."""
    _stand_in("crash", index, shared)


def hang(index: int, settings: Settings, sock: socket.socket, shared: Shared, _: int) -> None:
    """Worker 1 turns ready, then its heartbeat stops; its replacement beats."""
    _stand_in("hang", index, shared)


def slow_drain(index: int, settings: Settings, sock: socket.socket, shared: Shared, _: int) -> None:
    """Ready at once; a first SIGTERM starts a drain that would never end by itself (the
    stand-in shows it by going back to `starting`), a second one exits, as a real worker's
    second signal does."""
    signals: list[int] = []

    def on_term(*_: object) -> None:
        signals.append(1)
        if len(signals) >= 2:
            os._exit(0)
        shared.states[index] = STARTING

    signal.signal(signal.SIGTERM, on_term)
    shared.states[index] = READY
    while True:
        shared.beats[index] = time.monotonic()
        time.sleep(0.05)
