"""Work budgets shared by the protocols of one worker: bytes held, and where parsing runs.

- `Reservation`: bytes a request holds against `max_inflight_body_bytes`, the one budget of
  `Lifecycle.body_bytes` that the HTTP guard fills while bodies stream in. The Open Inference
  Protocol adds what the guard cannot see: a gzip body's inflated bytes (reserved step by step
  before each is inflated), and a gRPC message (reserved at twice `grpc_max_message_bytes`
  before it is received, then at twice its own size until it is answered). Past the budget:
  503/UNAVAILABLE `body_budget`, before the work.
- `ParsePool`: inflating and parsing over `INLINE_BYTES` run in `parse_workers` threads, off
  the event loop; smaller ones run inline (a hop to a thread costs more than they do). Every
  parse is bounded before it starts (service/oip/rest.py, service/oip/wire.py), and the JSON
  parser calls back into Python per number, so a thread parsing holds the GIL for at most a
  switch interval at a time (1 ms once the pool has started) and the event loop keeps
  answering.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

from service.errors import BodyBudgetExceeded, Unavailable
from service.guard import Lifecycle

T = TypeVar("T")
INLINE_BYTES = 64 * 1024
SWITCH_INTERVAL = 0.001  # seconds; sys.setswitchinterval once a parse pool starts


class Reservation:
    """Bytes held by one request against the shared budget; released on exit. A refusal is
    passed to `count` (the data plane's refusal counter) before it is raised."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        budget: int,
        count: Callable[[Unavailable], object] | None = None,
    ) -> None:
        self._life = lifecycle
        self._budget = budget
        self._count = count
        self.size = 0

    def resize(self, size: int) -> None:
        """Hold `size` bytes from now on; BodyBudgetExceeded if more do not fit."""
        grow = size - self.size
        if grow > 0 and self._life.body_bytes + grow > self._budget:
            error = BodyBudgetExceeded(
                "too many request bodies are being received at once; retry later"
            )
            if self._count is not None:
                self._count(error)
            raise error
        self._life.body_bytes += grow
        self.size = size

    def release(self) -> None:
        self._life.body_bytes -= self.size
        self.size = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class ParsePool:
    """Threads for large parses; created on first use, so an idle worker holds none."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, size: int, work: Callable[..., T], *args: object) -> T:
        """`work(*args)`: inline when `size` (the bytes it parses or may produce) is small,
        else in a pool thread."""
        if size <= INLINE_BYTES:
            return work(*args)
        return await self.offload(work, *args)

    async def offload(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args)` in a pool thread, whatever its size."""
        if self._pool is None:
            # A thread that parses holds the GIL until another thread has waited a switch
            # interval (5 ms by default) for it; at 1 ms the event loop gets it back sooner.
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="rcegate-parse")
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
