"""Dynamic micro-batching for one model version (Triton's dynamic batcher is the reference).

Admission happens before any work: `reserve(count)` counts a request's images against the
bounded queue and refuses at once with `QueueFull` when they do not fit, before the images are
decoded. The queue is bounded twice: in images (`max_queue_images`) and in expected wait
(`max_queue_wait`: the queued images divided by the model's measured images per second), so
accepted requests keep a bounded latency on a fast GPU and on a busy CPU alike. The reservation
holds while the images are decoded and queued; it is given back as images go into a batch, or
all at once when the request is cancelled, fails or expires.

One dedicated thread per model runs ONNX Runtime. It takes queued images in arrival order, up to
`max_batch_size`, possibly a slice of a large request (a request may span batches), and scatters
the outputs back so every request gets its rows in its own order. It waits up to
`max_queue_delay` for a fuller batch only while other admitted requests are still being decoded:
a lone client never pays the delay. A ticket whose deadline passed, or whose client went away,
is dropped before its images reach the model. No web imports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, QueueFull, ServiceError, ShuttingDown

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RunBatch = Callable[[np.ndarray], Arrays]


class BatchFailed(ServiceError):
    """The model run of a batch raised; every request in that batch gets a 500."""


@dataclass(eq=False)
class Ticket:
    """One request's images in one batcher: reserved, then queued, then answered."""

    count: int
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Arrays]
    images: np.ndarray | None = None
    next: int = 0  # first image not yet taken into a batch
    answered: int = 0  # images whose outputs are back
    enqueued_at: float = 0.0
    outputs: Arrays = field(default_factory=dict)
    closed: bool = False  # answered, failed, expired or cancelled

    @property
    def remaining(self) -> int:
        """Images still holding a reservation (not yet taken into a batch)."""
        return self.count - self.next


@dataclass(frozen=True)
class BatchStats:
    """What one model run looked like, for the metrics."""

    size: int
    run_seconds: float
    queue_waits: list[float]


