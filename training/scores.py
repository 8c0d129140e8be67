"""Detection scores as pure functions; every score is "higher = more like clean data".

Pang et al., "Towards Robust Detection of Adversarial Examples", NeurIPS 2018, section 3.1:
- confidence = max_i F(x)_i,
- non-ME = -sum_{i != yhat} G_i log G_i with G_i = F_i / sum_{j != yhat} F_j (max log(L-1)),
- K-density (Feinman et al. 2017) = mean_{z_i in K_yhat} exp(-||z(x) - z_i||^2 / sigma^2), where
  K_yhat holds training features whose TRUE label is the predicted class; computed in log space.
F are the deployed probabilities (softmax(-Z) for RCE). Each score is computed for given classes:
the prediction in the deployed graph, an attacker's target class in the adaptive attacks.
`SCORES` maps every metric of the manifest to its function and its ONNX-vs-torch tolerance: the
one list a new metric joins. These functions are also what the ONNX graph computes, so they
avoid -inf and data-dependent shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    """
    num_classes, size, dim = bank.shape
    flat = bank.reshape(num_classes * size, dim)
    squared = (
        (features * features).sum(dim=1, keepdim=True)
        - 2.0 * features @ flat.T
        + (flat * flat).sum(dim=1)[None, :]
    ).clamp_min(0.0)
    log_k = (-squared / sigma2).reshape(-1, num_classes, size)
    log_k = torch.where(bank_mask[None] > 0, log_k, torch.full_like(log_k, _MASKED * 1e3))
    per_class = torch.logsumexp(log_k, dim=2) - torch.log(bank_mask.sum(dim=1))[None, :]
    return per_class.gather(1, labels[:, None]).squeeze(1)


def max_non_me(num_classes: int) -> float:
    return math.log(num_classes - 1)


@dataclass(frozen=True)
class ScoreInputs:
    """What any score may look at: the deployed logits and probabilities, the final hidden
    vectors, the classes to score for, and the K-density bank ([L, M, D], mask [L, M])."""

    logits: Tensor
    probabilities: Tensor
    features: Tensor
    classes: Tensor
    bank: Tensor
    bank_mask: Tensor
    sigma2: float


@dataclass(frozen=True)
class Score:
    function: Callable[[ScoreInputs], Tensor]
    atol: float  # ONNX Runtime vs torch, absolute (training.parity adds a relative 1e-4)


SCORES: dict[Metric, Score] = {
    "confidence": Score(lambda x: confidence(x.probabilities, x.classes), atol=1e-4),
    "non_me": Score(lambda x: non_maximal_entropy(x.logits, x.classes), atol=1e-3),
    "log_kd": Score(
        lambda x: log_kernel_density(x.features, x.classes, x.bank, x.bank_mask, x.sigma2),
        atol=1e-2,
    ),
}


def scores(inputs: ScoreInputs) -> dict[Metric, Tensor]:
    """Every metric's score, in the manifest's order."""
    return {metric: SCORES[metric].function(inputs) for metric in METRICS}
