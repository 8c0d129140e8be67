"""Training objectives as pure functions.

Reverse cross-entropy (Pang et al., "Towards Robust Detection of Adversarial Examples",
NeurIPS 2018, eq. 3): cross-entropy of softmax(Z) against the reverse label vector R_y, which is 0
at the true class and 1/(L-1) elsewhere. A model trained this way predicts with reversed logits,
argmax softmax(-Z) (section 3.2). `--objective ce` trains the ordinary baseline instead; nothing
else differs between the two runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.manifest import Objective


def reverse_label_vectors(labels: Tensor, num_classes: int) -> Tensor:
    """R_y: 0 at the true class, 1/(L-1) at every other class. Shape [N, L]."""
    reverse = torch.full(
        (labels.shape[0], num_classes), 1.0 / (num_classes - 1), device=labels.device
    )
    return reverse.scatter(1, labels[:, None], 0.0)


def reverse_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean RCE loss -R_y . log softmax(Z) (Pang et al. 2018, eq. 3), via log_softmax."""
    reverse = reverse_label_vectors(labels, logits.shape[1])
    terms = reverse * F.log_softmax(logits, dim=1)
    # The true class has weight 0; keep 0 * -inf (an underflowed log-probability) out of the sum.
    per_example = -torch.where(reverse > 0, terms, torch.zeros_like(terms)).sum(dim=1)
    # Divide before summing: a batch of extreme logits must not overflow float32 in the mean.
    return (per_example / per_example.numel()).sum()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Ordinary mean cross-entropy, the CE baseline."""
    return F.cross_entropy(logits, labels)


def loss_for(objective: Objective, logits: Tensor, labels: Tensor) -> Tensor:
    return (
        reverse_cross_entropy(logits, labels)
        if objective == "rce"
        else cross_entropy(logits, labels)
    )


def deployed_logits(objective: Objective, logits: Tensor) -> Tensor:
    """The logits of the deployed classifier: -Z for RCE models (Pang et al. 2018, 3.2), else Z."""
    return -logits if objective == "rce" else logits
