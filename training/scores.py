"""Detection scores as pure functions; every score is "higher = more like clean data".

Pang et al., "Towards Robust Detection of Adversarial Examples", NeurIPS 2018, section 3.1:
- confidence = max_i F(x)_i,
- non-ME = -sum_{i != yhat} G_i log G_i with G_i = F_i / sum_{j != yhat} F_j (max log(L-1)),
- K-density (Feinman et al. 2017) = mean_{z_i in K_yhat} exp(-||z(x) - z_i||^2 / sigma^2), where
  K_yhat holds training features whose TRUE label is the predicted class; computed in log space.
Beyond the paper (`training.mahalanobis` fits their constants):
- mahalanobis (Lee et al., NeurIPS 2018) = the mean over layers of each layer's standardised
  -min_c (f(x) - mu_c)^T P (f(x) - mu_c), class means mu_c and tied precision P per layer,
- combined = min over its metrics of each one's clean CDF: the union of their tests.
F are the deployed probabilities (softmax(-Z) for RCE). Each score is computed for given classes:
the prediction in the deployed graph, an attacker's target class in the adaptive attacks (the
Mahalanobis score looks at every class and ignores them).
`SCORES` maps every metric of the manifest to its function and its ONNX-vs-torch tolerance: the
one list a new metric joins. These functions are also what the ONNX graph computes, so they
avoid -inf and data-dependent shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from models.manifest import METRICS, Metric

# Bandwidths of the official code, for features of RCE- and CE-trained models.
SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}
_MASKED = -1.0e4


def confidence(probabilities: Tensor, classes: Tensor | None = None) -> Tensor:
    """The baseline score: the deployed probability of `classes` (default: the largest)."""
    if classes is None:
        return probabilities.max(dim=1).values
    return probabilities.gather(1, classes[:, None]).squeeze(1)


def non_maximal_entropy(logits: Tensor, classes: Tensor | None = None) -> Tensor:
    """non-ME of the deployed logits: entropy of the probabilities other than that of `classes`
    (default: the prediction), renormalised."""
    classes = logits.argmax(dim=1) if classes is None else classes
    log_probs = F.log_softmax(logits, dim=1)
    top = F.one_hot(classes, logits.shape[1]).bool()
    masked = torch.where(top, torch.full_like(log_probs, _MASKED), log_probs)
    log_g = masked - torch.logsumexp(masked, dim=1, keepdim=True)
    g = torch.exp(log_g)
    return -(torch.where(top, torch.zeros_like(g), g * log_g)).sum(dim=1)


def log_kernel_density(
    features: Tensor, labels: Tensor, bank: Tensor, bank_mask: Tensor, sigma2: float
) -> Tensor:
    """log KD(x) = logsumexp_i(-||z - z_i||^2 / sigma^2) - log n over the bank of class `labels`.

    `bank` is [L, M, D] (class-major, padded to M), `bank_mask` [L, M] is 1 for real entries.
    The distances to every bank entry are one matrix product; only the row of each input's
    class goes through the (slower, elementwise) masking and logsumexp.
    """
    num_classes, size, dim = bank.shape
    flat = bank.reshape(num_classes * size, dim)
    squared = (
        (features * features).sum(dim=1, keepdim=True)
        - 2.0 * features @ flat.T
        + (flat * flat).sum(dim=1)[None, :]
    ).clamp_min(0.0)
    rows = labels[:, None, None].expand(-1, 1, size)
    own = squared.reshape(-1, num_classes, size).gather(1, rows).squeeze(1)  # [N, M]
    mask = bank_mask[labels]
    log_k = torch.where(mask > 0, -own / sigma2, torch.full_like(own, _MASKED * 1e3))
    return torch.logsumexp(log_k, dim=1) - torch.log(mask.sum(dim=1))


def max_non_me(num_classes: int) -> float:
    return math.log(num_classes - 1)


def mahalanobis_distances(features: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """[N, L] squared distances (f - mu_c)^T P (f - mu_c) of features [N, D] to the class means
    [L, D] under the tied precision P [D, D] (differences first: no cancellation in float32)."""
    diff = features[:, None, :] - means[None]
    return ((diff @ precision) * diff).sum(dim=2)


@dataclass(frozen=True)
class MahalanobisConstants:
    """Per layer: class means [L, D], tied precision [D, D]; clean centre and scale [layers]."""

    means: tuple[Tensor, ...]
    precisions: tuple[Tensor, ...]
    centres: Tensor
    scales: Tensor


def mahalanobis(layers: tuple[Tensor, ...], constants: MahalanobisConstants) -> Tensor:
    """Lee et al.'s score per layer, -min_c d_c, standardised and averaged over the layers."""
    total: Tensor | None = None
    for i, (features, means, precision) in enumerate(
        zip(layers, constants.means, constants.precisions, strict=True)
    ):
        score = -mahalanobis_distances(features, means, precision).min(dim=1).values
        standardised = (score - constants.centres[i]) / constants.scales[i]
        total = standardised if total is None else total + standardised
    assert total is not None
    return total / len(layers)


