"""Dynamic micro-batching for one model version (Triton's dynamic batcher is the reference).

Admission happens before any work: `reserve(count)` counts a request's images against the
bounded queue and refuses at once with `QueueFull` when they do not fit, before the images are
decoded. The queue is bounded twice: in images (`max_queue_images`) and in expected wait
(`max_queue_wait`: the model time the queued images need, from `BatchCost`), so accepted
requests keep a bounded latency on a fast GPU and on a busy CPU alike. The wait bound never
refuses while less than one full batch is queued, and its estimate is robust (issue 20): the
median of recent runs per batch shape, each shape's first (cold) run ignored, so one slow batch
(a cold shape, a GC pause) cannot make it refuse nearly everything. The reservation holds while
the images are decoded and queued; it is given back as images go into a batch, or all at once
when the request is cancelled, fails or expires.

One dedicated thread per model runs ONNX Runtime. It takes queued images in arrival order, up to
`max_batch_size`, possibly a slice of a large request (a request may span batches), pads them up
to the next allowed batch shape (`service.shapes`; the padded rows' outputs are dropped before
anything reads them), and scatters the outputs back so every request gets its rows in its own
order. It waits up to `max_queue_delay` for a fuller batch only while other admitted requests
are still being decoded: a lone client never pays the delay. A ticket whose deadline passed, or
whose client went away, is dropped before its images reach the model. No web imports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded, QueueFull, ServiceError, ShuttingDown
from service.shapes import BatchShapes

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

    size: int  # real images (padded rows excluded)
    run_seconds: float
    queue_waits: list[float]
    shape: int = 0  # the batch shape the model ran (size plus padding)


class CostModel(Protocol):
    """What admission asks of a model-time estimate (`BatchCost` is the service's)."""

    def observe(self, shape: int, images: int, seconds: float) -> None: ...

    def expected_seconds(self, images: int) -> float: ...


class BatchCost:
    """Model time per batch shape: the (low) median of the last `window` runs of each shape, the
    first run of every shape ignored (on CUDA a new shape costs a cuDNN algorithm search,
    hundreds of milliseconds on an H200). One slow run, a GC pause, moves a median by at most one
    place (the low median of two runs is the faster one); the exponential average it replaces
    took 20% of every batch's rate, and its first batch's whole, so cold shapes made it refuse
    nearly everything (issue 20).

    `observe` runs on the inference thread and publishes each shape's median by replacing one
    dict entry; `expected_seconds` runs on the event loop and only reads them.
    """

    def __init__(self, shapes: BatchShapes, window: int = 15) -> None:
        self.shapes = shapes
        self._runs: dict[int, deque[float]] = {}
        self._window = window
        self._median: dict[int, float] = {}  # shape -> seconds per run (warm runs only)

    def observe(self, shape: int, images: int, seconds: float) -> None:
        runs = self._runs.get(shape)
        if runs is None:  # the first run of this shape: cold, not what the next ones cost
            self._runs[shape] = deque(maxlen=self._window)
            return
        runs.append(seconds)
        self._median = {**self._median, shape: statistics.median_low(runs)}

    def batch_seconds(self, shape: int) -> float | None:
        """One run at `shape`: its own median, else the smallest measured larger shape's (an
        upper bound), else the largest measured smaller shape's scaled by size; None before any
        warm run."""
        known = self._median
        if shape in known:
            return known[shape]
        if not known:
            return None
        larger = [k for k in known if k > shape]
        if larger:
            return known[min(larger)]
        below = max(known)
        return known[below] * shape / below

    def expected_seconds(self, images: int) -> float:
        """Model time for `images` queued images, run in full batches and one last smaller one;
        0 before any warm run (no estimate, no refusal)."""
        if images <= 0:
            return 0.0
        full, rest = divmod(images, self.shapes.max_batch_size)
        per_full = self.batch_seconds(self.shapes.max_batch_size) if full else 0.0
        last = self.batch_seconds(self.shapes.fit(rest)) if rest else 0.0
        if per_full is None or last is None:
            return 0.0
        return full * per_full + last


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
        shapes: BatchShapes | None = None,
        cost: CostModel | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_images = max_queue_images
        self.max_queue_wait = max_queue_wait
        self._on_batch = on_batch
        self.shapes = shapes or BatchShapes(max_batch_size)
        if self.shapes.max_batch_size != max_batch_size:
            raise ValueError(
                f"batch shapes {self.shapes} are for max_batch_size "
                f"{self.shapes.max_batch_size}, not {max_batch_size}"
            )
        self.cost: CostModel = cost or BatchCost(self.shapes)
        self._timer = timer  # times the model runs (a test injects a clock)
        self._pads: dict[int, np.ndarray] = {}  # one reusable input buffer per padded shape
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
            # Below one full batch the next run takes everything queued: never refuse there.
            if wait > self.max_queue_wait > 0 and self._reserved >= self.max_batch_size:
                raise QueueFull(
                    f"model {self.name} has about {1000 * wait:.0f} ms of work queued "
                    f"(limit {1000 * self.max_queue_wait:.0f} ms); retry later",
                    retry_after=max(1, math.ceil(wait)),
                )
            self._reserved += count
        return Ticket(count, deadline, loop, loop.create_future())

    def expected_wait(self, count: int = 0) -> float:
        """Seconds of model time for the queued images plus `count` more (0 before any warm
        batch ran): the queue is bounded by this, so its wait stays bounded on any hardware."""
        return self.cost.expected_seconds(self._reserved + count)

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
                try:
                    self._run(slices)
                except Exception as exc:  # a bug outside the model run: fail the batch, not
                    # the thread (a dead thread would strand every later request of the model)
                    logger.exception("model %s: batch bookkeeping failed", self.name)
                    self._fail(slices, exc)

    def _batch(self, slices: list[tuple[Ticket, int, int]]) -> tuple[np.ndarray, int]:
        """The model input for the slices, padded up to its batch shape; and the real count."""
        parts = [t.images[a:b] for t, a, b in slices if t.images is not None]
        count = sum(len(part) for part in parts)
        shape = self.shapes.fit(count)
        if shape == count:
            return (parts[0] if len(parts) == 1 else np.concatenate(parts)), count
        buffer = self._pads.get(shape)
        if buffer is None or buffer.shape[1:] != parts[0].shape[1:]:
            buffer = self._pads[shape] = np.zeros((shape, *parts[0].shape[1:]), parts[0].dtype)
        np.concatenate(parts, out=buffer[:count])
        buffer[count:] = 0  # padding: valid input whose outputs are dropped below
        return buffer, count

    def _run(self, slices: list[tuple[Ticket, int, int]]) -> None:
        batch, count = self._batch(slices)
        start = time.monotonic()
        began = self._timer()
        try:
            outputs = self._run_batch(batch)
        except Exception as exc:  # ORT raises its own exception types
            logger.exception("model %s failed on a batch of %d images", self.name, count)
            self._fail(slices, exc)
            return
        seconds = self._timer() - began
        self.cost.observe(len(batch), count, seconds)
        if self._on_batch is not None:
            waits = [start - t.enqueued_at for t, a, _ in slices if a == 0]
            try:
                self._on_batch(BatchStats(count, seconds, waits, len(batch)))
            except Exception:  # metrics must never cost the answers
                logger.exception("model %s: recording a batch failed", self.name)
        # The padded rows' outputs end here: only the first `count` rows are scattered.
        outputs = {key: value[:count] for key, value in outputs.items()}
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

    def _fail(self, slices: list[tuple[Ticket, int, int]], exc: Exception) -> None:
        """Answer every still-open ticket of a failed batch with a 500 and release its places."""
        for ticket, _, _ in slices:
            with self._cond:
                if ticket.closed:  # cancelled or answered meanwhile: nobody waits for it
                    continue
                self._close(ticket)
            failure = BatchFailed("internal server error")
            failure.__cause__ = exc  # the server log shows the original traceback
            self._resolve(ticket, error=failure)

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
