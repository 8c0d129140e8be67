"""The evaluation results schema: results.json, and reading and writing any study's results file.

`EvaluationResults` is the one documented schema of `rcegate evaluate`: per model (keyed by
objective, `ce`/`rce`), per attack, per metric. Every results file (this one, the ablation's, the
masking check's) derives from `ResultsFile`, which writes it atomically (`models.files`) and reads
it back strictly: an unknown or missing field is an error, never silently dropped. Rendering the
Markdown report from it is `training/report.py`'s job.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

from models.files import write_text
from models.manifest import Metric

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"


class ResultsFile(BaseModel):
    """A study's results.json: strict, written whole or not at all."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def write(self, directory: Path) -> Path:
        """Write `directory/results.json` atomically; return its path."""
        path = directory / RESULTS_FILE
        write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MetricResult(_Strict):
    """One metric under one attack; None where no pair survived the filter."""

    roc_auc: float | None = Field(description="Clean (positive) vs adversarial, kept pairs.")
    detection_rate: float | None = Field(
        description="Fraction of kept adversarial images rejected (score < threshold)."
    )
    clean_rejection_rate: float | None = Field(
        description="Fraction of the kept pairs' clean images rejected (the realised FPR)."
    )
    accuracy_on_accepted: float | None = Field(
        description="Accuracy over accepted inputs among all attacked clean images and all "
        "their adversarial counterparts (kept or not)."
    )
    accepted_fraction: float = Field(description="Fraction of that mixed set accepted.")
    threshold: float = Field(description="The model's calibrated threshold for this metric.")


class Distortion(_Strict):
    l2: float | None = Field(description="Mean L2 norm of the perturbation over kept pairs.")
    linf: float | None = Field(description="Mean L-inf norm over kept pairs.")
    l2_max: float = Field(description="Largest L2 norm over all attacked images.")
    linf_max: float = Field(description="Largest L-inf norm over all attacked images.")


class AttackResult(_Strict):
    params: dict[str, float | int | str]
    images: int = Field(description="Test images attacked.")
    clean_correct: int = Field(description="Of those, classified correctly when clean.")
    kept: int = Field(description="Pairs kept: clean correct AND adversarial misclassified.")
    success_rate: float = Field(description="kept / clean_correct.")
    targeted_success_rate: float | None = Field(
        description="Targeted attacks: fraction of clean-correct images sent to the target."
    )
    undetected_success_rate: float = Field(
        description="Fraction of clean-correct images turned into kept adversarial images "
        "that the default metric ACCEPTS: what the attacker actually achieves."
    )
    distortion: Distortion
    seconds_per_image: float = Field(description="Wall time of the attack / images attacked.")
    onnx_label_agreement: float | None = Field(
        description="Fraction of adversarial images on which the ONNX artifact predicts the "
        "same label as the attacked torch detector."
    )
    metrics: dict[Metric, MetricResult]


class CleanResult(_Strict):
    images: int
    accuracy: float
    rejection_rate: dict[Metric, float] = Field(
        description="Fraction of the clean test split rejected at each calibrated threshold."
    )


class ModelResult(_Strict):
    name: str
    version: int
    objective: str
    artifact: str
    sha256: str
    architecture: str
    default_metric: Metric
    target_fpr: float
    thresholds: dict[Metric, float]
    onnx_max_abs_error: dict[str, float] = Field(
        description="Torch detector vs ONNX Runtime on real test images, checked before attacking."
    )
    clean: CleanResult
    attacks: dict[str, AttackResult]
    mahalanobis_layers: list[str] | None = Field(
        default=None, description="Layers of the Mahalanobis score; null without one."
    )
    mahalanobis_source: str | None = Field(
        default=None, description="Its class means and covariance: the bank's images or train."
    )
    combined_metrics: list[str] | None = Field(
        default=None, description="What the combined score combines; null without one."
    )


class TrainingCost(_Strict):
    """RCE vs CE epoch time on the same network and data (training/cost.py)."""

    dataset: str
    depth: int
    images: int
    repeats: int
    threads: int
    rce_epoch_seconds: list[float]
    ce_epoch_seconds: list[float]
    rce_median_seconds: float
    ce_median_seconds: float
    ratio: float = Field(description="rce_median_seconds / ce_median_seconds (goal <= 1.03).")


class EvaluationResults(ResultsFile):
    """results.json: everything `rcegate evaluate` measured."""

    schema_version: int = SCHEMA_VERSION
    dataset: str
    created_at: datetime
    source_commit: str | None
    seed: int
    images_fast: int = Field(description="Test images per attack for the fast attacks.")
    images_slow: int = Field(description="Test images per attack for `slow_attacks`.")
    slow_attacks: list[str]
    settings: dict[str, float | int | str]
    torch_threads: int
    models: dict[str, ModelResult] = Field(description="Keyed by objective: ce, rce.")
    training_cost: TrainingCost | None = Field(
        default=None, description="RCE vs CE training epoch time, measured side by side."
    )
