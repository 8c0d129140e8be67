"""Start-up states: 503 everywhere but liveness while the models load; a load that crashes and
a missing model directory leave the service live but never ready, with the reason."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from service import repository as repository_module
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import READY_TIMEOUT, copy_model, started, wait_loaded

PNG = {"content-type": "image/png"}


def not_ready(message: str) -> dict[str, object]:
    return {"error": {"status": 503, "code": "not_ready", "message": message}}


def test_ready_models_and_predict_are_503_while_the_models_load(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    digit_png: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    loading, release = threading.Event(), threading.Event()
    original = repository_module.load_detector

    def held(*args: object, **kwargs: object) -> object:
        loading.set()
        assert release.wait(READY_TIMEOUT)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository_module, "load_detector", held)
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        try:
            assert loading.wait(READY_TIMEOUT), "loading never started"
            assert client.get("/health/live").status_code == 200
            still = not_ready("models are still loading")
            for response in (
                client.get("/health/ready"),
                client.get("/v1/models"),
                client.get("/v1/models/tiny"),
                client.post("/v1/predict", content=digit_png, headers=PNG),
                client.post("/v1/models/tiny/versions/1/predict", content=digit_png, headers=PNG),
            ):
                assert (response.status_code, response.json()) == (503, still), response.url
        finally:
            release.set()
        wait_loaded(client)
        assert client.get("/health/ready").status_code == 200
        assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 200


def test_a_crashing_version_load_refuses_only_that_version(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a refused model (ModelLoadError) but a bug or an ORT crash inside loading one
    version (issue 21: one bad entry must not stop every model)."""
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    copy_model(tiny_artifact.path, tmp_path, "tiny", 2)
    load = repository_module.load_detector

    def crash(directory: Path, *args: object, **kwargs: object) -> object:
        if directory.name == "2":
            raise RuntimeError("boom inside the loader")
        return load(directory, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository_module, "load_detector", crash)
    caplog.set_level(logging.ERROR, logger="service")
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        assert client.get("/health/ready").status_code == 200
        listed = client.get("/v1/models").json()
        assert [(m["name"], m["version"]) for m in listed["models"]] == [("tiny", 1)]
        assert listed["refused"] == [
            {
                "name": "tiny",
                "version": "2",
                "reason": "loading failed unexpectedly (RuntimeError)",
            }
        ]
    (record,) = [r for r in caplog.records if r.getMessage().startswith("loading ")]
    assert record.exc_info is not None and "boom inside the loader" in str(record.exc_info[1])


def test_a_crash_outside_version_loading_leaves_the_service_live_but_never_ready(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)

    def crash(*args: object, **kwargs: object) -> object:
        raise RuntimeError("boom outside the loader")

    monkeypatch.setattr(repository_module, "version_directories", crash)
    caplog.set_level(logging.ERROR, logger="service")
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert (ready.status_code, ready.json()) == (503, not_ready("model loading crashed"))
    (record,) = [r for r in caplog.records if r.getMessage() == "model loading crashed"]
    assert record.exc_info is not None and "boom outside the loader" in str(record.exc_info[1])


def test_a_missing_model_directory_is_logged_and_never_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    absent = tmp_path / "absent"
    caplog.set_level(logging.ERROR, logger="service")
    with started(Settings(model_dir=absent)) as client:
        wait_loaded(client)
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        message = "no model could be loaded (see the server log)"  # no path on open health
        assert (ready.status_code, ready.json()) == (503, not_ready(message))
        assert client.get("/v1/models").json() == {"models": [], "refused": []}
    messages = [r.getMessage() for r in caplog.records]
    assert f"model directory {absent} does not exist" in messages
