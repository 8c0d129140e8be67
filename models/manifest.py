"""The artifact manifest: the one schema shared by `training/` (which writes it) and `service/`.

Each model version lives in `models/<name>/<version>/` as `model.onnx` plus `manifest.json`.
The manifest says what the graph expects and computes, how its detection threshold was
calibrated (Pang et al., "Towards Robust Detection of Adversarial Examples", NeurIPS 2018:
accept iff score >= threshold, threshold = the target-FPR quantile of clean scores), and the
sha256 of `model.onnx`, which loaders check before use. Only pydantic and numpy are imported.

Every field is bounded (string lengths, list and dict sizes): a manifest is read from disk by
the service and echoed by `GET /v1/models`. The fields that move a decision or what a client is
told (the `Binding`: objective, class names, input, the whole detection section with its
calibration table) are also carried by the graph itself, in its ONNX metadata under
`BINDING_KEY`, so editing the manifest alone cannot move any decision: loaders compare the two.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
SIGNATURE_FILE = "manifest.json.sig"  # detached Ed25519 signature over manifest.json's bytes
SCHEMA_VERSION = 1
# ONNX metadata key of the graph's copy of the manifest's decision constants (see `Binding`).
BINDING_KEY = "rcegate.binding"

# Field bounds: generous for any real artifact, small enough that a manifest stays small.
MAX_CLASSES = 10_000
MAX_LEVELS = 10_000  # calibration table rows
Text = Annotated[str, StringConstraints(max_length=256)]
Key = Annotated[str, StringConstraints(max_length=64)]

Metric = Literal["confidence", "non_me", "log_kd"]
# One list of detection metrics: the graph outputs one score per metric, in this order.
METRICS: tuple[Metric, ...] = get_args(Metric)
Objective = Literal["rce", "ce"]

INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = ("logits", "probabilities", "label", *METRICS, "accepted")


class _Strict(BaseModel):
    # Every float finite: an infinite or NaN threshold, calibration level, sigma^2 or range
    # would make a decision no number can meet, or an answer JSON cannot carry (issue 21).
    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False
    )


class SplitInfo(_Strict):
    """How the dataset was cut into train / calibration / test (all seeded, reproducible)."""

    train: int = Field(ge=0)
    calibration: int = Field(ge=0)
    test: int = Field(ge=0)
    seed: int


class DatasetInfo(_Strict):
    name: Text
    class_names: list[Text] = Field(min_length=2, max_length=MAX_CLASSES)
    split: SplitInfo


class InputSpec(_Strict):
    """The graph input `images`: float32 [N, C, H, W] with pixel values in `value_range`."""

    name: Literal["images"] = "images"
    channels: Literal[1, 3]
    height: int = Field(gt=0, le=65_536)
    width: int = Field(gt=0, le=65_536)
    value_range: tuple[float, float] = (0.0, 1.0)
    dtype: Literal["float32"] = "float32"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class ArchitectureInfo(_Strict):
    name: Text
    depth: int = Field(gt=0)
    widths: list[int] = Field(max_length=64)
    feature_dim: int = Field(gt=0)
    parameters: int = Field(ge=0)


class CalibrationTable(_Strict):
    """Clean-score quantiles: `thresholds[metric][i]` rejects about `fpr[i]` of clean inputs."""

    fpr: list[float] = Field(min_length=2, max_length=MAX_LEVELS)
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
            # Interpolation computes each segment's slope: finite values can still overflow
            # it (1e308 apart, or levels 1e-300 apart), and then a threshold is inf or NaN.
            with np.errstate(over="ignore", invalid="ignore"):
                slopes = np.diff(np.asarray(values)) / np.diff(np.asarray(self.fpr))
            if not np.isfinite(slopes).all():
                raise ValueError(
                    f"calibration table for {metric} interpolates to a non-finite threshold"
                )
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
        threshold = float(np.interp(target_fpr, self.fpr, self.thresholds[metric]))
        if not math.isfinite(threshold):  # the validator above makes this unreachable
            raise ValueError(f"the calibration table gives no finite threshold at {target_fpr}")
        return threshold


class DetectionInfo(_Strict):
    default_metric: Metric = "log_kd"
    sigma2: float = Field(gt=0)
    bank_size_per_class: list[int] = Field(max_length=MAX_CLASSES)
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
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=128)
    version: int = Field(ge=1, le=1_000_000_000)
    created_at: datetime
    source_commit: Key | None = None
    dataset: DatasetInfo
    input: InputSpec
    outputs: list[Key] = Field(default_factory=lambda: list(OUTPUT_NAMES), max_length=16)
    objective: Objective
    architecture: ArchitectureInfo
    clean_test_accuracy: float = Field(ge=0, le=1)
    detection: DetectionInfo
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int
    library_versions: dict[Key, Key] = Field(default_factory=dict, max_length=64)
    training: dict[Key, Text | int | float | bool | list[int] | list[float] | None] = Field(
        default_factory=dict,
        max_length=256,
        description="The training config the checkpoint was made with.",
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

    def binding(self) -> Binding:
        """The decision constants, as the graph's metadata must carry them."""
        return Binding(
            objective=self.objective,
            class_names=self.dataset.class_names,
            input=self.input,
            detection=self.detection,
        )

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((directory / MANIFEST_FILE).read_text(encoding="utf-8"))

    def dump(self, directory: Path) -> None:
        (directory / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n", "utf-8")


class Binding(_Strict):
    """Every manifest field that moves a decision or what a client is told about an image.

    The export writes `to_json()` into the graph's ONNX metadata under `BINDING_KEY` (and the
    manifest's sha256 covers the graph), so a loader that finds the manifest's binding unequal
    to the graph's refuses the version: editing a threshold, a calibration level, the default
    metric or a class name in manifest.json alone is caught.
    """

    objective: Objective
    class_names: list[Text] = Field(min_length=2, max_length=MAX_CLASSES)
    input: InputSpec
    detection: DetectionInfo

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces, shortest float repr): reproducible bytes."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), allow_nan=False
        )

    def differences(self, other: Binding) -> list[str]:
        """Dotted names of the fields that differ (`detection.calibration_table`, ...)."""
        names = []
        for field in type(self).model_fields:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine == theirs:
                continue
            if isinstance(mine, BaseModel):
                names += [
                    f"{field}.{sub}"
                    for sub in type(mine).model_fields
                    if getattr(mine, sub) != getattr(theirs, sub)
                ]
            else:
                names.append(field)
        return names


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
