"""The Mahalanobis score (Lee et al., NeurIPS 2018) and the combined score: fitted constants.

Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks": per layer, class means mu_c and ONE covariance shared by all classes
(tied) of the layer's spatially averaged features over the training images; the score of a
layer is -min_c (f(x) - mu_c)^T Sigma^-1 (f(x) - mu_c). Their feature ensemble combines layers
with weights fitted on adversarial examples; ours takes the plain mean of each layer's score
standardised by its clean calibration mean and standard deviation, so no attack is ever seen
at calibration. Their input preprocessing (a gradient step on the input before scoring) is not
used: it needs a backward pass in the graph (docs/evaluation.md has what it was measured to buy).

The combined score turns several calibrated metrics into one: min over them of each one's
clean CDF (piecewise linear through its clean calibration quantiles), so `combined < T`
rejects an input when ANY metric lies below its clean T-quantile. Calibrating T like any other
metric then sets the union's clean rejection to the target FPR jointly (not the sum of the
metrics' FPRs), and the service keeps deciding `score >= threshold` for one metric.

The numbers live in the manifest (`models.manifest.MahalanobisInfo`, `CombinedInfo`), bound to
the graph like every other decision constant; this module fits them and converts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.manifest import CombinedInfo, MahalanobisInfo, MahalanobisLayer, Metric

# The layers the network exposes (`training.nets.ResNet.forward_layers`): the output of each of
# the three stages, spatially averaged, and the final hidden vector z(x) of the paper.
LAYERS: tuple[str, ...] = ("stage1", "stage2", "stage3", "features")
Source = Literal["bank", "train"]
SOURCES: tuple[Source, ...] = ("bank", "train")
# Knots of each combined component's clean CDF: quantile levels 0, 1/200, ..., 1.
COMBINED_KNOTS = 201


def class_gaussians(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class means [L, D] and the tied precision [D, D] (pseudo-inverse of the pooled
    within-class covariance, as Lee et al.'s sklearn EmpiricalCovariance), in float64."""
    x = np.asarray(features, dtype=np.float64)
    means = np.zeros((num_classes, x.shape[1]))
    for label in range(num_classes):
        members = x[labels == label]
        if len(members) == 0:
            raise ValueError(f"class {label} has no training features for the Mahalanobis fit")
        means[label] = members.mean(axis=0)
    centred = x - means[labels]
    covariance = centred.T @ centred / len(x)
    return means, np.linalg.pinv(covariance, hermitian=True)


