"""The `rcegate` command as a user meets it: --help shows the defaults in force, a mistake is one
line on stderr (a traceback only with --debug), and a model directory alone is enough to serve."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx

from tests.conftest import ROOT, TinyArtifact
from tests.service.live import RCEGATE, live_server


def rcegate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    clean.update({"COLUMNS": "200", "TERM": "dumb", **env})
    return subprocess.run(
        [str(RCEGATE), *args], capture_output=True, text=True, env=clean, cwd=ROOT, timeout=120
    )


def test_serve_help_shows_the_built_in_defaults() -> None:
    result = rcegate("serve", "--help")
    assert result.returncode == 0
    assert "[default: (8000)]" in result.stdout
    assert "[default: (127.0.0.1)]" in result.stdout
    assert "[default: (annotate)]" in result.stdout
    assert "[default: (mnist-rce if loaded, else the first loaded name)]" in result.stdout


def test_serve_help_shows_a_default_set_in_the_environment() -> None:
    result = rcegate("serve", "--help", RCEGATE_PORT="9123", RCEGATE_MODE="enforce")
    assert "[default: (9123 (from RCEGATE_PORT))]" in result.stdout
    assert "[default: (enforce (from RCEGATE_MODE))]" in result.stdout


def test_a_missing_checkpoint_is_one_line_and_a_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = rcegate("calibrate", "--checkpoint", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: no such checkpoint (--debug shows the traceback)"
    ]
    debug = rcegate("--debug", "calibrate", "--checkpoint", str(missing))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().endswith(f"FileNotFoundError: {missing}: no such checkpoint")


def test_a_bad_depth_is_one_line_before_any_data_is_loaded() -> None:
    result = rcegate("train", "--depth", "7", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: Invalid value for --depth: must be 6n+2 (20, 32, 56, ...), got 7 "
        "(--help lists the options)"
    ]


def test_an_unknown_option_and_an_invalid_setting_are_one_line() -> None:
    unknown = rcegate("serve", "--bogus")
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert unknown.stderr.startswith("error: No such option: --bogus")
    invalid = rcegate("serve", "--port", "99999")
    assert invalid.returncode == 2
    assert invalid.stderr.strip().splitlines() == [
        "error: invalid settings: RCEGATE_PORT: Input should be less than or equal to 65535 "
        "(got 99999)"
    ]


def test_every_option_of_every_command_has_help() -> None:
    import typer.main

    from rcegate.cli import app

    command = typer.main.get_command(app)
    missing = [
        f"{name} {param.name}"
        for name, sub in command.commands.items()  # type: ignore[attr-defined]
        for param in sub.params
        if not getattr(param, "help", None)
    ]
    assert missing == []


def test_a_model_dir_alone_serves_its_model_as_the_default(
    tiny_artifact: TinyArtifact, tmp_path: Path, digit_png: bytes
) -> None:
    with live_server(tmp_path / "server.log", "--model-dir", str(tiny_artifact.model_dir)) as live:
        response = httpx.post(
            f"{live.url}/v1/predict", files={"files": ("digit.png", digit_png)}, timeout=30
        )
        assert response.status_code == 200
        assert response.json()["model"] == tiny_artifact.name
        models = httpx.get(f"{live.url}/v1/models", timeout=10).json()["models"]
        assert [m["default"] for m in models] == [True]
    assert "default model: tiny" in (tmp_path / "server.log").read_text()
