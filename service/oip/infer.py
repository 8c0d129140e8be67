"""One OIP inference, whatever the transport: the decoded request in, the answer's tensors out.

REST and gRPC both parse their wire format into an `InferRequest` (codec.py's checks), then
call `infer`, which asks the data plane for the verdicts and builds the tensors to return.
The order of work follows the v1 adapter: cheap refusals (unknown output, invalid target_fpr)
before admission, admission before any inference.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.dataplane import DataPlane, Prediction, PredictOptions
from service.detector import Detector
from service.errors import ServiceError
from service.metrics import Metrics
from service.oip.codec import response_parameters, result_tensors, select_outputs

PROTOCOLS = ("oip_rest", "oip_grpc")


@dataclass(frozen=True)
class InferRequest:
    """A decoded request: float32 [N, C, H, W] images and what to answer."""

    id: str
    images: np.ndarray
    options: PredictOptions
    outputs: list[str]  # in response order, the verdict included (codec.select_outputs)


@dataclass(frozen=True)
class InferAnswer:
    detector: Detector
    id: str
    prediction: Prediction
    outputs: list[str]
    tensors: dict[str, np.ndarray]  # every output, enforce mode applied
    parameters: dict[str, Any]  # the decision: metric, threshold, target_fpr, mode, counts


def plan_outputs(
    detector: Detector, options: PredictOptions, requested: list[str] | None
) -> list[str]:
    """Checks that need no tensor: the outputs asked for and the target FPR (400/422)."""
    detector.decision(options.target_fpr)
    return select_outputs(requested, detector.metric)


async def infer(
    plane: DataPlane,
    detector: Detector,
    request: InferRequest,
    deadline: float,
    client: str | None = None,
) -> InferAnswer:
    """`client` (`key:<id>` or `addr:<ip>`) is who asks, for prober tracking."""
    options = dataclasses.replace(request.options, client=client)
    prediction = await plane.predict_arrays(detector, request.images, options, deadline)
    return InferAnswer(
        detector=detector,
        id=request.id,
        prediction=prediction,
        outputs=request.outputs,
        tensors=result_tensors(prediction, plane.settings.withhold_rejected),
        parameters=response_parameters(prediction, plane.settings.withhold_rejected),
    )


def count(metrics: Metrics, protocol: str, error: BaseException | None) -> None:
    """One inference request by protocol and outcome (`ok` or the error's stable code)."""
    if error is None:
        status = "ok"
    elif isinstance(error, asyncio.CancelledError):  # a gRPC client cancelled or went away
        status = "client_disconnected"
    elif isinstance(error, ServiceError):
        status = error.code
    else:
        status = "internal_error"
    metrics.inference_requests.labels(protocol, status).inc()
