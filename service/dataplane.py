"""The protocol-neutral data plane (MLServer's DataPlane is the model): images in, verdicts out.

Protocol adapters (the v1 HTTP routes; the Open Inference Protocol) parse their wire format and
call `predict_encoded` (image files) or `predict_arrays` (float32 tensors). The data plane owns
everything after that: admission (a bounded queue per model, counted in images, checked before
any image is decoded), the deadline of every request, the bounded decode pool, the dynamic
batcher of each model, the thresholding test of Pang et al. (NeurIPS 2018) at the requested
target FPR, annotate/enforce, and the model metrics. No web imports, no ONNX Runtime calls
outside the batchers' threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from models.manifest import Metric
from service.batching import Batcher, BatchStats, Ticket
from service.budget import ParsePool
from service.detector import Decision, Detector, Outputs
from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotReady,
    QueueFull,
    ServiceError,
    ShuttingDown,
    Unavailable,
)
from service.guard import Lifecycle
from service.imaging import (
    DecodedImage,
    DecodeLimits,
    check_request_pixels,
    decode_image,
    probe_image,
)
from service.metrics import Metrics
from service.policy import Policy
from service.probers import ProberTracker
from service.repository import ModelRepository
from service.settings import Mode, Settings

logger = logging.getLogger(__name__)

# Decoding on the event loop: only this many small images per request, each this small.
INLINE_MAX_IMAGES = 4
INLINE_MAX_BYTES = 16 * 1024


@dataclass(frozen=True)
class EncodedImage:
    """One image file as received, and how errors name it (`files[1] ('x.png')`)."""

    data: bytes
    what: str


@dataclass(frozen=True)
class PredictOptions:
    target_fpr: float | None = None  # None: the model's served target FPR
    mode: Mode | None = None  # None: the service's default mode
    client: str | None = None  # who asks (API key id or address), for prober tracking
    metric: Metric | None = None  # None: the model's default metric


@dataclass(frozen=True)
class Prediction:
    """The answer for one request's N images, in request order."""

    detector: Detector
    decision: Decision
    mode: Mode
    outputs: Outputs  # every graph output, N rows
    accepted: np.ndarray  # bool [N]: scores[decision.metric] >= decision.threshold
    decoded: list[DecodedImage] | None = None  # for image files: original sizes, resizing

    def __len__(self) -> int:
        return len(self.accepted)

    def shown(self, index: int) -> bool:
        """Whether the label and probabilities of image `index` may be returned (enforce mode
        withholds them for rejected images)."""
        return bool(self.accepted[index]) or self.mode == "annotate"


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        metrics: Metrics,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        # A worker process passes one that also sees the other workers (service/workers.py).
        self.lifecycle = lifecycle or Lifecycle()
        self._batchers: dict[tuple[str, int], Batcher] = {}
        self._queue_gauges: dict[tuple[str, int], Gauge] = {}
        self._limits = DecodeLimits(
            settings.max_image_side, settings.max_pixels, settings.max_request_pixels
        )
        self._decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers, thread_name_prefix="rcegate-decode"
        )
        self.probers = ProberTracker(settings, metrics)
        self.parsing = ParsePool(settings.parse_workers)  # large OIP parses (service/budget.py)
        self.policy = Policy(settings)  # modes and target FPRs a client may ask for
        # Metric series by their labels, looked up once (see _record); a withheld class is -1.
        self._series: dict[tuple[str, int, bool, int], Counter] = {}
        self._histograms: dict[tuple[str, str], Histogram] = {}
        self.timer: Callable[[], float] = time.perf_counter  # times model runs (a test seam)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, detectors: list[Detector]) -> None:
        """Start one batcher (one inference thread) per loaded model version."""
        s = self.settings
        for detector in detectors:
            key = (detector.name, detector.version)
            batcher = Batcher(
                f"{detector.name}/{detector.version}",
                functools.partial(_run_arrays, detector),
                max_batch_size=s.max_batch_size,
                max_queue_delay=s.max_queue_delay,
                max_queue_images=s.max_queue_images,
                max_queue_wait=s.max_queue_wait,
                on_batch=self._batch_observer(detector),
                shapes=detector.shapes,  # padded up to them; warmed up at load (issue 20)
                timer=self.timer,
            )
            self._batchers[key] = batcher
            # Set on every admission and every answer (not a set_function: that would not
            # reach /metrics from another worker process).
            gauge = self.metrics.queue_images.labels(detector.name, str(detector.version))
            self._queue_gauges[key] = gauge

    def drain(self) -> None:
        """Refuse new requests from now on (SIGTERM); those already in flight still finish."""
        self.lifecycle.draining = True

    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    @property
    def ready(self) -> bool:
        """Every model loaded and self-tested, and not draining, in this process and in every
        other worker process: new work is welcome."""
        return (
            self.repository.ready and not self.draining and self.lifecycle.others_unready() is None
        )

    def check_ready(self) -> None:
        """Why the service is not ready, as the error every protocol's readiness check answers
        with (503): draining, still loading, or nothing could be loaded."""
        if self.draining:
            raise ShuttingDown("draining: finishing accepted requests before exit")
        if not self.repository.ready:
            raise NotReady(self.repository.error or "models are still loading")
        others = self.lifecycle.others_unready()
        if others is not None:
            raise NotReady(others)

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the inference threads and the decode pool."""
        self.lifecycle.draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for batcher in self._batchers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            batcher.close(left)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.parsing.close()

    @property
    def busy(self) -> bool:
        """True while any admitted image is still waiting or being decoded."""
        return any(b.reserved for b in self._batchers.values())

    # -- admission -----------------------------------------------------------------------

    def check_open(self) -> None:
        """Refuse a NEW request while draining (adapters call this first; HTTP's guard does)."""
        if self.draining:
            raise self.refused(
                ShuttingDown("the service is shutting down; retry on another instance")
            )

    def model(self, name: str | None = None, version: int | None = None) -> Detector:
        """The model a request names (None: the default model)."""
        return self.repository.get(name or self.repository.default_name, version)

    def _batcher(self, detector: Detector) -> Batcher:
        batcher = self._batchers.get((detector.name, detector.version))
        if batcher is None:
            raise NotReady(f"model {detector.name}/{detector.version} has no batcher yet")
        return batcher

    def check_capacity(self, detector: Detector) -> None:
        """Refuse at once, before the body is read, when the model's queue is already full
        (in images, or in expected wait: then `reserve` would refuse any request)."""
        refusal = queue_refusal(self._batcher(detector))
        if refusal is not None:
            raise self.refused(refusal)

    def refusal_at_head(self, method: str, path: str) -> QueueFull | None:
        """What `check_capacity` would answer a request for the model its path names (v1
        predict, v2 infer; the default or newest version unless the path names one), decided
        as its head arrives, before it is routed or its body read, so the refusal costs
        nothing; the requests already in flight count as work ahead of it. None when the path
        names no loaded model or its queue has room. Not counted: the caller counts what it
        refuses."""
        if method != "POST":
            return None
        named = model_in_path(path)
        if named is None:
            return None
        name, version = named
        try:
            detector = self.model(name, version)
        except ServiceError:
            return None  # the app gives the error
        batcher = self._batchers.get((detector.name, detector.version))
        if batcher is None:
            return None
        # Requests in flight whose images are not reserved yet (bodies still arriving, being
        # decoded) are work ahead too: without them a burst of heads all pass an empty queue.
        return queue_refusal(batcher, self.lifecycle.in_flight)

    def refused(self, error: Unavailable) -> Unavailable:
        """Count a refusal by its reason; returns the error for the caller to raise."""
        self.metrics.refused.labels(error.reason).inc()
        return error

    def deadline(self, arrival: float) -> float:
        return arrival + self.settings.request_timeout

    def _reserve(self, detector: Detector, count: int, deadline: float) -> Ticket:
        if time.monotonic() >= deadline:
            raise self.refused(DeadlineExceeded("the request's deadline passed before admission"))
        try:
            ticket = self._batcher(detector).reserve(count, deadline)
        except Unavailable as exc:
            raise self.refused(exc) from None
        self._show_queue(detector)
        return ticket

    def _show_queue(self, detector: Detector) -> None:
        key = (detector.name, detector.version)
        self._queue_gauges[key].set(self._batchers[key].reserved)

    # -- the work ------------------------------------------------------------------------

    async def predict_encoded(
        self,
        detector: Detector,
        images: Sequence[EncodedImage],
        options: PredictOptions,
        deadline: float,
    ) -> Prediction:
        """Decode image files (bounded pool) and answer them; admission comes first."""
        decision, mode = self._policy(detector, options)  # 403/422 before any work
        self.probers.check(options.client)
        batcher = self._batcher(detector)
        ticket = self._reserve(detector, len(images), deadline)
        try:
            decoded = await self._decode(images, detector.input_shape, deadline)
            pixels = np.stack([image.pixels for image in decoded])
            check_tensor(pixels, detector)  # decoding never yields NaN; check anyway
            outputs = await self._infer(batcher, ticket, pixels)
        finally:
            batcher.cancel(ticket)
            self._show_queue(detector)
        return self._decide(detector, decision, mode, options, outputs, decoded)

    async def predict_arrays(
        self, detector: Detector, images: np.ndarray, options: PredictOptions, deadline: float
    ) -> Prediction:
        """Answer float32 [N, C, H, W] tensors in the model's value range."""
        decision, mode = self._policy(detector, options)
        self.probers.check(options.client)
        check_tensor(images, detector)
        batcher = self._batcher(detector)
        ticket = self._reserve(detector, len(images), deadline)
        try:
            outputs = await self._infer(batcher, ticket, images)
        finally:
            batcher.cancel(ticket)
            self._show_queue(detector)
        return self._decide(detector, decision, mode, options, outputs, None)

    def _policy(self, detector: Detector, options: PredictOptions) -> tuple[Decision, Mode]:
        """The decision and mode the operator's policy grants this request (service/policy.py)."""
        return self.policy.resolve(
            detector, options.mode, options.target_fpr, options.client, options.metric
        )

    async def _decode(
        self, images: Sequence[EncodedImage], shape: tuple[int, int, int], deadline: float
    ) -> list[DecodedImage]:
        """Decode in the bounded pool. Every header is checked first (sizes, modes, the
        request's pixel budget), so a request over its budget costs no decoding at all."""
        loop = asyncio.get_running_loop()
        limits = self._limits

        def probe_all() -> None:
            headers = [probe_image(image.data, image.what, limits) for image in images]
            check_request_pixels(headers, limits)

        def one(image: EncodedImage, limits: DecodeLimits = limits) -> DecodedImage:
            if time.monotonic() >= deadline:  # waited too long for a decode thread
                raise DeadlineExceeded("the request's deadline passed before decoding")
            start = time.perf_counter()
            decoded = decode_image(image.data, shape, limits, image.what)
            self.metrics.decode_duration.observe(time.perf_counter() - start)
            return decoded

        inline = self._decode_inline(images, shape, one)
        if inline is not None:
            return inline
        # One image within the per-image limits is within the request's budget too, and
        # decode_image checks its own header: the separate pass is needed only for several.
        if len(images) > 1 or limits.max_request_pixels < limits.max_pixels:
            await loop.run_in_executor(self._decode_pool, probe_all)
        jobs = [loop.run_in_executor(self._decode_pool, one, image) for image in images]
        try:
            return list(await asyncio.gather(*jobs))
        except DeadlineExceeded as exc:
            raise self.refused(exc) from None
        finally:
            for job in jobs:  # on the first failure, the rest need not start
                job.cancel()

    def _decode_inline(
        self,
        images: Sequence[EncodedImage],
        shape: tuple[int, int, int],
        one: Callable[[EncodedImage, DecodeLimits], DecodedImage],
    ) -> list[DecodedImage] | None:
        """Thumbnails decode on the event loop, in less time than a hop to a pool thread and
        back costs: at most INLINE_MAX_IMAGES images of at most INLINE_MAX_BYTES, each declaring
        at most `inline_decode_pixels` (judged from its header by `decode_image` itself, so each
        image is opened once), and only when so many thumbnails cannot pass the request's pixel
        budget. None when they are not all such thumbnails, or on any error: the pool path then
        decodes them, or refuses with the error it gives any image."""
        most = self.settings.inline_decode_pixels
        if not most or len(images) > INLINE_MAX_IMAGES:
            return None
        if any(len(image.data) > INLINE_MAX_BYTES for image in images):
            return None
        limits = self._limits
        small = dataclasses.replace(limits, max_pixels=min(most, limits.max_pixels))
        if len(images) * small.max_pixels > limits.max_request_pixels:
            return None  # thumbnails could pass the request's budget: headers first, in the pool
        try:
            return [one(image, small) for image in images]
        except ServiceError:
            return None

    async def _infer(self, batcher: Batcher, ticket: Ticket, images: np.ndarray) -> Outputs:
        batcher.submit(ticket, images)
        left = ticket.deadline - time.monotonic()
        try:
            # A timer, not a task; cancelling the ticket's future on the way out is harmless
            # (the batcher skips answered futures, and the caller cancels the ticket).
            async with asyncio.timeout(max(left, 0.0)):
                arrays = await ticket.future
        except TimeoutError:
            raise self.refused(
                DeadlineExceeded("the request's deadline passed before its answer")
            ) from None
        except DeadlineExceeded as exc:  # expired in the queue, never reached the model
            raise self.refused(exc) from None
        return Outputs(arrays)

    def _decide(
        self,
        detector: Detector,
        decision: Decision,
        mode: Mode,
        options: PredictOptions,
        outputs: Outputs,
        decoded: list[DecodedImage] | None,
    ) -> Prediction:
        accepted = Detector.accept(outputs, decision)
        self._record(detector, outputs, accepted, mode)
        self.probers.observe(options.client, len(accepted), int((~accepted).sum()))
        return Prediction(detector, decision, mode, outputs, accepted, decoded)

    # -- metrics -------------------------------------------------------------------------

    def _batch_observer(self, detector: Detector) -> BatchObserver:
        return BatchObserver(self.metrics, detector.name)

    def _record(
        self, detector: Detector, outputs: Outputs, accepted: np.ndarray, mode: Mode
    ) -> None:
        """Count the answered images. /metrics shows no more than the answers did (issue 21):
        an image whose label was withheld (enforce, rejected) is counted without its class,
        and its scores stay out of the score histogram when they were withheld too."""
        m = self.metrics
        names = detector.manifest.class_names
        series = self._series
        shown = accepted | (mode == "annotate")
        scored = shown | (not self.settings.withhold_rejected)
        for label, ok, show in zip(
            outputs.label.tolist(), accepted.tolist(), shown.tolist(), strict=True
        ):
            key = (detector.name, detector.version, ok, label if show else -1)
            counter = series.get(key)
            if counter is None:  # label lookups cost more than the increments: once per series
                decision = "accepted" if ok else "rejected"
                version = str(detector.version)
                counter = m.images.labels(
                    detector.name, version, decision, names[label] if show else ""
                )
                series[key] = counter
            counter.inc()
        if m.detection_score is not None and scored.any():
            for metric in detector.metrics:
                histogram = self._histograms.get((detector.name, metric))
                if histogram is None:
                    histogram = m.detection_score.labels(detector.name, metric)
                    self._histograms[(detector.name, metric)] = histogram
                for value in outputs.scores[metric][scored].tolist():
                    histogram.observe(value)


def queue_refusal(batcher: Batcher, ahead: int = 0) -> QueueFull | None:
    """A refusal when the model's queue has no room for any request (its images at the bound,
    or its expected wait over it, as `Batcher.reserve` judges), else None. With `ahead`, the
    work ahead of a new request is at least that many images (requests in flight that have not
    reserved their images yet, one image each), not only what is queued."""
    if batcher.reserved >= batcher.max_queue_images:
        return QueueFull(f"model {batcher.name} is at capacity; retry later")
    queued = max(batcher.reserved, ahead)
    wait = batcher.expected_wait(queued - batcher.reserved)
    if wait > batcher.max_queue_wait > 0 and queued >= batcher.max_batch_size:
        return QueueFull(
            f"model {batcher.name} has about {1000 * wait:.0f} ms of work queued "
            f"(limit {1000 * batcher.max_queue_wait:.0f} ms); retry later",
            retry_after=max(1, math.ceil(wait)),
        )
    return None


def model_in_path(path: str) -> tuple[str | None, int | None] | None:
    """(name, version) of the model an inference path names: None for the default model or
    the newest version; None for any other path. `/v1/predict`,
    `/v1/models/{name}[/versions/{version}]/predict`,
    `/v2/models/{name}[/versions/{version}]/infer`."""
    if path == "/v1/predict":
        return None, None
    parts = path.split("/")
    if len(parts) not in (5, 7) or parts[0] or parts[2] != "models" or not parts[3]:
        return None
    if (parts[1], parts[-1]) not in (("v1", "predict"), ("v2", "infer")):
        return None
    if len(parts) == 5:
        return parts[3], None
    version = parts[5]
    if parts[4] != "versions" or not (version.isascii() and version.isdigit()):
        return None
    return parts[3], int(version)


def _run_arrays(detector: Detector, images: np.ndarray) -> dict[str, np.ndarray]:
    # Looked up per batch (not bound once), so a test can hold the model with a patched run.
    return detector.run_arrays(images)


class BatchObserver:
    """Records one model's batches (called on its inference thread)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.inference = metrics.inference_duration.labels(model)
        self.size = metrics.batch_size.labels(model)
        self.wait = metrics.queue_wait.labels(model)
        self.model = model
        self.shape_runs = metrics.batch_shape_runs
        self.runs_at: dict[int, Counter] = {}  # shape -> its counter child, looked up once
        self.padding = metrics.batch_padding.labels(model)

    def __call__(self, stats: BatchStats) -> None:
        self.inference.observe(stats.run_seconds)
        self.size.observe(stats.size)  # real images only, padding apart
        for seconds in stats.queue_waits:
            self.wait.observe(seconds)
        runs = self.runs_at.get(stats.shape)
        if runs is None:
            runs = self.runs_at[stats.shape] = self.shape_runs.labels(self.model, str(stats.shape))
        runs.inc()
        if stats.shape > stats.size:
            self.padding.inc(stats.shape - stats.size)


def check_tensor(images: np.ndarray, detector: Detector) -> None:
    """Refuse (400) tensors the model cannot take: wrong dtype or shape, non-finite values, or
    values outside the manifest's range. Results can then never contain NaN."""
    expected = detector.input_shape
    if images.dtype != np.float32:
        raise InvalidInput(f"images must be float32, got {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        dims = ", ".join(map(str, expected))
        raise InvalidInput(f"images must have shape [N, {dims}], got {list(images.shape)}")
    if len(images) == 0:
        raise InvalidInput("images holds no image (N = 0)")
    if not np.isfinite(images).all():
        raise InvalidInput("images contains NaN or infinite values")
    low, high = detector.manifest.input.value_range
    if images.min() < low or images.max() > high:
        raise InvalidInput(f"image values must lie in [{low:g}, {high:g}]")
