"""FastAPI dependencies as `Annotated` aliases: what routes receive, built from app state.

All are `async def`: they never block, and FastAPI would run a plain `def` in a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from pydantic import BeforeValidator

from models.layout import MAX_VERSION, parse_version
from service.dataplane import DataPlane, PredictOptions
from service.detector import Detector
from service.guard import Lifecycle
from service.metrics import Metrics
from service.repository import ModelRepository
from service.settings import Mode, Settings


def _app_state(attribute: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency answering `request.app.state.<attribute>`, which the app factory sets once;
    the alias below it carries the type."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    dependency.__name__ = f"get_{attribute}"  # how FastAPI and tracebacks name it
    return dependency


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
PlaneDep = Annotated[DataPlane, Depends(_app_state("plane"))]
LifecycleDep = Annotated[Lifecycle, Depends(_app_state("lifecycle"))]
RepositoryDep = Annotated[ModelRepository, Depends(_app_state("repository"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
ModelName = Annotated[str, Path(description="Model name, e.g. mnist-rce.")]


async def get_named_detector(repository: RepositoryDep, name: ModelName) -> Detector:
    return repository.get(name)


def _canonical_version(text: object) -> object:
    """Only the canonical spelling of a version (`2`, never `02`, `2.0`, `2_0`, ` 2`, `²` or
    a 5,000-digit number), checked on the raw text before any integer conversion."""
    if isinstance(text, str) and parse_version(text) is None:
        raise ValueError(
            f"a version is 1-10 ASCII digits without a leading zero, at most {MAX_VERSION}"
        )
    return text


# The validator after Path(), so the OpenAPI schema keeps minimum/maximum.
VersionPath = Annotated[
    int,
    Path(ge=1, le=MAX_VERSION, description="Model version (canonical: 2, not 02 or 2.0)."),
    BeforeValidator(_canonical_version),
]


async def get_versioned_detector(
    repository: RepositoryDep, name: ModelName, version: VersionPath
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
