"""The metric names the dashboard and alert rules rely on are the ones a running service
registers: a real app over the committed default model, its registry read after loading."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR
from tests.deploy.conftest import HISTOGRAMS, METRICS
from tests.service.conftest import started, wait_loaded


@pytest.fixture(scope="module")
def registry() -> Iterator[CollectorRegistry]:
    """The registry of an app that has loaded its models (the score histogram exists only then)."""
    limit = Image.MAX_IMAGE_PIXELS  # an app sets Pillow's process-wide limit: put it back
    try:
        with started(Settings(model_dir=DEFAULT_MODEL_DIR.parent.parent)) as client:
            wait_loaded(client)
            assert client.get("/health/ready").status_code == 200
            yield client.app.state.metrics.registry  # type: ignore[attr-defined]
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def exposed_names(registry: CollectorRegistry) -> dict[str, str]:
    """Family name as PromQL reads it (counters with `_total`) -> type."""
    return {
        f"{family.name}_total" if family.type == "counter" else family.name: family.type
        for family in registry.collect()
    }


def test_the_service_registers_exactly_the_agreed_metrics(registry: CollectorRegistry) -> None:
    assert set(exposed_names(registry)) == METRICS


def test_histograms_are_histograms(registry: CollectorRegistry) -> None:
    kinds = exposed_names(registry)
    assert {name for name, kind in kinds.items() if kind == "histogram"} == HISTOGRAMS
