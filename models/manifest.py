"""The artifact manifest: the one schema shared by `training/` (which writes it) and `service/`.

Each model version lives in `models/<name>/<version>/` as `model.onnx` plus `manifest.json`.
The manifest says what the graph expects and computes, how its detection threshold was
calibrated (Pang et al., "Towards Robust Detection of Adversarial Examples", NeurIPS 2018:
accept iff score >= threshold, threshold = the target-FPR quantile of clean scores), and the
sha256 of `model.onnx`, which loaders check before use. Only pydantic and numpy are imported.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
SCHEMA_VERSION = 1

Metric = Literal["confidence", "non_me", "log_kd"]
METRICS: tuple[Metric, ...] = ("confidence", "non_me", "log_kd")
Objective = Literal["rce", "ce"]

INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = (
    "logits",
    "probabilities",
    "label",
    "confidence",
    "non_me",
    "log_kd",
    "accepted",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class SplitInfo(_Strict):
    """How the dataset was cut into train / calibration / test (all seeded, reproducible)."""

    train: int = Field(ge=0)
    calibration: int = Field(ge=0)
    test: int = Field(ge=0)
    seed: int


class DatasetInfo(_Strict):
    name: str
    class_names: list[str] = Field(min_length=2)
    split: SplitInfo


class InputSpec(_Strict):
    """The graph input `images`: float32 [N, C, H, W] with pixel values in `value_range`."""

    name: str = INPUT_NAME
    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    value_range: tuple[float, float] = (0.0, 1.0)
    dtype: Literal["float32"] = "float32"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class ArchitectureInfo(_Strict):
    name: str
    depth: int = Field(gt=0)
    widths: list[int]
    feature_dim: int = Field(gt=0)
    parameters: int = Field(ge=0)


class CalibrationTable(_Strict):
    """Clean-score quantiles: `thresholds[metric][i]` rejects about `fpr[i]` of clean inputs."""

    fpr: list[float] = Field(min_length=2)
    thresholds: dict[Metric, list[float]]

    @model_validator(mode="after")
    def _check_shape(self) -> CalibrationTable:
        if any(b <= a for a, b in zip(self.fpr, self.fpr[1:], strict=False)):
            raise ValueError("calibration table fpr levels must be strictly increasing")
        if not all(0.0 < f < 1.0 for f in self.fpr):
            raise ValueError("calibration table fpr levels must lie in (0, 1)")
        for metric, values in self.thresholds.items():
            if len(values) != len(self.fpr):
                raise ValueError(f"calibration table for {metric} has the wrong length")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"calibration table for {metric} has a non-finite value")
        return self

    @property
    def fpr_range(self) -> tuple[float, float]:
        return (self.fpr[0], self.fpr[-1])

    def threshold(self, metric: Metric, target_fpr: float) -> float:
        """The threshold for `metric` at `target_fpr`, interpolated between calibrated levels.

        Raises ValueError outside the calibrated range: extrapolating a quantile is a guess.
        """
        low, high = self.fpr_range
        if not low <= target_fpr <= high:
            raise ValueError(f"target_fpr must lie in [{low}, {high}], got {target_fpr}")
        return float(np.interp(target_fpr, self.fpr, self.thresholds[metric]))


class DetectionInfo(_Strict):
    default_metric: Metric = "log_kd"
    sigma2: float = Field(gt=0)
    bank_size_per_class: list[int]
    target_fpr: float = Field(gt=0, lt=1)
    thresholds: dict[Metric, float]
    calibration_size: int = Field(gt=0)
    calibration_table: CalibrationTable
    clean_acceptance: dict[Metric, float] = Field(
        default_factory=dict,
        description="Fraction of the clean TEST split accepted at each metric's threshold.",
    )


class Manifest(_Strict):
    """Everything a host needs to know about one exported model version."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: int = Field(ge=1)
    created_at: datetime
    source_commit: str | None = None
    dataset: DatasetInfo
    input: InputSpec
    outputs: list[str] = Field(default_factory=lambda: list(OUTPUT_NAMES))
    objective: Objective
    architecture: ArchitectureInfo
    clean_test_accuracy: float = Field(ge=0, le=1)
    detection: DetectionInfo
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    library_versions: dict[str, str] = Field(default_factory=dict)
    training: dict[str, str | int | float | bool | list[int] | list[float] | None] = Field(
        default_factory=dict, description="The training config the checkpoint was made with."
    )

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    def threshold(self, metric: Metric, target_fpr: float | None = None) -> float:
        """The deployed threshold, or the calibration table's at another `target_fpr`."""
        if target_fpr is None or target_fpr == self.detection.target_fpr:
            return self.detection.thresholds[metric]
        return self.detection.calibration_table.threshold(metric, target_fpr)

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((directory / MANIFEST_FILE).read_text(encoding="utf-8"))

    def dump(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n", "utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
