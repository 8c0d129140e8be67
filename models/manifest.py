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
MAX_FEATURES = 4_096  # dimension of one Mahalanobis layer
MAX_LAYERS = 8
MAX_KNOTS = 4_096  # clean-score quantiles per component of the combined score
Text = Annotated[str, StringConstraints(max_length=256)]
Key = Annotated[str, StringConstraints(max_length=64)]
# A decision constant: NaN or infinity in one would silently move every decision.
Finite = Annotated[float, Field(allow_inf_nan=False)]

Metric = Literal["confidence", "non_me", "log_kd", "mahalanobis", "combined"]
# One list of detection metrics: the graph outputs one score per metric, in this order.
METRICS: tuple[Metric, ...] = get_args(Metric)
# The paper's three scores, which every artifact computes (schema 1 artifacts compute only
# these): the metrics after them are optional, and a manifest lists the ones its graph has.
PAPER_METRICS: tuple[Metric, ...] = ("confidence", "non_me", "log_kd")
Objective = Literal["rce", "ce"]

INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = ("logits", "probabilities", "label", *METRICS, "accepted")
# The outputs every artifact has; an artifact's outputs are these plus some metrics, in
# OUTPUT_NAMES order.
REQUIRED_OUTPUTS: tuple[str, ...] = ("logits", "probabilities", "label", *PAPER_METRICS, "accepted")


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


class MahalanobisLayer(_Strict):
    """One layer of the Mahalanobis score (Lee et al., NeurIPS 2018): class means and the tied
    precision matrix of that layer's (spatially averaged) features over the training images,
    and the clean calibration mean and standard deviation of its score -min_c d_c(x)."""

    name: Key
    means: list[list[Finite]] = Field(min_length=2, max_length=MAX_CLASSES)  # [L, D]
    precision: list[list[Finite]] = Field(min_length=1, max_length=MAX_FEATURES)  # [D, D]
    centre: Finite
    scale: Finite = Field(gt=0)

    @model_validator(mode="after")
    def _check_shape(self) -> MahalanobisLayer:
        dim = len(self.precision)
        if any(len(row) != dim for row in self.precision):
            raise ValueError(f"mahalanobis layer {self.name}: precision must be square")
        if any(len(row) != dim for row in self.means):
            raise ValueError(f"mahalanobis layer {self.name}: means must have {dim} columns")
        return self

    @property
    def dim(self) -> int:
        return len(self.precision)


class MahalanobisInfo(_Strict):
    """The constants of the `mahalanobis` score: the mean over `layers` of each layer's
    standardised score (centre, scale); with one layer, Lee et al.'s score on that layer."""

    source: Literal["bank", "train"] = Field(
        description="Fitted on the K-density bank's images or on the whole training split."
    )
    samples_per_class: list[int] = Field(max_length=MAX_CLASSES)
    layers: list[MahalanobisLayer] = Field(min_length=1, max_length=MAX_LAYERS)


class CombinedInfo(_Strict):
    """The `combined` score: min over `metrics` of each one's clean CDF, piecewise linear through
    `knots[m]` (the clean calibration scores' quantiles at levels 0, 1/(K-1), ..., 1), extended
    linearly below the lowest knot. Rejecting `combined < T` rejects an input when ANY of the
    metrics is below its clean T-quantile: the union test, calibrated jointly as one score."""

    metrics: list[Metric] = Field(min_length=2, max_length=len(METRICS) - 1)
    knots: dict[Metric, list[Finite]]

    @model_validator(mode="after")
    def _check_knots(self) -> CombinedInfo:
        if "combined" in self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ValueError("combined metrics must be distinct metrics other than combined")
        if set(self.knots) != set(self.metrics):
            raise ValueError("combined knots must be given for exactly its metrics")
        lengths = {len(k) for k in self.knots.values()}
        if len(lengths) != 1 or not 2 <= lengths.pop() <= MAX_KNOTS:
            raise ValueError(f"combined knots: one length for all metrics, 2..{MAX_KNOTS}")
        for metric, knots in self.knots.items():
            if any(b < a for a, b in zip(knots, knots[1:], strict=False)):
                raise ValueError(f"combined knots of {metric} must be non-decreasing")
            if knots[-1] <= knots[0]:
                raise ValueError(f"combined knots of {metric} must span a range")
        return self

    @property
    def levels(self) -> list[float]:
        size = len(next(iter(self.knots.values())))
        return [i / (size - 1) for i in range(size)]

    def component_threshold(self, metric: Metric, threshold: float) -> float:
        """The threshold on `metric` alone that `combined >= threshold` implies: the metric's
        clean `threshold`-quantile (the inverse of its piecewise-linear CDF)."""
        knots = self.knots[metric]
        if threshold < 0:
            return knots[0] + threshold * (knots[-1] - knots[0])
        return float(np.interp(threshold, self.levels, knots))


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
    mahalanobis: MahalanobisInfo | None = Field(
        default=None, description="Constants of the `mahalanobis` score (absent before it)."
    )
    combined: CombinedInfo | None = Field(
        default=None, description="Constants of the `combined` score (absent before it)."
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

    @model_validator(mode="after")
    def _check_metrics(self) -> Manifest:
        """The outputs are the required ones plus some metrics, in graph order, and every
        metric the graph computes has its threshold, its table row and its constants."""
        extra = set(self.outputs) - set(OUTPUT_NAMES)
        if extra:
            raise ValueError(f"unknown outputs {sorted(extra)}")
        if [o for o in OUTPUT_NAMES if o in self.outputs] != self.outputs:
            raise ValueError(f"outputs must be listed once each, in the order {OUTPUT_NAMES}")
        missing = [o for o in REQUIRED_OUTPUTS if o not in self.outputs]
        if missing:
            raise ValueError(f"outputs lack {missing}")
        d = self.detection
        metrics = set(self.metrics)
        if set(d.thresholds) != metrics or set(d.calibration_table.thresholds) != metrics:
            raise ValueError(
                "detection thresholds and calibration table must cover exactly the metrics "
                f"of the outputs, {list(self.metrics)}"
            )
        if d.default_metric not in metrics:
            raise ValueError(f"default_metric {d.default_metric} is not an output")
        if ("mahalanobis" in metrics) != (d.mahalanobis is not None):
            raise ValueError("detection.mahalanobis must be given iff mahalanobis is an output")
        if d.mahalanobis is not None:
            for layer in d.mahalanobis.layers:
                if len(layer.means) != self.num_classes:
                    raise ValueError(f"mahalanobis layer {layer.name}: one mean per class")
        if ("combined" in metrics) != (d.combined is not None):
            raise ValueError("detection.combined must be given iff combined is an output")
        if d.combined is not None and not set(d.combined.metrics) <= metrics:
            raise ValueError("detection.combined combines metrics the graph does not output")
        return self

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics this artifact's graph computes (schema 1: the paper's three)."""
        return tuple(m for m in METRICS if m in self.outputs)

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
