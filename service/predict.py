"""The v1 predict adapter: HTTP in, the data plane's verdicts out as the v1 response body.

Order of work, cheapest refusal first: the model and the query (404, 422), the model's queue
(503 before the body is read), the body (413/415/400 while it streams), admission of its images
(503 before any is decoded), then decoding and inference in the data plane. While the answer is
computed, a client that disconnects cancels its queued images (recorded as 499).
"""

from __future__ import annotations

import dataclasses
import time

from starlette.requests import Request
from starlette.responses import Response

from service.access import request_client
from service.dataplane import DataPlane, EncodedImage, Prediction, PredictOptions
from service.detector import Detector
from service.guard import cancel_on_disconnect
from service.payload import Upload, read_uploads
from service.schemas import DecisionInfo, ImageResult, ImageSize, PredictResponse, Scores


async def predict(
    plane: DataPlane, detector: Detector, options: PredictOptions, request: Request
) -> Response:
    """Answer a v1 predict request. The body is serialised once here (the route's
    `response_model` documents it), not validated again by the framework."""
    arrival = time.monotonic()
    options = dataclasses.replace(options, client=request_client(request.scope))
    detector.decision(options.target_fpr, options.metric)  # an invalid one fails before the body
    plane.check_capacity(detector)
    s = plane.settings
    uploads = await read_uploads(request, s.max_body_bytes, s.max_images)
    images = [EncodedImage(u.data, u.describe(i)) for i, u in enumerate(uploads)]
    async with cancel_on_disconnect(request.receive):
        prediction = await plane.predict_encoded(detector, images, options, plane.deadline(arrival))
    body = response(prediction, uploads, s.withhold_rejected).model_dump_json()
    return Response(body, media_type="application/json")


def response(
    prediction: Prediction, uploads: list[Upload], withhold_rejected: bool = True
) -> PredictResponse:
    """The v1 body. In enforce mode a rejected image shows no label; with `withhold_rejected`
    (the default) no score, threshold or probability either: the verdict is no score oracle."""
    p = prediction
    names = p.detector.manifest.class_names
    out = p.outputs
    results = []
    for i, upload in enumerate(uploads):
        label = int(out.label[i])
        shown = p.shown(i)
        scored = shown or not withhold_rejected
        image = p.decoded[i] if p.decoded is not None else None
        width, height = image.original_size if image is not None else (0, 0)
        results.append(
            ImageResult(
                index=i,
                filename=upload.filename,
                label=label if shown else None,
                class_name=names[label] if shown else None,
                probabilities=out.probabilities[i].tolist() if shown else None,
                accepted=bool(p.accepted[i]),
                decision=DecisionInfo(
                    metric=p.decision.metric,
                    score=float(out.scores[p.decision.metric][i]) if scored else None,
                    threshold=p.decision.threshold if scored else None,
                    target_fpr=p.decision.target_fpr,
                ),
                scores=Scores(**{m: float(v[i]) for m, v in out.scores.items()})
                if scored
                else None,
                original_size=ImageSize(width=width, height=height),
                resized=bool(image is not None and image.resized),
            )
        )
    return PredictResponse(
        model=p.detector.name, version=p.detector.version, mode=p.mode, predictions=results
    )