def min_distance(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min over classes of the squared Mahalanobis distance, [N] (numpy, float64)."""
    diff = np.asarray(features, np.float64)[:, None, :] - means[None]
    distances: np.ndarray = np.einsum("nld,de,nle->nl", diff, precision, diff)
    return np.asarray(distances.min(axis=1))


@dataclass(frozen=True)
class MahalanobisFit:
    """The constants of the `mahalanobis` score, per layer (float64; the graph uses float32)."""

    source: Source
    samples_per_class: list[int]
    layers: tuple[str, ...]
    means: tuple[np.ndarray, ...]
    precisions: tuple[np.ndarray, ...]
    centres: np.ndarray
    scales: np.ndarray

    def layer_scores(self, layers: dict[str, np.ndarray]) -> np.ndarray:
        """[N, layers] standardised layer scores of features keyed by layer name."""
        raw = [
            -min_distance(layers[name], m, p)
            for name, m, p in zip(self.layers, self.means, self.precisions, strict=True)
        ]
        return np.asarray((np.stack(raw, axis=1) - self.centres) / self.scales)

    def score(self, layers: dict[str, np.ndarray]) -> np.ndarray:
        """The `mahalanobis` score (numpy reference of the graph's)."""
        return np.asarray(self.layer_scores(layers).mean(axis=1))

    def to_info(self) -> MahalanobisInfo:
        # float32 values: the manifest then holds exactly the graph's constants.
        def f32(a: np.ndarray) -> list[list[float]]:
            return np.asarray(a, np.float32).astype(np.float64).tolist()  # type: ignore[no-any-return]

        return MahalanobisInfo(
            source=self.source,
            samples_per_class=self.samples_per_class,
            layers=[
                MahalanobisLayer(
                    name=name,
                    means=f32(m),
                    precision=f32(p),
                    centre=float(np.float32(c)),
                    scale=float(np.float32(s)),
                )
                for name, m, p, c, s in zip(
                    self.layers,
                    self.means,
                    self.precisions,
                    self.centres,
                    self.scales,
                    strict=True,
                )  # fmt: skip
            ],
        )

    @classmethod
    def from_info(cls, info: MahalanobisInfo) -> MahalanobisFit:
        return cls(
            source=info.source,
            samples_per_class=list(info.samples_per_class),
            layers=tuple(layer.name for layer in info.layers),
            means=tuple(np.asarray(layer.means, np.float64) for layer in info.layers),
            precisions=tuple(np.asarray(layer.precision, np.float64) for layer in info.layers),
            centres=np.asarray([layer.centre for layer in info.layers], np.float64),
            scales=np.asarray([layer.scale for layer in info.layers], np.float64),
        )


def fit_mahalanobis(
    train_layers: dict[str, np.ndarray],
    train_labels: np.ndarray,
    calibration_layers: dict[str, np.ndarray],
    num_classes: int,
    layers: Sequence[str],
    source: Source,
) -> MahalanobisFit:
    """Means and tied precision per layer from training features, then each layer's clean
    score mean and standard deviation on the calibration split (the ensemble's scale)."""
    unknown = set(layers) - set(LAYERS)
    if unknown or not layers:
        raise ValueError(f"mahalanobis layers must be some of {LAYERS}, got {list(layers)}")
    fits = [class_gaussians(train_layers[name], train_labels, num_classes) for name in layers]
    raw = np.stack(
        [
            -min_distance(calibration_layers[n], m, p)
            for n, (m, p) in zip(layers, fits, strict=True)
        ],
        axis=1,
    )
    scales = raw.std(axis=0)
    return MahalanobisFit(
        source=source,
        samples_per_class=np.bincount(train_labels, minlength=num_classes).tolist(),
        layers=tuple(layers),
        means=tuple(m for m, _ in fits),
        precisions=tuple(p for _, p in fits),
        centres=raw.mean(axis=0),
        scales=np.where(scales > 0, scales, 1.0),
    )


def clean_cdf(scores: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """The combined score's CDF of one metric (numpy reference of the graph's): piecewise linear
    through (knots[i], i / (K - 1)), slope 1 / (knots[-1] - knots[0]) below the first knot, 1
    above the last."""
    knots = np.asarray(knots, np.float64)
    s = np.asarray(scores, np.float64)
    levels = np.linspace(0.0, 1.0, len(knots))
    inside = np.interp(s, knots, levels)
    below = np.minimum(s - knots[0], 0.0) / (knots[-1] - knots[0])
    return np.asarray(inside + below)


@dataclass(frozen=True)
class CombinedFit:
    """The constants of the `combined` score: its metrics and their clean quantile knots."""

    metrics: tuple[Metric, ...]
    knots: np.ndarray  # [len(metrics), K], float64

    def score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """min over the metrics of their clean CDF values (numpy reference of the graph's)."""
        values = [clean_cdf(scores[m], k) for m, k in zip(self.metrics, self.knots, strict=True)]
        return np.asarray(np.min(values, axis=0))

    def component_threshold(self, metric: Metric, threshold: float) -> float:
        """The threshold on `metric` alone that `combined >= threshold` implies (the inverse of
        its clean CDF: its clean `threshold`-quantile)."""
        return self.to_info().component_threshold(metric, threshold)

    def to_info(self) -> CombinedInfo:
        knots = np.asarray(self.knots, np.float32).astype(np.float64)
        return CombinedInfo(
            metrics=list(self.metrics),
            knots={m: k.tolist() for m, k in zip(self.metrics, knots, strict=True)},
        )

    @classmethod
    def from_info(cls, info: CombinedInfo) -> CombinedFit:
        return cls(
            tuple(info.metrics), np.asarray([info.knots[m] for m in info.metrics], np.float64)
        )


def fit_combined(
    calibration_scores: dict[str, np.ndarray],
    metrics: Sequence[Metric],
    size: int = COMBINED_KNOTS,
) -> CombinedFit:
    """Knots = each metric's clean calibration scores at quantile levels 0, 1/(size-1), ..., 1."""
    if len(metrics) < 2 or "combined" in metrics or len(set(metrics)) != len(metrics):
        raise ValueError(f"combine at least two distinct metrics, got {list(metrics)}")
    levels = np.linspace(0.0, 1.0, size)
    knots = np.stack(
        [np.quantile(np.asarray(calibration_scores[m], np.float64), levels) for m in metrics]
    )
    # float32 first: the graph's knots are float32, and the fit must describe exactly them.
    knots = np.asarray(knots, np.float32).astype(np.float64)
    if (knots[:, -1] <= knots[:, 0]).any():
        raise ValueError("a combined metric has the same score on every calibration image")
    return CombinedFit(tuple(metrics), knots)
