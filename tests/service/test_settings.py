"""Settings come from RCEGATE_* variables and fail loudly on bad values."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import ROOT, TinyArtifact
from tests.service.conftest import wait_loaded
from tests.service.live import RCEGATE, free_port


def test_defaults_serve_the_project_models_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"RCEGATE_{name.upper()}", raising=False)
    settings = Settings()
    # default_model unset: mnist-rce when it is loaded, else the first loaded name
    assert (settings.host, settings.port, settings.default_model) == ("127.0.0.1", 8000, None)
    assert settings.model_dir == DEFAULT_MODEL_DIR == Path(__file__).parents[2] / "models"
    assert (settings.providers, settings.mode, settings.target_fpr) == ("auto", "annotate", None)


def test_decoding_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEGATE_MAX_PIXELS", "1000000")
    monkeypatch.setenv("RCEGATE_MAX_IMAGE_SIDE", "2000")
    monkeypatch.setenv("RCEGATE_MAX_REQUEST_PIXELS", "3000000")
    settings = Settings()
    assert (settings.max_pixels, settings.max_image_side, settings.max_request_pixels) == (
        1_000_000,
        2000,
        3_000_000,
    )
    for name in ("MAX_PIXELS", "MAX_IMAGE_SIDE", "MAX_REQUEST_PIXELS"):
        monkeypatch.delenv(f"RCEGATE_{name}")
    settings = Settings()
    assert (settings.max_pixels, settings.max_image_side, settings.max_request_pixels) == (
        2048 * 2048,
        4096,
        4 * 2048 * 2048,
    )


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
    [
        ("PROVIDERS", "tpu"),
        ("MODE", "strict"),
        ("TARGET_FPR", "1.5"),
        ("MAX_IMAGES", "0"),
        ("MAX_IMAGE_SIDE", "0"),
        ("MAX_REQUEST_PIXELS", "-1"),
    ],
)
def test_invalid_environment_value_is_refused_by_settings(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"RCEGATE_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_rcegate_serve_with_an_invalid_environment_value_exits_at_start() -> None:
    """The real command: it exits 2 before binding a port, naming the setting and the rule."""
    name, value = "MODE", "strict"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    env[f"RCEGATE_{name}"] = value
    done = subprocess.run(
        [str(RCEGATE), "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    # one line: the variable, the broken rule and the value given
    assert done.stderr.splitlines() == [
        "error: invalid settings: RCEGATE_MODE: Input should be 'annotate' or 'enforce' "
        "(got 'strict')"
    ]
    assert "Traceback" not in done.stderr and "Uvicorn running" not in done.stderr
