"""FastAPI dependencies as `Annotated` aliases: what routes receive, built from app state.

All are `async def`: they never block, and FastAPI would run a plain `def` in a worker thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from service.detector import Detector
from service.imaging import DecodeLimits
from service.metrics import Metrics
from service.payload import Upload, read_uploads
from service.predict import PredictOptions
from service.repository import ModelRepository
from service.settings import Mode, Settings


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_repository(request: Request) -> ModelRepository:
    repository: ModelRepository = request.app.state.repository
    return repository


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def get_named_detector(
    repository: RepositoryDep,
    name: Annotated[str, Path(description="Model name, e.g. mnist-rce.")],
) -> Detector:
    return repository.get(name)


async def get_versioned_detector(
    repository: RepositoryDep,
    name: Annotated[str, Path(description="Model name, e.g. mnist-rce.")],
    version: Annotated[int, Path(ge=1, description="Model version.")],
) -> Detector:
    return repository.get(name, version)


async def get_default_detector(repository: RepositoryDep, settings: SettingsDep) -> Detector:
    return repository.get(settings.default_model)


NamedDetectorDep = Annotated[Detector, Depends(get_named_detector)]
VersionedDetectorDep = Annotated[Detector, Depends(get_versioned_detector)]
DefaultDetectorDep = Annotated[Detector, Depends(get_default_detector)]


async def get_options(
    settings: SettingsDep,
    target_fpr: Annotated[
        float | None,
        Query(
            gt=0,
            lt=1,
            allow_inf_nan=False,
            description="Target false-positive rate on clean data; picks the threshold from the "
            "model's calibration table (422 outside its range). Default: the served one.",
        ),
    ] = None,
    mode: Annotated[
        Mode | None,
        Query(
            description="annotate: return everything; enforce: withhold the label, class "
            "name and probabilities of rejected images. Default: RCEGATE_MODE."
        ),
    ] = None,
) -> PredictOptions:
    return PredictOptions(
        target_fpr=settings.target_fpr if target_fpr is None else target_fpr,
        mode=mode or settings.mode,
        limits=DecodeLimits(
            settings.max_image_side, settings.max_pixels, settings.max_request_pixels
        ),
    )


async def get_uploads(request: Request, settings: SettingsDep) -> list[Upload]:
    return await read_uploads(request, settings.max_body_bytes, settings.max_images)


OptionsDep = Annotated[PredictOptions, Depends(get_options)]
UploadsDep = Annotated[list[Upload], Depends(get_uploads)]
