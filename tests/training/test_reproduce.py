"""Slow: the committed default model is reproducible by its documented command (about 25 minutes
on one core)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.manifest import Manifest
from rcegate.cli import app
from tests.conftest import DEFAULT_MODEL_DIR, last_json


@pytest.mark.slow
def test_documented_command_reproduces_the_default_model(tmp_path: Path) -> None:
    committed = Manifest.load(DEFAULT_MODEL_DIR)
    args = [
        "pipeline", "--name", "mnist-rce", "--version", "2", "--dataset", "mnist-5k",
        "--objective", "rce", "--depth", "20", "--steps", "1500",
        "--model-dir", str(tmp_path / "models"), "--work-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    rebuilt = Manifest.load(Path(summary["artifact"]))
    assert rebuilt.clean_test_accuracy >= 0.97
    assert abs(rebuilt.clean_test_accuracy - committed.clean_test_accuracy) <= 0.01
    target = 1 - rebuilt.detection.target_fpr
    assert abs(rebuilt.detection.clean_acceptance["log_kd"] - target) <= 0.02 + 1e-9
    assert rebuilt.dataset == committed.dataset
    # Fields added after the commit (e.g. revert) must hold their defaults.
    assert {k: rebuilt.training[k] for k in committed.training} == committed.training
    assert rebuilt.training.get("revert", []) == []
    assert rebuilt.training["recipe"] == "official"