def clean_cdf(scores: Tensor, knots: Tensor) -> Tensor:
    """A metric's clean CDF, piecewise linear through (knots[i], i / (K - 1)); below the first
    knot it continues with slope 1 / (knots[-1] - knots[0]) (strictly increasing, so no input
    loses its order or its gradient), above the last it is 1. Tied knots make a step."""
    size = knots.shape[0]
    widths = (knots[1:] - knots[:-1]).clamp_min(1e-30)
    inside = ((scores[:, None] - knots[None, :-1]) / widths[None]).clamp(0.0, 1.0).sum(dim=1)
    below = (scores - knots[0]).clamp_max(0.0) / (knots[-1] - knots[0])
    return inside / (size - 1) + below


@dataclass(frozen=True)
class CombinedConstants:
    """The combined score's metrics and their clean quantile knots [len(metrics), K]."""

    metrics: tuple[Metric, ...]
    knots: Tensor


def combined(scores: dict[Metric, Tensor], constants: CombinedConstants) -> Tensor:
    """min over the metrics of their clean CDF values: `combined < T` iff some metric is below
    its clean T-quantile (the union of their tests)."""
    values = [clean_cdf(scores[m], constants.knots[i]) for i, m in enumerate(constants.metrics)]
    return torch.stack(values, dim=1).min(dim=1).values


@dataclass(frozen=True)
class ScoreInputs:
    """What any score may look at: the deployed logits and probabilities, the final hidden
    vectors, the classes to score for, the K-density bank ([L, M, D], mask [L, M]), and, when
    the detector has them, the Mahalanobis layers' features and constants and the combined
    score's constants."""

    logits: Tensor
    probabilities: Tensor
    features: Tensor
    classes: Tensor
    bank: Tensor
    bank_mask: Tensor
    sigma2: float
    layers: tuple[Tensor, ...] = field(default=())
    mahalanobis: MahalanobisConstants | None = None
    combined: CombinedConstants | None = None

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics these inputs can score, in the manifest's order."""
        optional = {"mahalanobis": self.mahalanobis, "combined": self.combined}
        return tuple(m for m in METRICS if optional.get(m, True) is not None)


@dataclass(frozen=True)
class Score:
    function: Callable[[ScoreInputs], Tensor]
    atol: float  # ONNX Runtime vs torch, absolute (training.parity adds a relative 1e-4)


def _mahalanobis(x: ScoreInputs) -> Tensor:
    if x.mahalanobis is None:
        raise ValueError("this detector has no Mahalanobis constants")
    return mahalanobis(x.layers, x.mahalanobis)


def _combined(x: ScoreInputs) -> Tensor:
    if x.combined is None:
        raise ValueError("this detector has no combined score")
    return combined({m: SCORES[m].function(x) for m in x.combined.metrics}, x.combined)


SCORES: dict[Metric, Score] = {
    "confidence": Score(lambda x: confidence(x.probabilities, x.classes), atol=1e-4),
    "non_me": Score(lambda x: non_maximal_entropy(x.logits, x.classes), atol=1e-3),
    "log_kd": Score(
        lambda x: log_kernel_density(x.features, x.classes, x.bank, x.bank_mask, x.sigma2),
        atol=1e-2,
    ),
    "mahalanobis": Score(_mahalanobis, atol=1e-3),
    # A CDF value in [0, 1] below the clean range's top, whose components carry the error.
    "combined": Score(_combined, atol=2e-3),
}


def scores(inputs: ScoreInputs) -> dict[Metric, Tensor]:
    """Every metric the inputs can score, in the manifest's order (the combined score reuses
    its metrics' scores: the graph computes each once)."""
    out: dict[Metric, Tensor] = {}
    for metric in inputs.metrics:
        if metric == "combined" and inputs.combined is not None:
            out[metric] = combined(out, inputs.combined)
        else:
            out[metric] = SCORES[metric].function(inputs)
    return out
