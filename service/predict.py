"""The v1 predict adapter: HTTP in, the data plane's verdicts out as the v1 response body.

Order of work, cheapest refusal first: the model and the query (404, 422), the model's queue
(503 before the body is read), the body (413/415/400 while it streams), admission of its images
(503 before any is decoded), then decoding and inference in the data plane. While the answer is
computed, a client that disconnects cancels its queued images (recorded as 499).
"""

from __future__ import annotations

import dataclasses
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from models.manifest import METRICS
from service.access import request_client
from service.dataplane import DataPlane, EncodedImage, Prediction, PredictOptions
from service.detector import Detector
from service.guard import cancel_on_disconnect
from service.payload import Upload, read_uploads


async def predict(
    plane: DataPlane, detector: Detector, options: PredictOptions, request: Request
) -> Response:
    """Answer a v1 predict request. The body is serialised once here (the route's
    `response_model` documents it), never validated by the framework."""
    arrival = time.monotonic()
    options = dataclasses.replace(options, client=request_client(request.scope))
    detector.decision(options.target_fpr, options.metric)  # an invalid one fails before the body
    plane.check_capacity(detector)
    s = plane.settings
    uploads = await read_uploads(request, s.max_body_bytes, s.max_images)
    images = [EncodedImage(u.data, u.describe(i)) for i, u in enumerate(uploads)]
    async with cancel_on_disconnect(request.receive, request.scope):
        prediction = await plane.predict_encoded(detector, images, options, plane.deadline(arrival))
    body = response_body(prediction, uploads, s.withhold_rejected)
    return Response(body, media_type="application/json")


def response_body(
    prediction: Prediction, uploads: list[Upload], withhold_rejected: bool = True
) -> bytes:
    """The v1 body (service.schemas.PredictResponse, field for field), built as plain data and
    serialised once by orjson: no model is validated per request. In enforce mode a rejected
    image shows no label; with `withhold_rejected` (the default) no score, threshold or
    probability either: the verdict is no score oracle."""
    p = prediction
    names = p.detector.manifest.class_names
    out = p.outputs
    labels = out.label.tolist()
    probabilities = out.probabilities.tolist()
    # every metric of the v1 schema: null for a model without it (mahalanobis, combined)
    scores = {m: out.scores[m].tolist() if m in out.scores else None for m in METRICS}
    accepted = p.accepted.tolist()
    metric, threshold, target_fpr = p.decision.metric, p.decision.threshold, p.decision.target_fpr
    decided = out.scores[metric].tolist()
    annotate = p.mode == "annotate"
    results = []
    for i, upload in enumerate(uploads):
        shown = accepted[i] or annotate  # Prediction.shown, without a call per image
        scored = shown or not withhold_rejected
        image = p.decoded[i] if p.decoded is not None else None
        width, height = image.original_size if image is not None else (0, 0)
        label = labels[i]
        results.append(
            {
                "index": i,
                "filename": upload.filename,
                "label": label if shown else None,
                "class_name": names[label] if shown else None,
                "probabilities": probabilities[i] if shown else None,
                "accepted": accepted[i],
                "decision": {
                    "metric": metric,
                    "score": decided[i] if scored else None,
                    "threshold": threshold if scored else None,
                    "target_fpr": target_fpr,
                },
                "scores": {m: None if (v := scores[m]) is None else v[i] for m in METRICS}
                if scored
                else None,
                "original_size": {"width": width, "height": height},
                "resized": image is not None and image.resized,
            }
        )
    body = {
        "model": p.detector.name,
        "version": p.detector.version,
        "mode": p.mode,
        "predictions": results,
    }
    return orjson.dumps(body)
