"""The committed default model (models/mnist-rce/1), served exactly as `rcegate serve` loads it."""

from __future__ import annotations

import numpy as np
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


def test_default_model_classifies_and_accepts_real_digits(
    default_client: TestClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits[0][-64:], digits[1][-64:]
    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(images)]
    response = default_client.post("/v1/predict", files=files)
    assert response.status_code == 200
    results = response.json()["predictions"]
    assert np.mean([r["label"] == y for r, y in zip(results, labels, strict=True)]) >= 0.9
    assert np.mean([r["accepted"] for r in results]) >= 0.8


def test_default_model_rejects_noise(default_client: TestClient) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(noise)]
    response = default_client.post("/v1/predict?mode=enforce", files=files)
    assert response.status_code == 200
    results = response.json()["predictions"]
    assert not any(r["accepted"] for r in results)
    assert all(r["label"] is None for r in results)
