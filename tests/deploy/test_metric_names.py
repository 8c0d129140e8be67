"""The metric names the dashboard and alert rules rely on are the ones the service registers."""

from __future__ import annotations

import inspect

import pytest

from tests.deploy.conftest import HISTOGRAMS, METRICS


def test_the_service_registers_exactly_the_agreed_metrics() -> None:
    metrics = pytest.importorskip("service.metrics")
    registered = {family.name for family in metrics.Metrics().registry.collect()}
    # Counters report their family name without `_total`; the score histogram appears once
    # the models are loaded, so it is looked up in the source instead.
    registered = {f"{name}_total" if f"{name}_total" in METRICS else name for name in registered}
    assert '"rcegate_detection_score"' in inspect.getsource(metrics)
    assert registered | {"rcegate_detection_score"} == METRICS


def test_histograms_are_histograms() -> None:
    metrics = pytest.importorskip("service.metrics")
    kinds = {family.name: family.type for family in metrics.Metrics().registry.collect()}
    for name in HISTOGRAMS - {"rcegate_detection_score"}:
        assert kinds[name] == "histogram", name
