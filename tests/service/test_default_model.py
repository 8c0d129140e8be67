"""The committed default model (models/mnist-rce/2), served exactly as `rcegate serve` loads it."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.manifest import Manifest
from tests.conftest import DEFAULT_MODEL_DIR
from tests.service.conftest import encode


def test_default_model_loads_out_of_the_box(default_client: TestClient) -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    assert default_client.get("/health/ready").status_code == 200
    listing = default_client.get("/v1/models").json()
    assert listing["refused"] == []
    (default,) = [m for m in listing["models"] if m["default"]]
    assert (default["name"], default["version"]) == (manifest.name, manifest.version)
    assert default["providers"][-1] == "CPUExecutionProvider"


def test_default_model_reproduces_its_manifest_figures_on_its_own_test_split(
    default_client: TestClient, default_test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """All 500 digits of the artifact's TEST split (never trained or calibrated on), through
    HTTP: the served accuracy and acceptance are the ones export measured and recorded."""
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    images, labels = default_test_digits
    assert len(images) == manifest.dataset.split.test == 500
    results = []
    for start in range(0, len(images), 64):  # max_images per request
        chunk = images[start : start + 64]
        files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(chunk)]
        response = default_client.post("/v1/predict", files=files)
        assert response.status_code == 200
        results += response.json()["predictions"]
    assert len(results) == len(images)
    accuracy = np.mean([r["label"] == y for r, y in zip(results, labels, strict=True)])
    acceptance = np.mean([r["accepted"] for r in results])
    # Up to 2 of 500 images may flip at float rounding between torch (export) and ORT here.
    assert accuracy == pytest.approx(manifest.clean_test_accuracy, abs=2 / 500)
    expected = manifest.detection.clean_acceptance[manifest.detection.default_metric]
    assert acceptance == pytest.approx(expected, abs=2 / 500)


def test_default_model_rejects_noise(default_client: TestClient) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(noise)]
    response = default_client.post("/v1/predict?mode=enforce", files=files)
    assert response.status_code == 200
    results = response.json()["predictions"]
    assert not any(r["accepted"] for r in results)
    assert all(r["label"] is None for r in results)
