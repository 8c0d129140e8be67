"""The deployed classifier and detector as torch modules: what `rcegate export` turns into ONNX.

Pang et al. 2018, section 3.2: an RCE-trained network predicts with reversed logits,
argmax softmax(-Z); a CE-trained one with Z. `DeployedLogits` is that classifier alone (what
attacks differentiate); `DeployedModel` is the whole exported graph: the network, the deployed
logits, the three scores of section 3.1 and the accept decision of the thresholding test against
one calibrated threshold. `predict` and `accuracy` run the deployed classifier over uint8 images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.manifest import Metric, Objective
from training.data import Split, to_tensor
from training.defaults import DEFAULT_METRIC
from training.losses import deployed_logits
from training.scores import confidence, log_kernel_density, non_maximal_entropy


class DeployedLogits(nn.Module):
    """The network as the deployed classifier sees it: images in [0, 1] -> deployed logits."""

    def __init__(self, network: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.network = network.eval()
        self.objective: Objective = objective

    def forward(self, images: Tensor) -> Tensor:
        logits, _ = self.network(images)
        return deployed_logits(self.objective, logits)


class DeployedModel(nn.Module):
    """images in [0, 1] -> (logits, probabilities, label, confidence, non_me, log_kd, accepted)."""

    def __init__(
        self,
        network: nn.Module,
        objective: Objective,
        bank: np.ndarray,
        bank_mask: np.ndarray,
        sigma2: float,
        default_metric: Metric = DEFAULT_METRIC,
        threshold: float = float("-inf"),
    ) -> None:
        super().__init__()
        self.network = network.eval()
        self.objective: Objective = objective
        self.sigma2 = float(sigma2)
        self.default_metric: Metric = default_metric
        self.bank: Tensor
        self.bank_mask: Tensor
        self.threshold: Tensor
        self.register_buffer("bank", torch.from_numpy(bank))
        self.register_buffer("bank_mask", torch.from_numpy(bank_mask))
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))

    @classmethod
    def classifier_only(
        cls, network: nn.Module, objective: Objective, num_classes: int, feature_dim: int
    ) -> DeployedModel:
        """The deployed classifier with a placeholder detector (a one-entry zero bank, every
        input accepted): for attacks that never look at the detector (oblivious ones)."""
        return cls(
            network, objective, np.zeros((num_classes, 1, feature_dim), np.float32),
            np.ones((num_classes, 1), np.float32), 1.0,
        )  # fmt: skip

    @property
    def num_classes(self) -> int:
        return int(self.bank.shape[0])

    def logits_and_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The deployed logits and the final hidden vectors (never negated) of `images`."""
        raw, features = self.network(images)
        return deployed_logits(self.objective, raw), features

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        logits, features = self.logits_and_features(images)
        probabilities = F.softmax(logits, dim=1)
        label = logits.argmax(dim=1)
        scores = {
            "confidence": confidence(probabilities),
            "non_me": non_maximal_entropy(logits),
            "log_kd": log_kernel_density(features, label, self.bank, self.bank_mask, self.sigma2),
        }
        accepted = scores[self.default_metric] >= self.threshold
        return (
            logits,
            probabilities,
            label,
            scores["confidence"],
            scores["non_me"],
            scores["log_kd"],
            accepted,
        )


@torch.no_grad()
def predict(
    model: nn.Module, objective: Objective, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Deployed predictions and final hidden vectors for uint8 images, in eval mode."""
    model.eval()
    labels, features = [], []
    for start in range(0, len(images), batch_size):
        logits, z = model(to_tensor(images[start : start + batch_size]))
        labels.append(deployed_logits(objective, logits).argmax(dim=1).numpy())
        features.append(z.numpy())
    return np.concatenate(labels), np.concatenate(features)


def accuracy(model: nn.Module, objective: Objective, split: Split) -> float:
    predicted, _ = predict(model, objective, split.images)
    return float((predicted == split.labels).mean())
