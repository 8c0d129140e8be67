"""One prediction request: decode and one ORT run per request in a worker thread (never on the
event loop), then the decision, the metrics and the response body. Routes call `predict`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio.to_thread
import numpy as np

from models.manifest import METRICS
from service.detector import Decision, Detector, Outputs
from service.imaging import (
    DecodedImage,
    DecodeLimits,
    check_request_pixels,
    decode_image,
    probe_image,
)
from service.metrics import Metrics
from service.payload import Upload
from service.schemas import (
    DecisionInfo,
    ImageResult,
    ImageSize,
    PredictResponse,
    Scores,
)
from service.settings import Mode


@dataclass(frozen=True)
class PredictOptions:
    target_fpr: float | None
    mode: Mode
    limits: DecodeLimits


def _decode_all(
    uploads: list[Upload], shape: tuple[int, int, int], limits: DecodeLimits, metrics: Metrics
) -> list[DecodedImage]:
    # Every header first: a request over its pixel budget is refused before any decoding.
    whats = [upload.describe(index) for index, upload in enumerate(uploads)]
    headers = [probe_image(u.data, what, limits) for u, what in zip(uploads, whats, strict=True)]
    check_request_pixels(headers, limits)
    decoded = []
    for upload, what in zip(uploads, whats, strict=True):
        start = time.perf_counter()
        decoded.append(decode_image(upload.data, shape, limits, what))
        metrics.decode_duration.observe(time.perf_counter() - start)
    return decoded


def _run(detector: Detector, images: np.ndarray, metrics: Metrics) -> Outputs:
    start = time.perf_counter()
    outputs = detector.run(images)
    metrics.inference_duration.labels(detector.name).observe(time.perf_counter() - start)
    metrics.batch_size.labels(detector.name).observe(len(images))
    return outputs


def _decode_and_run(
    detector: Detector, uploads: list[Upload], limits: DecodeLimits, metrics: Metrics
) -> tuple[list[DecodedImage], Outputs]:
    decoded = _decode_all(uploads, detector.input_shape, limits, metrics)
    return decoded, _run(detector, np.stack([image.pixels for image in decoded]), metrics)


def _record(metrics: Metrics, detector: Detector, outputs: Outputs, accepted: np.ndarray) -> None:
    names = detector.manifest.class_names
    version = str(detector.version)
    for label, ok in zip(outputs.label.tolist(), accepted.tolist(), strict=True):
        decision = "accepted" if ok else "rejected"
        metrics.images.labels(detector.name, version, decision, names[label]).inc()
    if metrics.detection_score is not None:
        for metric in METRICS:
            histogram = metrics.detection_score.labels(detector.name, metric)
            for value in outputs.scores[metric].tolist():
                histogram.observe(value)


def _results(
    detector: Detector,
    uploads: list[Upload],
    decoded: list[DecodedImage],
    outputs: Outputs,
    decision: Decision,
    accepted: np.ndarray,
    mode: Mode,
) -> list[ImageResult]:
    names = detector.manifest.class_names
    results = []
    for i, (upload, image) in enumerate(zip(uploads, decoded, strict=True)):
        ok = bool(accepted[i])
        label = int(outputs.label[i])
        shown = ok or mode == "annotate"
        width, height = image.original_size
        results.append(
            ImageResult(
                index=i,
                filename=upload.filename,
                label=label if shown else None,
                class_name=names[label] if shown else None,
                probabilities=outputs.probabilities[i].tolist() if shown else None,
                accepted=ok,
                decision=DecisionInfo(
                    metric=decision.metric,
                    score=float(outputs.scores[decision.metric][i]),
                    threshold=decision.threshold,
                    target_fpr=decision.target_fpr,
                ),
                scores=Scores(**{m: float(outputs.scores[m][i]) for m in METRICS}),
                original_size=ImageSize(width=width, height=height),
                resized=image.resized,
            )
        )
    return results


async def predict(
    detector: Detector, uploads: list[Upload], options: PredictOptions, metrics: Metrics
) -> PredictResponse:
    decision = detector.decision(options.target_fpr)  # an invalid target_fpr fails before decoding
    # One worker-thread hop for decode + ORT: the event loop only parses and answers.
    decoded, outputs = await anyio.to_thread.run_sync(
        _decode_and_run, detector, uploads, options.limits, metrics
    )
    accepted = Detector.accept(outputs, decision)
    _record(metrics, detector, outputs, accepted)
    return PredictResponse(
        model=detector.name,
        version=detector.version,
        mode=options.mode,
        predictions=_results(detector, uploads, decoded, outputs, decision, accepted, options.mode),
    )
