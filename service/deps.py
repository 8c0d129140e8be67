"""FastAPI dependencies as `Annotated` aliases: what routes receive, built from app state.

All are `async def`: they never block, and FastAPI would run a plain `def` in a worker thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from service.dataplane import DataPlane, PredictOptions
from service.detector import Detector
from service.guard import Lifecycle
from service.metrics import Metrics
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


async def get_plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.plane
    return plane


async def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


SettingsDep = Annotated[Settings, Depends(get_settings)]
PlaneDep = Annotated[DataPlane, Depends(get_plane)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
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


async def get_default_detector(repository: RepositoryDep) -> Detector:
    return repository.get(repository.default_name)


NamedDetectorDep = Annotated[Detector, Depends(get_named_detector)]
VersionedDetectorDep = Annotated[Detector, Depends(get_versioned_detector)]
DefaultDetectorDep = Annotated[Detector, Depends(get_default_detector)]


async def get_options(
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
            "name and probabilities of rejected images (and, with RCEGATE_WITHHOLD_REJECTED, "
            "the default, their scores and threshold). Default: RCEGATE_MODE."
        ),
    ] = None,
) -> PredictOptions:
    return PredictOptions(target_fpr=target_fpr, mode=mode)


OptionsDep = Annotated[PredictOptions, Depends(get_options)]
