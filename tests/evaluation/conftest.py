"""Small real CE and RCE models for the evaluation tests: trained through the real pipeline
(train -> calibrate -> export) long enough to classify most digits, so attacks have something to
break. `tiny_artifact` (a few training steps) is too weak for that: it predicts one class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class SmallModel:
    artifact: Path
    checkpoint: Path
    calibration: Path
    objective: str


def build_small_model(root: Path, objective: str) -> SmallModel:
    from training.calibrate import calibrate
    from training.checkpoints import load_trained_model
    from training.config import TrainConfig
    from training.export import export_artifact
    from training.train import train

    checkpoint = root / "runs" / f"small-{objective}.pt"
    config = TrainConfig(
        dataset="mnist-5k", objective=objective, depth=8, epochs=2, batch_size=64, recipe="legacy"
    )
    train(config, checkpoint)
    model, config, dataset = load_trained_model(checkpoint)
    # Every score; K-density decides, as the paper's test (the combined decision is attacked by
    # name where it matters).
    result = calibrate(
        model, config.objective, dataset, target_fpr=0.05, bank_per_class=100,
        default_metric="log_kd",
    )  # fmt: skip
    calibration = checkpoint.with_suffix(".calibration.pt")
    result.save(calibration)
    artifact = export_artifact(
        model, config, dataset, result, root / "models", f"small-{objective}", 1
    )
    return SmallModel(artifact, checkpoint, calibration, objective)


@pytest.fixture(scope="session")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SmallModel]:
    root = tmp_path_factory.mktemp("small")
    return {objective: build_small_model(root, objective) for objective in ("ce", "rce")}
