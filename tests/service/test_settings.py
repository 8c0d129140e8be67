"""Settings come from RCEGATE_* variables and fail loudly on bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import wait_loaded


def test_defaults_serve_the_project_models_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"RCEGATE_{name.upper()}", raising=False)
    settings = Settings()
    assert (settings.host, settings.port, settings.default_model) == (
        "127.0.0.1",
        8000,
        "mnist-rce",
    )
    assert settings.model_dir == DEFAULT_MODEL_DIR == Path(__file__).parents[2] / "models"
    assert (settings.providers, settings.mode, settings.target_fpr) == ("auto", "annotate", None)


def test_factory_without_arguments_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tiny_artifact: TinyArtifact
) -> None:
    monkeypatch.setenv("RCEGATE_MODEL_DIR", str(tiny_artifact.model_dir))
    monkeypatch.setenv("RCEGATE_DEFAULT_MODEL", tiny_artifact.name)
    monkeypatch.setenv("RCEGATE_MODE", "enforce")
    with TestClient(create_app()) as client:  # what `uvicorn --factory` calls
        wait_loaded(client)
        assert client.get("/v1/models/tiny").json()["default"] is True
        assert client.app.state.settings.mode == "enforce"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "value"),
    [("PROVIDERS", "tpu"), ("MODE", "strict"), ("TARGET_FPR", "1.5"), ("MAX_IMAGES", "0")],
)
def test_invalid_environment_value_fails_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"RCEGATE_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()