class Batcher:
    """The queue and the inference thread of one model version."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue_images: int,
        max_queue_wait: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_images = max_queue_images
        self.max_queue_wait = max_queue_wait
        self._on_batch = on_batch
        self._rate = 0.0  # images per second of model time, smoothed over recent batches
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._reserved = 0  # images admitted and not yet taken into a batch
        self._queued = 0  # of those, images already queued (decoded)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def reserved(self) -> int:
        """Images admitted and waiting (being decoded or queued): the queue depth."""
        return self._reserved

    def reserve(self, count: int, deadline: float) -> Ticket:
        """Admit `count` images or refuse at once; call from the event loop."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            if count > self.max_queue_images:
                # Never admissible, even into an empty queue: the client must split it.
                raise QueueFull(
                    f"{count} images exceed the queue of {self.max_queue_images} images"
                )
            if self._reserved + count > self.max_queue_images:
                raise QueueFull(
                    f"model {self.name} is at capacity ({self._reserved} images queued); "
                    "retry later"
                )
            wait = self.expected_wait(count)
            if wait > self.max_queue_wait > 0 and self._reserved > 0:
                raise QueueFull(
                    f"model {self.name} has about {1000 * wait:.0f} ms of work queued "
                    f"(limit {1000 * self.max_queue_wait:.0f} ms); retry later",
                    retry_after=max(1, math.ceil(wait)),
                )
            self._reserved += count
        return Ticket(count, deadline, loop, loop.create_future())

    def expected_wait(self, count: int = 0) -> float:
        """Seconds of model time for the queued images plus `count` more (0 before any batch
        ran): the queue is bounded by this, so its wait stays bounded on any hardware."""
        return (self._reserved + count) / self._rate if self._rate else 0.0

    def submit(self, ticket: Ticket, images: np.ndarray) -> None:
        """Queue the decoded images of a reserved ticket (float32 [count, C, H, W])."""
        if len(images) != ticket.count:
            raise ValueError(f"ticket reserved {ticket.count} images, got {len(images)}")
        with self._cond:
            if ticket.closed:
                return
            ticket.images = images
            ticket.enqueued_at = time.monotonic()
            self._queue.append(ticket)
            self._queued += ticket.count
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """Give back what the ticket still holds; a no-op once it is answered."""
        with self._cond:
            if ticket.closed:
                return
            self._close(ticket)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new tickets, let the queued ones finish, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the inference thread ---------------------------------------------------------------

    def _close(self, ticket: Ticket) -> None:
        """Release the ticket's reservation (call with the lock held)."""
        self._reserved -= ticket.remaining
        if ticket.images is not None:
            self._queued -= ticket.remaining
        ticket.next = ticket.count
        ticket.closed = True

    def _expire(self, now: float) -> list[Ticket]:
        """Drop closed and expired tickets from the queue (lock held); return the expired."""
        expired = []
        kept: deque[Ticket] = deque()
        for ticket in self._queue:
            if ticket.closed:
                continue
            if ticket.deadline <= now:
                self._close(ticket)
                expired.append(ticket)
            else:
                kept.append(ticket)
        self._queue = kept
        return expired

    def _wait_for_batch(self) -> tuple[list[tuple[Ticket, int, int]], list[Ticket]] | None:
        """Block until a batch is due; take its slices. None when closing and drained."""
        with self._cond:
            while True:
                expired = self._expire(time.monotonic())
                if self._queue or expired:
                    break
                if self._closing and self._reserved == 0:
                    return None
                self._cond.wait(0.5 if self._closing else None)
            if self._queue:
                due = self._queue[0].enqueued_at + self.max_queue_delay
                # Wait for a fuller batch only while admitted images are still being decoded.
                while (
                    self._queued < self.max_batch_size
                    and self._reserved > self._queued
                    and not self._closing
                ):
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                expired += self._expire(time.monotonic())
            slices: list[tuple[Ticket, int, int]] = []
            room = self.max_batch_size
            while self._queue and room > 0:
                ticket = self._queue[0]
                take = min(room, ticket.remaining)
                slices.append((ticket, ticket.next, ticket.next + take))
                ticket.next += take
                room -= take
                self._reserved -= take
                self._queued -= take
                if ticket.remaining == 0:
                    self._queue.popleft()
            return slices, expired

    def _loop(self) -> None:
        while True:
            due = self._wait_for_batch()
            if due is None:
                return
            slices, expired = due
            for ticket in expired:
                self._resolve(
                    ticket,
                    error=DeadlineExceeded(
                        "the request's deadline passed while it waited in the queue"
                    ),
                )
            if slices:
                self._run(slices)

    def _run(self, slices: list[tuple[Ticket, int, int]]) -> None:
        parts = [t.images[a:b] for t, a, b in slices if t.images is not None]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        start = time.monotonic()
        try:
            outputs = self._run_batch(batch)
        except Exception as exc:  # ORT raises its own exception types
            logger.exception("model %s failed on a batch of %d images", self.name, len(batch))
            for ticket, _, _ in slices:
                with self._cond:
                    if ticket.closed:  # cancelled meanwhile: nobody waits for it
                        continue
                    self._close(ticket)
                failure = BatchFailed("internal server error")
                failure.__cause__ = exc  # the server log shows the model's own traceback
                self._resolve(ticket, error=failure)
            return
        seconds = time.monotonic() - start
        rate = len(batch) / max(seconds, 1e-6)
        self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate
        if self._on_batch is not None:
            waits = [start - t.enqueued_at for t, a, _ in slices if a == 0]
            self._on_batch(BatchStats(len(batch), seconds, waits))
        row = 0
        for ticket, a, b in slices:
            for key, value in outputs.items():
                if key not in ticket.outputs:
                    ticket.outputs[key] = np.empty((ticket.count, *value.shape[1:]), value.dtype)
                ticket.outputs[key][a:b] = value[row : row + b - a]
            row += b - a
            ticket.answered += b - a
            if ticket.answered == ticket.count:
                with self._cond:
                    if ticket.closed:
                        continue  # cancelled meanwhile
                    ticket.closed = True
                ticket.images = None
                self._resolve(ticket, result=ticket.outputs)

    @staticmethod
    def _resolve(
        ticket: Ticket, result: Arrays | None = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if ticket.future.done():
                return
            if error is not None:
                ticket.future.set_exception(error)
            else:
                ticket.future.set_result(result or {})

        try:
            ticket.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass
