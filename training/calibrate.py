"""Calibration of the thresholding test: the detectors' constants and per-metric thresholds.

Pang et al. 2018, section 3.1: an input is accepted iff score >= T, with T chosen on clean data
so that a target fraction (target_fpr) of clean inputs is rejected. The bank holds, per class, a
seeded random sample (default 1000, as in the official code) of TRAINING final hidden vectors
keyed by their TRUE label. Beyond the paper (`training.mahalanobis`): the Mahalanobis score's
class means and tied precision per layer come from the training features (the bank's images or
the whole training split), its per-layer scale and the combined score's clean quantiles from the
calibration split, on which every metric, the combined one included, is then calibrated like
the paper's. A `Calibration` turns a trained network into the exported detector
(`training.deployed.DeployedModel`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.files import staged_file
from models.manifest import (
    CalibrationTable,
    CombinedInfo,
    MahalanobisInfo,
    Manifest,
    Metric,
    Objective,
)
from training.data import Dataset
from training.defaults import (
    BANK_PER_CLASS,
    COMBINED_METRICS,
    DEFAULT_METRIC,
    MAHALANOBIS_LAYERS,
    MAHALANOBIS_SOURCE,
    TARGET_FPR,
)
from training.deployed import DeployedModel, detector_outputs, layer_features
from training.mahalanobis import CombinedFit, MahalanobisFit, Source, fit_combined, fit_mahalanobis
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


def bank_indices(
    labels: np.ndarray, num_classes: int, per_class: int, seed: int
) -> list[np.ndarray]:
    """Per class, the sorted indices of a seeded sample of `per_class` examples (all if fewer)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        index = np.flatnonzero(labels == label)
        if index.size == 0:
            raise ValueError(f"class {label} has no training examples for the K-density bank")
        chosen.append(np.sort(rng.choice(index, size=min(per_class, index.size), replace=False)))
    return chosen


def feature_bank(
    features: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded sample of `per_class` features (all if fewer), padded to [L, M, D]."""
    chosen = bank_indices(labels, num_classes, per_class, seed)
    size = max(c.size for c in chosen)
    bank = np.zeros((num_classes, size, features.shape[1]), dtype=np.float32)
    mask = np.zeros((num_classes, size), dtype=np.float32)
    for label, index in enumerate(chosen):
        bank[label, : index.size] = features[index]
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
    mahalanobis: MahalanobisFit | None = None
    combined: CombinedFit | None = None

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return tuple(self.thresholds)

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
            "mahalanobis": self.mahalanobis.to_info().model_dump_json() if self.mahalanobis else "",
            "combined": self.combined.to_info().model_dump_json() if self.combined else "",
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
            # Calibrations from before these scores have neither key.
            mahalanobis=(
                MahalanobisFit.from_info(MahalanobisInfo.model_validate_json(text))
                if (text := payload.get("mahalanobis"))
                else None
            ),
            combined=(
                CombinedFit.from_info(CombinedInfo.model_validate_json(text))
                if (text := payload.get("combined"))
                else None
            ),
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
            self.mahalanobis,
            self.combined,
        )


def thresholds_and_table(
    scores: dict[str, np.ndarray], metrics: Sequence[Metric], target_fpr: float
) -> tuple[dict[Metric, float], CalibrationTable]:
    """Each metric's threshold at `target_fpr` and at every level of the calibration table."""
    thresholds: dict[Metric, float] = {
        m: calibrated_threshold(scores[m], target_fpr) for m in metrics
    }
    table = CalibrationTable(
        fpr=list(TABLE_FPR),
        thresholds={m: [calibrated_threshold(scores[m], f) for f in TABLE_FPR] for m in metrics},
    )
    return thresholds, table


def calibrate(
    network: nn.Module,
    objective: Objective,
    dataset: Dataset,
    target_fpr: float = TARGET_FPR,
    bank_per_class: int = BANK_PER_CLASS,
    sigma2: float | None = None,
    default_metric: Metric = DEFAULT_METRIC,
    seed: int = 0,
    mahalanobis_layers: Sequence[str] = MAHALANOBIS_LAYERS,
    mahalanobis_source: Source = MAHALANOBIS_SOURCE,
    combine: Sequence[Metric] = COMBINED_METRICS,
) -> Calibration:
    """Fit the detectors' constants on the training split and calibrate every metric's threshold
    on the calibration split. No `mahalanobis_layers`: no Mahalanobis score; no `combine`: no
    combined score (each needs the metrics it builds on)."""
    train = layer_features(network, dataset.train.images, progress="calibrate: training features")
    labels = dataset.train.labels
    chosen = bank_indices(labels, dataset.num_classes, bank_per_class, seed)
    bank, mask = feature_bank(train["features"], labels, dataset.num_classes, bank_per_class, seed)
    sigma2 = SIGMA2[objective] if sigma2 is None else sigma2
    mahalanobis = None
    if mahalanobis_layers:
        calibration = layer_features(network, dataset.calibration.images)
        rows = np.concatenate(chosen) if mahalanobis_source == "bank" else slice(None)
        fit = fit_mahalanobis(
            {name: train[name][rows] for name in mahalanobis_layers}, labels[rows],
            calibration, dataset.num_classes, mahalanobis_layers, mahalanobis_source,
        )  # fmt: skip
        # The manifest's float32 constants, exactly as the graph will hold them.
        mahalanobis = MahalanobisFit.from_info(fit.to_info())
    detector = DeployedModel(
        network, objective, bank, mask, sigma2, "log_kd", mahalanobis=mahalanobis
    )
    scores = detector_outputs(detector, dataset.calibration.images, progress="calibrate: scores")
    combined = None
    if combine:
        missing = set(combine) - set(detector.metrics)
        if missing:
            raise ValueError(f"cannot combine {sorted(missing)}: the detector does not score them")
        combined = fit_combined(scores, combine)
        detector = DeployedModel(
            network, objective, bank, mask, sigma2, "log_kd",
            mahalanobis=mahalanobis, combined=combined,
        )  # fmt: skip
        scores["combined"] = detector_outputs(detector, dataset.calibration.images)["combined"]
    if default_metric not in detector.metrics:
        raise ValueError(f"default metric {default_metric} is not one of {detector.metrics}")
    thresholds, table = thresholds_and_table(scores, detector.metrics, target_fpr)
    return Calibration(
        objective, sigma2, bank, mask, target_fpr, default_metric, thresholds, table,
        len(dataset.calibration), seed, mahalanobis, combined,
    )  # fmt: skip


def with_default_metric(calibration: Calibration, metric: Metric) -> Calibration:
    """The same calibration deciding with `metric` (which it must score)."""
    if metric not in calibration.thresholds:
        raise ValueError(f"default metric {metric} is not one of {calibration.metrics}")
    return replace(calibration, default_metric=metric)


def calibration_from_artifact(
    network: nn.Module, manifest: Manifest, dataset: Dataset
) -> Calibration:
    """The calibration behind an exported artifact, rebuilt without its calibration file: the
    K-density bank from `network`'s features of the same seeded sample of training images
    (`bank_indices` with the training seed), every other constant from the manifest. Callers
    compare the detector it gives with the artifact's graph (`training.parity`); a bank that
    does not have the manifest's size per class is refused here."""
    d = manifest.detection
    seed = manifest.training.get("seed", 0)
    if not isinstance(seed, int):
        raise ValueError(f"the manifest's training seed is {seed!r}, not an integer")
    per_class = max(d.bank_size_per_class)
    features = layer_features(network, dataset.train.images, progress="rebuild: bank features")
    bank, mask = feature_bank(
        features["features"], dataset.train.labels, dataset.num_classes, per_class, seed
    )
    sizes = [int(n) for n in mask.sum(axis=1)]
    if sizes != d.bank_size_per_class:
        raise ValueError(f"rebuilt bank has {sizes} entries per class, the manifest says "
                         f"{d.bank_size_per_class}")  # fmt: skip
    return Calibration(
        objective=manifest.objective,
        sigma2=d.sigma2,
        bank=bank,
        bank_mask=mask,
        target_fpr=d.target_fpr,
        default_metric=d.default_metric,
        thresholds=dict(d.thresholds),
        table=d.calibration_table,
        calibration_size=d.calibration_size,
        bank_seed=seed,
        mahalanobis=MahalanobisFit.from_info(d.mahalanobis) if d.mahalanobis else None,
        combined=CombinedFit.from_info(d.combined) if d.combined else None,
    )
