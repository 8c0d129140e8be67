"""The native v1 API, health and metrics: each route translates HTTP to one domain call.

`PredictFastPath` takes the hot v1 predict requests past FastAPI's routing and dependency
solving (see its docstring); the routes below stay the reference and the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service.dataplane import DataPlane, PredictOptions
from service.deps import (
    DefaultDetectorDep,
    MetricsDep,
    NamedDetectorDep,
    OptionsDep,
    PlaneDep,
    RepositoryDep,
    SettingsDep,
    VersionedDetectorDep,
)
from service.detector import Detector
from service.errors import NotReady, ServiceError
from service.imaging import CONTENT_TYPES
from service.predict import predict
from service.repository import ModelRepository
from service.schemas import (
    DetectionSummary,
    ErrorBody,
    Health,
    InputInfo,
    ModelInfo,
    ModelList,
    PredictResponse,
    RefusedModel,
)

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Undecodable image, no image, or a malformed multipart body.",
        403: "A mode or target_fpr the operator's policy does not permit this client.",
        404: "Unknown model or version.",
        413: "Body over the byte limit, too many images, or an image over the pixel limit.",
        415: "Unsupported Content-Type.",
        422: "Invalid query value (e.g. target_fpr outside the calibrated range).",
        503: "Models still loading or none loaded; overloaded (queue full, too many requests, "
        "deadline passed) or shutting down: retry after the `Retry-After` seconds.",
        408: "The request body did not arrive within the body timeout.",
    }.items()
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# The body is read by `read_uploads` (to enforce the byte limit while streaming), so describe it.
_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One or more images as multipart `files` parts, or one raw image body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            **dict.fromkeys(sorted(CONTENT_TYPES), _BINARY),
        },
    }
}
_PREDICT: dict[str, Any] = {
    "response_model": PredictResponse,
    "responses": _ERRORS,
    "openapi_extra": _IMAGE_BODY,
    "tags": ["predict"],
}


@router.post(
    "/v1/models/{name}/predict", summary="Predict with a model's newest version", **_PREDICT
)
async def predict_named(
    detector: NamedDetectorDep, options: OptionsDep, plane: PlaneDep, request: Request
) -> Response:
    return await predict(plane, detector, options, request)


@router.post(
    "/v1/models/{name}/versions/{version}/predict", summary="Predict with one version", **_PREDICT
)
async def predict_versioned(
    detector: VersionedDetectorDep, options: OptionsDep, plane: PlaneDep, request: Request
) -> Response:
    return await predict(plane, detector, options, request)


@router.post("/v1/predict", summary="Predict with the default model", **_PREDICT)
async def predict_default(
    detector: DefaultDetectorDep, options: OptionsDep, plane: PlaneDep, request: Request
) -> Response:
    return await predict(plane, detector, options, request)


def model_info(detector: Detector, default: bool) -> ModelInfo:
    m = detector.manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        created_at=m.created_at,
        source_commit=m.source_commit,
        dataset=m.dataset.name,
        class_names=m.class_names,
        input=InputInfo(
            **m.input.model_dump(include={"channels", "height", "width", "value_range"})
        ),
        objective=m.objective,
        architecture=m.architecture.name,
        clean_test_accuracy=m.clean_test_accuracy,
        detection=DetectionSummary(
            default_metric=m.detection.default_metric,
            metrics=list(detector.metrics),
            combined_metrics=m.detection.combined.metrics if m.detection.combined else None,
            target_fpr=detector.default_target_fpr,
            calibrated_target_fpr=m.detection.target_fpr,
            thresholds=detector.thresholds(),
            target_fpr_range=m.detection.calibration_table.fpr_range,
            sigma2=m.detection.sigma2,
            clean_acceptance=m.detection.clean_acceptance,
        ),
        sha256=m.sha256,
        providers=detector.providers,
        provider_options=detector.provider_options,
        batch_shapes=None if detector.shapes.sizes is None else list(detector.shapes.sizes),
        warmup_seconds=detector.warmup_seconds,
        default=default,
    )


def _is_default(repository: RepositoryDep, detector: Detector) -> bool:
    if detector.name != repository.default_name:
        return False
    return repository.get(detector.name).version == detector.version


@router.get("/v1/models", response_model=ModelList, tags=["models"], responses=_ERRORS)
async def list_models(repository: RepositoryDep, settings: SettingsDep) -> ModelList:
    if not repository.loaded:
        raise NotReady("models are still loading")
    return ModelList(
        models=[model_info(d, _is_default(repository, d)) for d in repository.detectors()],
        refused=[
            RefusedModel(name=r.name, version=r.version, reason=r.reason)
            for r in repository.refused
        ],
    )


@router.get("/v1/models/{name}", response_model=ModelInfo, tags=["models"], responses=_ERRORS)
async def get_model(
    detector: NamedDetectorDep, repository: RepositoryDep, settings: SettingsDep
) -> ModelInfo:
    return model_info(detector, _is_default(repository, detector))


@router.get(
    "/v1/models/{name}/versions/{version}",
    response_model=ModelInfo,
    tags=["models"],
    responses=_ERRORS,
)
async def get_model_version(
    detector: VersionedDetectorDep, repository: RepositoryDep, settings: SettingsDep
) -> ModelInfo:
    return model_info(detector, _is_default(repository, detector))


# HEAD too: probes and load balancers often send it (issue 12).
@router.head("/health/live", response_model=Health, tags=["health"])
@router.get("/health/live", response_model=Health, tags=["health"])
async def live() -> Health:
    return Health(status="live")


@router.head("/health/ready", response_model=Health, tags=["health"], responses=_ERRORS)
@router.get("/health/ready", response_model=Health, tags=["health"], responses=_ERRORS)
async def ready(plane: PlaneDep) -> Health:
    plane.check_ready()
    detail = f"{len(plane.repository.detectors())} model version(s) loaded"
    return Health(status="ready", detail=detail)


@router.get("/metrics", tags=["metrics"], response_class=Response)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]
_MODELS = "/v1/models/"
_PREDICT_SUFFIX = "/predict"
_NO_OPTIONS = PredictOptions()


class PredictFastPath:
    """`POST /v1/predict` and `POST /v1/models/{name}/predict` without a query string (what
    nearly every client sends) taken straight to `predict`, past FastAPI's routing and
    dependency solving: a fifth of the event loop's time per request when profiled. The work,
    the route the metrics and the access log name, and the error bodies (from the app's own
    handler) are those of the routes above; everything else, query strings to validate and
    versioned paths included, goes on to FastAPI unchanged. Sits inside the guard and the access
    layer, so limits, keys and logging apply as to any request."""

    def __init__(
        self,
        app: ASGIApp,
        repository: ModelRepository,
        plane: DataPlane,
        handle: ErrorHandler,
    ) -> None:
        self.app = app
        self.repository = repository
        self.plane = plane
        self.handle = handle
        self._default = _route("/v1/predict")
        self._named = _route("/v1/models/{name}/predict")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["query_string"]
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        name: str | None = None
        if path == "/v1/predict":
            route = self._default
        elif path.startswith(_MODELS) and path.endswith(_PREDICT_SUFFIX):
            name = path[len(_MODELS) : -len(_PREDICT_SUFFIX)]
            if not name or "/" in name:
                await self.app(scope, receive, send)
                return
            route = self._named
            scope["path_params"] = {"name": name}
        else:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        request = Request(scope, receive)
        try:
            repository = self.repository
            detector = repository.get(name or repository.default_name)
            response = await predict(self.plane, detector, _NO_OPTIONS, request)
        except (ServiceError, ClientDisconnect) as exc:
            response = await self.handle(request, exc)
        await response(scope, receive, send)


def _route(template: str) -> APIRoute:
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == template:
            return route
    raise LookupError(template)
