"""Calibration of the thresholding test: the K-density feature bank and per-metric thresholds.

Pang et al. 2018, section 3.1: an input is accepted iff score >= T, with T chosen on clean data
so that a target fraction (target_fpr) of clean inputs is rejected. The bank holds, per class, a
seeded random sample (default 1000, as in the official code) of TRAINING final hidden vectors
keyed by their TRUE label. A `Calibration` (bank, bandwidth, thresholds and the calibration
table) turns a trained network into the exported detector (`training.deployed.DeployedModel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.files import staged_file
from models.manifest import METRICS, CalibrationTable, Metric, Objective
from training.data import Dataset
from training.defaults import BANK_PER_CLASS, DEFAULT_METRIC, TARGET_FPR
from training.deployed import DeployedModel, detector_outputs, predict
from training.scores import SIGMA2

# FPR levels of the calibration table: fine steps at the low end, where operators choose.
TABLE_FPR: tuple[float, ...] = tuple(
    sorted({0.001, 0.002, 0.005, *(round(0.01 * i, 2) for i in range(1, 51))})
)


def calibrated_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The largest T that rejects (score < T) at most floor(target_fpr * n) clean scores."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if ordered.size == 0 or not np.isfinite(ordered).all():
        raise ValueError("calibration scores must be a non-empty array of finite values")
    k = min(math.floor(target_fpr * ordered.size), ordered.size - 1)
    return float(ordered[k])


def feature_bank(
    features: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded sample of `per_class` features (all if fewer), padded to [L, M, D]."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        index = np.flatnonzero(labels == label)
        if index.size == 0:
            raise ValueError(f"class {label} has no training examples for the K-density bank")
        chosen.append(rng.choice(index, size=min(per_class, index.size), replace=False))
    size = max(c.size for c in chosen)
    bank = np.zeros((num_classes, size, features.shape[1]), dtype=np.float32)
    mask = np.zeros((num_classes, size), dtype=np.float32)
    for label, index in enumerate(chosen):
        bank[label, : index.size] = features[np.sort(index)]
        mask[label, : index.size] = 1.0
    return bank, mask


@dataclass(frozen=True)
class Calibration:
    objective: Objective
    sigma2: float
    bank: np.ndarray
    bank_mask: np.ndarray
    target_fpr: float
    default_metric: Metric
    thresholds: dict[Metric, float]
    table: CalibrationTable
    calibration_size: int
    bank_seed: int

    def to_payload(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "sigma2": self.sigma2,
            "bank": torch.from_numpy(self.bank),
            "bank_mask": torch.from_numpy(self.bank_mask),
            "target_fpr": self.target_fpr,
            "default_metric": self.default_metric,
            "thresholds": dict(self.thresholds),
            "table": self.table.model_dump_json(),
            "calibration_size": self.calibration_size,
            "bank_seed": self.bank_seed,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Calibration:
        return cls(
            objective=payload["objective"],
            sigma2=float(payload["sigma2"]),
            bank=payload["bank"].numpy(),
            bank_mask=payload["bank_mask"].numpy(),
            target_fpr=float(payload["target_fpr"]),
            default_metric=payload["default_metric"],
            thresholds={k: float(v) for k, v in payload["thresholds"].items()},
            table=CalibrationTable.model_validate_json(payload["table"]),
            calibration_size=int(payload["calibration_size"]),
            bank_seed=int(payload["bank_seed"]),
        )

    def save(self, path: Path) -> None:
        with staged_file(path) as staging:
            torch.save(self.to_payload(), staging)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.from_payload(torch.load(path, map_location="cpu", weights_only=True))

    def deployed(self, network: nn.Module) -> DeployedModel:
        return DeployedModel(
            network,
            self.objective,
            self.bank,
            self.bank_mask,
            self.sigma2,
            self.default_metric,
            self.thresholds[self.default_metric],
        )


def calibrate(
    network: nn.Module,
    objective: Objective,
    dataset: Dataset,
    target_fpr: float = TARGET_FPR,
    bank_per_class: int = BANK_PER_CLASS,
    sigma2: float | None = None,
    default_metric: Metric = DEFAULT_METRIC,
    seed: int = 0,
) -> Calibration:
    """Build the bank from the training split and calibrate thresholds on the calibration split."""
    _, train_features = predict(
        network, objective, dataset.train.images, progress="calibrate: bank features"
    )
    bank, mask = feature_bank(
        train_features, dataset.train.labels, dataset.num_classes, bank_per_class, seed
    )
    sigma2 = SIGMA2[objective] if sigma2 is None else sigma2
    detector = DeployedModel(network, objective, bank, mask, sigma2, default_metric)
    scores = detector_outputs(detector, dataset.calibration.images, progress="calibrate: scores")
    thresholds: dict[Metric, float] = {
        m: calibrated_threshold(scores[m], target_fpr) for m in METRICS
    }
    table = CalibrationTable(
        fpr=list(TABLE_FPR),
        thresholds={m: [calibrated_threshold(scores[m], f) for f in TABLE_FPR] for m in METRICS},
    )
    return Calibration(
        objective, sigma2, bank, mask, target_fpr, default_metric, thresholds, table,
        len(dataset.calibration), seed,
    )  # fmt: skip
