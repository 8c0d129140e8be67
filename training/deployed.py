"""The deployed classifier and detector as torch modules: what `rcegate export` turns into ONNX.

Pang et al. 2018, section 3.2: an RCE-trained network predicts with reversed logits,
argmax softmax(-Z); a CE-trained one with Z. `DeployedLogits` is that classifier alone (what
attacks differentiate); `DeployedModel` is the whole exported graph: the network, the deployed
logits, the three scores of section 3.1 and the accept decision of the thresholding test against
one calibrated threshold. `detector_outputs` runs the detector over images (calibration, export,
evaluation); `predict` and `accuracy` run the deployed classifier alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.manifest import OUTPUT_NAMES, Metric, Objective
from training.data import Split, to_tensor
from training.defaults import DEFAULT_METRIC
from training.losses import deployed_logits
from training.scores import ScoreInputs, scores


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

    def score_inputs(self, logits: Tensor, features: Tensor, classes: Tensor) -> ScoreInputs:
        """What the scores of `classes` look at, for these deployed logits and features."""
        probabilities = F.softmax(logits, dim=1)
        return ScoreInputs(
            logits, probabilities, features, classes, self.bank, self.bank_mask, self.sigma2
        )

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """The graph's outputs, in the order of `models.manifest.OUTPUT_NAMES`."""
        logits, features = self.logits_and_features(images)
        label = logits.argmax(dim=1)
        inputs = self.score_inputs(logits, features, label)
        metric_scores = scores(inputs)
        accepted = metric_scores[self.default_metric] >= self.threshold
        return (logits, inputs.probabilities, label, *metric_scores.values(), accepted)


@torch.no_grad()
def detector_outputs(
    detector: DeployedModel, images: np.ndarray, batch_size: int = 500, progress: str | None = None
) -> dict[str, np.ndarray]:
    """Every output of the detector (named as the graph's) for `images`, as numpy.

    `images` are float32 in [0, 1] (the graph's input) or uint8 pixels (converted by
    `to_tensor`, batch by batch); `progress` names a progress bar over them (none when None).
    """
    detector.eval()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = (
                to_tensor(chunk)
                if chunk.dtype == np.uint8
                else torch.from_numpy(np.ascontiguousarray(chunk))
            )
            for name, value in zip(OUTPUT_NAMES, detector(batch), strict=True):
                parts[name].append(value.numpy())
            bar.update(len(chunk))
    return {name: np.concatenate(values) for name, values in parts.items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    objective: Objective,
    images: np.ndarray,
    batch_size: int = 500,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deployed predictions and final hidden vectors for uint8 images, in eval mode; `progress`
    names a progress bar over the images (none when None)."""
    model.eval()
    labels, features = [], []
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            logits, z = model(to_tensor(images[start : start + batch_size]))
            labels.append(deployed_logits(objective, logits).argmax(dim=1).numpy())
            features.append(z.numpy())
            bar.update(len(z))
    return np.concatenate(labels), np.concatenate(features)


def accuracy(model: nn.Module, objective: Objective, split: Split) -> float:
    predicted, _ = predict(model, objective, split.images)
    return float((predicted == split.labels).mean())
