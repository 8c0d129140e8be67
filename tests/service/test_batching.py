"""The dynamic batcher: order, batch size, spanning requests, admission, deadlines, cancellation.

The model here is a plain numpy function whose outputs identify their inputs, so every row can
be traced back to the image it came from; a gate (a threading.Event) holds the inference
thread where a test needs the queue to fill. No sleeps: every wait is on an event or a future.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from service.batching import BatchCost, Batcher, BatchFailed, BatchStats
from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.shapes import BatchShapes

T = TypeVar("T")
FAR = 3600.0  # a deadline nobody reaches


class Model:
    """Identity-like model: `id` output = the first pixel of each image; records batch sizes."""

    def __init__(self, hold: bool = False) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(30), "test never released the model"
        self.sizes.append(len(images))
        return {"id": images[:, 0, 0, 0].copy(), "double": images[:, 0, 0, :] * 2}


def images(ids: list[int]) -> np.ndarray:
    out = np.zeros((len(ids), 1, 2, 2), np.float32)
    out[:, 0, 0, 0] = ids
    out[:, 0, 0, 1] = ids
    return out


HANG_GUARD = 60.0  # seconds: a batcher whose thread died fails the test instead of hanging it


def run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro(), HANG_GUARD))  # type: ignore[arg-type]


def make(model: Model, **kwargs: object) -> Batcher:
    options: dict[str, object] = {
        "max_batch_size": 4,
        "max_queue_delay": 0.0,
        "max_queue_images": 16,
    }
    options.update(kwargs)
    return Batcher("m/1", model, **options)  # type: ignore[arg-type]


def test_each_request_gets_its_own_rows_in_order_across_batches() -> None:
    model = Model(hold=True)
    batcher = make(model)

    async def scenario() -> list[dict[str, np.ndarray]]:
        first = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(first, images([100]))
        await asyncio.to_thread(model.entered.wait, 30)  # the model holds request 0
        tickets = []
        for start in (0, 10, 20):  # three requests of 3 images queue up meanwhile
            ticket = batcher.reserve(3, time.monotonic() + FAR)
            batcher.submit(ticket, images([start, start + 1, start + 2]))
            tickets.append(ticket)
        model.gate.set()
        return [await t.future for t in [first, *tickets]]

    results = run(scenario)
    batcher.close(5)
    assert [r["id"].tolist() for r in results] == [
        [100],
        [0, 1, 2],
        [10, 11, 12],
        [20, 21, 22],
    ]
    np.testing.assert_array_equal(results[2]["double"], images([10, 11, 12])[:, 0, 0, :] * 2)
    # 9 queued images in batches of at most 4: the second request spans two batches.
    assert model.sizes == [1, 4, 4, 1]


def test_batches_never_exceed_max_batch_size_even_for_one_large_request() -> None:
    model = Model()
    batcher = make(model, max_batch_size=3)

    async def scenario() -> dict[str, np.ndarray]:
        ticket = batcher.reserve(8, time.monotonic() + FAR)
        batcher.submit(ticket, images(list(range(8))))
        return await ticket.future

    result = run(scenario)
    batcher.close(5)
    assert result["id"].tolist() == list(range(8))
    assert model.sizes == [3, 3, 2]


def test_full_queue_refuses_at_once_and_frees_capacity_when_answered() -> None:
    model = Model(hold=True)
    batcher = make(model, max_queue_images=5)

    async def scenario() -> None:
        running = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(running, images([1]))
        await asyncio.to_thread(model.entered.wait, 30)
        held = batcher.reserve(4, time.monotonic() + FAR)  # 1 running + 4 = the bound
        assert batcher.reserved == 4
        with pytest.raises(QueueFull) as refused:
            batcher.reserve(2, time.monotonic() + FAR)
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "1"}
        with pytest.raises(QueueFull, match="exceed the queue of 5 images"):
            batcher.reserve(6, time.monotonic() + FAR)
        batcher.submit(held, images([1, 2, 3, 4]))
        model.gate.set()
        await held.future
        assert batcher.reserved == 0
        batcher.reserve(5, time.monotonic() + FAR)  # all capacity is back

    run(scenario)


def test_expired_request_never_reaches_the_model() -> None:
    model = Model(hold=True)
    batcher = make(model)

    async def scenario() -> None:
        running = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(running, images([1]))
        await asyncio.to_thread(model.entered.wait, 30)
        late = batcher.reserve(2, time.monotonic())  # its deadline has already passed
        batcher.submit(late, images([7, 8]))
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert (await running.future)["id"].tolist() == [1]
        assert batcher.reserved == 0

    run(scenario)
    batcher.close(5)
    assert model.sizes == [1]  # images 7 and 8 were never run


def test_cancelled_request_gives_back_its_images_and_is_not_run() -> None:
    model = Model(hold=True)
    batcher = make(model)

    async def scenario() -> None:
        running = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(running, images([1]))
        await asyncio.to_thread(model.entered.wait, 30)
        gone = batcher.reserve(3, time.monotonic() + FAR)
        batcher.submit(gone, images([4, 5, 6]))
        kept = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(kept, images([9]))
        assert batcher.reserved == 4
        batcher.cancel(gone)  # the client went away
        assert batcher.reserved == 1
        model.gate.set()
        assert (await kept.future)["id"].tolist() == [9]
        assert not gone.future.done()

    run(scenario)
    batcher.close(5)
    assert model.sizes == [1, 1]


def test_a_reservation_given_back_before_submit_frees_the_queue() -> None:
    batcher = make(Model(), max_queue_images=2)

    async def scenario() -> None:
        ticket = batcher.reserve(2, time.monotonic() + FAR)
        with pytest.raises(QueueFull):
            batcher.reserve(1, time.monotonic() + FAR)
        batcher.cancel(ticket)  # e.g. one of its images could not be decoded
        batcher.reserve(2, time.monotonic() + FAR)

    run(scenario)


def test_waits_for_images_still_being_decoded_up_to_the_queue_delay() -> None:
    model = Model()
    seen: list[BatchStats] = []
    batcher = make(model, max_queue_delay=30.0, on_batch=seen.append)

    async def scenario() -> list[list[float]]:
        first = batcher.reserve(1, time.monotonic() + FAR)
        second = batcher.reserve(1, time.monotonic() + FAR)  # admitted, still "decoding"
        batcher.submit(first, images([1]))
        batcher.submit(second, images([2]))  # arrives within the delay: same batch
        return [(await t.future)["id"].tolist() for t in (first, second)]

    assert run(scenario) == [[1], [2]]
    batcher.close(5)
    assert model.sizes == [2]
    assert seen[0].size == 2 and len(seen[0].queue_waits) == 2


def test_a_lone_request_does_not_wait_for_the_queue_delay() -> None:
    model = Model()
    batcher = make(model, max_queue_delay=30.0)

    async def scenario() -> list[float]:
        ticket = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(ticket, images([3]))
        # Nothing else is admitted, so the batch runs now, not after 30 s.
        return (await asyncio.wait_for(ticket.future, 10))["id"].tolist()  # type: ignore[no-any-return]

    assert run(scenario) == [3]
    batcher.close(5)


def test_a_failing_model_fails_the_batch_and_keeps_serving() -> None:
    calls = 0

    def flaky(batch: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return {"id": batch[:, 0, 0, 0].copy()}

    batcher = Batcher("m/1", flaky, max_batch_size=4, max_queue_delay=0, max_queue_images=8)

    async def scenario() -> list[float]:
        bad = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(bad, images([1]))
        with pytest.raises(BatchFailed) as failed:
            await bad.future
        assert failed.value.status == 500 and "boom" not in failed.value.message
        good = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(good, images([2]))
        return (await good.future)["id"].tolist()  # type: ignore[no-any-return]

    assert run(scenario) == [2]
    batcher.close(5)


def test_closing_finishes_queued_work_and_refuses_new_tickets() -> None:
    model = Model(hold=True)
    batcher = make(model)

    async def scenario() -> None:
        queued = batcher.reserve(2, time.monotonic() + FAR)
        batcher.submit(queued, images([5, 6]))
        await asyncio.to_thread(model.entered.wait, 30)
        closer = threading.Thread(target=batcher.close, args=(30,))
        closer.start()
        while not batcher._closing:  # close() sets it under the lock, at once
            await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            batcher.reserve(1, time.monotonic() + FAR)
        model.gate.set()
        assert (await queued.future)["id"].tolist() == [5, 6]
        await asyncio.to_thread(closer.join, 30)

    run(scenario)


class Clock:
    """Model time without waiting: each run advances the clock by what the test says it cost
    (its first run of a shape `cold` seconds, later runs `warm`), so estimates are exact."""

    def __init__(self, model: Model, cold: float, warm: float) -> None:
        self.now = 0.0
        self.model = model
        self.cold, self.warm = cold, warm
        self.seen: set[int] = set()

    def __call__(self) -> float:
        return self.now

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.now += self.warm if len(images) in self.seen else self.cold
        self.seen.add(len(images))
        return self.model(images)


def test_queue_wait_bound_ignores_each_shapes_first_run_and_never_refuses_below_one_batch() -> None:
    model = Model()
    clock = Clock(model, cold=0.3, warm=0.01)
    batcher = Batcher(
        "m/1",
        clock.run,
        max_batch_size=4,
        max_queue_delay=0,
        max_queue_images=16,
        max_queue_wait=0.015,  # one full batch and a bit
        timer=clock,
    )

    async def scenario() -> None:
        for _ in range(2):  # shape 4 runs cold (0.3 s), then warm (0.01 s)
            ticket = batcher.reserve(4, time.monotonic() + FAR)
            batcher.submit(ticket, images([1, 2, 3, 4]))
            await ticket.future
        assert batcher.expected_wait(4) == pytest.approx(0.01)  # the cold run is not counted
        assert batcher.expected_wait(8) == pytest.approx(0.02)
        model.gate.clear()  # nothing runs from here on: the queue only fills
        first = batcher.reserve(3, time.monotonic() + FAR)
        # 3 queued + 3 = 6 images (0.02 s > 0.015 s), but less than one batch is queued.
        second = batcher.reserve(3, time.monotonic() + FAR)
        with pytest.raises(QueueFull, match="ms of work queued") as refused:
            batcher.reserve(3, time.monotonic() + FAR)  # 6 queued: a full batch is waiting
        assert refused.value.headers["Retry-After"] == "1"
        batcher.cancel(first)
        batcher.cancel(second)
        batcher.reserve(1, time.monotonic() + FAR)

    run(scenario)
    model.gate.set()
    batcher.close(5)


def test_padded_batch_runs_at_the_next_shape_and_padded_rows_reach_no_request() -> None:
    model = Model(hold=True)
    seen: list[BatchStats] = []
    batcher = make(
        model, max_batch_size=8, shapes=BatchShapes.parse("1,4,8", 8), on_batch=seen.append
    )
    shapes: list[np.ndarray] = []
    original = model.__call__

    def recording(batch: np.ndarray) -> dict[str, np.ndarray]:
        shapes.append(batch[:, 0, 0, 0].copy())
        return original(batch)

    batcher._run_batch = recording

    async def scenario() -> list[dict[str, np.ndarray]]:
        first = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(first, images([100]))
        await asyncio.to_thread(model.entered.wait, 30)  # shape 1: no padding
        tickets = [first]
        for ids in ([1, 2], [3], [4, 5]):  # 5 images queue up: they run as shape 8
            ticket = batcher.reserve(len(ids), time.monotonic() + FAR)
            batcher.submit(ticket, images(ids))
            tickets.append(ticket)
        model.gate.set()
        return [await t.future for t in tickets]

    results = run(scenario)
    batcher.close(5)
    assert [r["id"].tolist() for r in results] == [[100], [1, 2], [3], [4, 5]]
    assert [len(r["double"]) for r in results] == [1, 2, 1, 2]
    assert [s.tolist() for s in shapes] == [[100], [1, 2, 3, 4, 5, 0, 0, 0]]
    assert [(s.size, s.shape) for s in seen] == [(1, 1), (5, 8)]


def test_padding_buffer_is_zeroed_again_after_a_fuller_batch_used_it() -> None:
    model = Model()
    rows: list[list[float]] = []

    def recording(batch: np.ndarray) -> dict[str, np.ndarray]:
        rows.append(batch[:, 0, 0, 0].tolist())
        return model(batch)

    batcher = Batcher(
        "m/1", recording, max_batch_size=4, max_queue_delay=0, max_queue_images=16,
        shapes=BatchShapes.parse("max", 4),
    )  # fmt: skip

    async def scenario() -> None:
        for ids in ([7, 8, 9], [5]):
            ticket = batcher.reserve(len(ids), time.monotonic() + FAR)
            batcher.submit(ticket, images(ids))
            assert (await ticket.future)["id"].tolist() == ids

    run(scenario)
    batcher.close(5)
    assert rows == [[7, 8, 9, 0], [5, 0, 0, 0]]


def test_median_estimate_ignores_cold_shapes_and_pauses_that_made_the_old_estimate_refuse() -> None:
    """Batches as `any` shapes make them on a GPU (issue 20): each new shape's first run pays a
    300 ms algorithm search, later runs take 1.4 ms. The old estimate (an EWMA of batch rates)
    would refuse a queue of one image plus one request for as long as cold runs dominate it;
    the per-shape median ignores first runs, and a later pause moves it by one place only."""
    from bench.shape_collapse import LegacyEwma, legacy_would_refuse

    old, new = LegacyEwma(), BatchCost(BatchShapes.parse("any", 64))
    history = [(3, 0.3), (5, 0.3), (7, 0.3), (3, 0.0014), (5, 0.0014), (3, 0.25), (3, 0.0014)]
    old_refuses, new_waits = [], []
    for shape, seconds in history:
        old.observe(shape, shape, seconds)
        new.observe(shape, shape, seconds)
        old_refuses.append(legacy_would_refuse(old, 1, 1, 0.1))
        new_waits.append(new.expected_seconds(64 + 1))
    assert old_refuses == [True, True, True, False, False, False, False]
    assert legacy_would_refuse(LegacyEwma(), 1, 1, 0.1) is False  # before any batch
    old_full = LegacyEwma()
    for shape, seconds in history[:4]:
        old_full.observe(shape, shape, seconds)
    assert legacy_would_refuse(old_full, 64, 1, 0.1)  # one batch queued: still refused
    assert new_waits[:3] == [0.0, 0.0, 0.0]  # first runs only: no estimate, no refusal
    assert max(new_waits) < 0.1
    assert new.batch_seconds(3) == pytest.approx(0.0014)  # the 0.25 s pause left no mark


def test_median_estimate_for_an_unmeasured_shape_comes_from_its_neighbours() -> None:
    cost = BatchCost(BatchShapes.parse("any", 64))
    assert cost.expected_seconds(10) == 0.0  # nothing measured: no estimate, no refusal
    for seconds in (9.0, 0.010, 0.012, 0.011):  # shape 16: cold, then three warm runs
        cost.observe(16, 16, seconds)
    assert cost.batch_seconds(16) == pytest.approx(0.011)
    assert cost.batch_seconds(4) == pytest.approx(0.011)  # a larger shape bounds it
    assert cost.batch_seconds(64) == pytest.approx(0.044)  # scaled up from 16
    assert cost.expected_seconds(64 + 16) == pytest.approx(0.044 + 0.011)


def test_a_reservation_given_back_before_submit_does_not_delay_a_later_lone_request() -> None:
    """Images given back before they were queued (a request refused while decoding) leave no
    trace in the count of images still being decoded: a later lone request is not made to
    wait the queue delay for them."""
    model = Model()
    batcher = make(model, max_queue_delay=30.0)

    async def scenario() -> list[float]:
        undecodable = batcher.reserve(2, time.monotonic() + FAR)
        batcher.cancel(undecodable)
        ticket = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(ticket, images([3]))
        return (await asyncio.wait_for(ticket.future, 10))["id"].tolist()  # type: ignore[no-any-return]

    assert run(scenario) == [3]
    batcher.close(5)


def test_a_failed_batch_fails_its_requests_whole_and_their_other_images_never_run() -> None:
    sizes: list[int] = []

    def fails_first(batch: np.ndarray) -> dict[str, np.ndarray]:
        sizes.append(len(batch))
        if len(sizes) == 1:
            raise RuntimeError("boom")
        return {"id": batch[:, 0, 0, 0].copy()}

    batcher = Batcher("m/1", fails_first, max_batch_size=4, max_queue_delay=0, max_queue_images=8)

    async def scenario() -> list[float]:
        spanning = batcher.reserve(6, time.monotonic() + FAR)  # 4 in the failing batch, 2 left
        batcher.submit(spanning, images([1, 2, 3, 4, 5, 6]))
        with pytest.raises(BatchFailed):
            await spanning.future
        assert batcher.reserved == 0  # its last 2 images gave back their places
        good = batcher.reserve(1, time.monotonic() + FAR)
        batcher.submit(good, images([9]))
        return (await good.future)["id"].tolist()  # type: ignore[no-any-return]

    assert run(scenario) == [9]
    batcher.close(5)
    assert sizes == [4, 1]  # images 5 and 6 of the failed request never reached the model


def test_a_request_spanning_batches_records_one_queue_wait() -> None:
    model = Model()
    seen: list[BatchStats] = []
    batcher = make(model, max_batch_size=3, on_batch=seen.append)

    async def scenario() -> None:
        ticket = batcher.reserve(7, time.monotonic() + FAR)
        batcher.submit(ticket, images(list(range(7))))
        await ticket.future

    run(scenario)
    batcher.close(5)
    assert [(stats.size, len(stats.queue_waits)) for stats in seen] == [(3, 1), (3, 0), (1, 0)]


def test_a_bookkeeping_failure_fails_its_batch_and_the_thread_serves_the_next() -> None:
    """A bug after the model run (here: outputs with no rows, so the scatter raises) answers
    that batch's requests with BatchFailed; the inference thread survives, gives the places back
    and answers the next request."""
    calls: list[int] = []

    def short_then_right(batch: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        rows = batch[:, 0, 0, 0].copy()
        return {"id": rows[:0] if len(calls) == 1 else rows}

    batcher = Batcher(
        "m/1", short_then_right, max_batch_size=4, max_queue_delay=0.0, max_queue_images=16
    )

    async def scenario() -> tuple[BaseException | None, dict[str, np.ndarray]]:
        first = batcher.reserve(3, time.monotonic() + FAR)
        batcher.submit(first, images([1, 2, 3]))
        error: BaseException | None = None
        try:
            await first.future
        except BatchFailed as exc:
            error = exc
        second = batcher.reserve(2, time.monotonic() + FAR)
        batcher.submit(second, images([7, 8]))
        return error, await second.future

    error, result = run(scenario)
    batcher.close(5)
    assert isinstance(error, BatchFailed)
    assert result["id"].tolist() == [7, 8]
    assert batcher.reserved == 0


def test_a_failing_batch_observer_costs_no_answer() -> None:
    def broken(stats: BatchStats) -> None:
        raise RuntimeError("metrics backend is gone")

    batcher = make(Model(), on_batch=broken)

    async def scenario() -> dict[str, np.ndarray]:
        ticket = batcher.reserve(2, time.monotonic() + FAR)
        batcher.submit(ticket, images([4, 5]))
        return await ticket.future

    result = run(scenario)
    batcher.close(5)
    assert result["id"].tolist() == [4, 5]
