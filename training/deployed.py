"""The deployed classifier and detector as torch modules: what `rcegate export` turns into ONNX.

Pang et al. 2018, section 3.2: an RCE-trained network predicts with reversed logits,
argmax softmax(-Z); a CE-trained one with Z. `DeployedLogits` is that classifier alone (what
attacks differentiate); `DeployedModel` is the whole exported graph: the network, the deployed
logits, the three scores of section 3.1 and the accept decision of the thresholding test against
one calibrated threshold. `detector_outputs` runs the detector over images (calibration, export,
evaluation); `predict` and `accuracy` run the deployed classifier alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.manifest import METRICS, OUTPUT_NAMES, PAPER_METRICS, Metric, Objective
from training.data import Split, to_tensor
from training.losses import deployed_logits
from training.mahalanobis import CombinedFit, MahalanobisFit
from training.scores import CombinedConstants, MahalanobisConstants, ScoreInputs, scores


class DeployedLogits(nn.Module):
    """The network as the deployed classifier sees it: images in [0, 1] -> deployed logits."""

    def __init__(self, network: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.network = network.eval()
        self.objective: Objective = objective

    def forward(self, images: Tensor) -> Tensor:
        logits, _ = self.network(images)
        return deployed_logits(self.objective, logits)


@dataclass(frozen=True)
class Activations:
    """What the network computes for a batch: deployed logits, the final hidden vectors z
    (never negated) and the Mahalanobis layers' features (empty when the detector has none)."""

    logits: Tensor
    features: Tensor
    layers: tuple[Tensor, ...] = ()


def _f32(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class DeployedModel(nn.Module):
    """images in [0, 1] -> (logits, probabilities, label, <one score per metric>, accepted): the
    paper's three scores, then `mahalanobis` and `combined` when given their constants."""

    def __init__(
        self,
        network: nn.Module,
        objective: Objective,
        bank: np.ndarray,
        bank_mask: np.ndarray,
        sigma2: float,
        default_metric: Metric = "log_kd",
        threshold: float = float("-inf"),
        mahalanobis: MahalanobisFit | None = None,
        combined: CombinedFit | None = None,
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
        self.mahalanobis_fit = mahalanobis
        self.combined_fit = combined
        self.layer_names: tuple[str, ...] = mahalanobis.layers if mahalanobis else ()
        if mahalanobis is not None:
            for i, (means, precision) in enumerate(
                zip(mahalanobis.means, mahalanobis.precisions, strict=True)
            ):
                self.register_buffer(f"mahalanobis_means_{i}", _f32(means))
                self.register_buffer(f"mahalanobis_precision_{i}", _f32(precision))
            self.register_buffer("mahalanobis_centres", _f32(mahalanobis.centres))
            self.register_buffer("mahalanobis_scales", _f32(mahalanobis.scales))
        if combined is not None:
            self.register_buffer("combined_knots", _f32(combined.knots))
        if default_metric not in self.metrics:
            raise ValueError(f"default metric {default_metric} is not one of {self.metrics}")

    @property
    def metrics(self) -> tuple[Metric, ...]:
        """The metrics this detector scores, in the manifest's order."""
        optional: tuple[Metric, ...] = (
            *(("mahalanobis",) if self.mahalanobis_fit else ()),
            *(("combined",) if self.combined_fit else ()),
        )
        return (*PAPER_METRICS, *optional)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The graph's outputs, in `models.manifest.OUTPUT_NAMES` order."""
        return tuple(o for o in OUTPUT_NAMES if o not in METRICS or o in self.metrics)

    def _mahalanobis_constants(self) -> MahalanobisConstants | None:
        if self.mahalanobis_fit is None:
            return None
        count = len(self.layer_names)
        return MahalanobisConstants(
            means=tuple(self.get_buffer(f"mahalanobis_means_{i}") for i in range(count)),
            precisions=tuple(self.get_buffer(f"mahalanobis_precision_{i}") for i in range(count)),
            centres=self.get_buffer("mahalanobis_centres"),
            scales=self.get_buffer("mahalanobis_scales"),
        )

    def _combined_constants(self) -> CombinedConstants | None:
        if self.combined_fit is None:
            return None
        return CombinedConstants(self.combined_fit.metrics, self.get_buffer("combined_knots"))

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

    def activations(self, images: Tensor) -> Activations:
        """The deployed logits, final hidden vectors and Mahalanobis layers of `images`."""
        if not self.layer_names:
            raw, features = self.network(images)
            return Activations(deployed_logits(self.objective, raw), features)
        raw, features, layers = self.network(images, layers=True)
        chosen = tuple(layers[name] for name in self.layer_names)
        return Activations(deployed_logits(self.objective, raw), features, chosen)

    def score_inputs(self, activations: Activations, classes: Tensor) -> ScoreInputs:
        """What the scores of `classes` look at, for these activations."""
        a = activations
        return ScoreInputs(
            a.logits, F.softmax(a.logits, dim=1), a.features, classes, self.bank, self.bank_mask,
            self.sigma2, a.layers, self._mahalanobis_constants(), self._combined_constants(),
        )  # fmt: skip

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """The graph's outputs, in the order of `output_names`."""
        activations = self.activations(images)
        label = activations.logits.argmax(dim=1)
        inputs = self.score_inputs(activations, label)
        metric_scores = scores(inputs)
        accepted = metric_scores[self.default_metric] >= self.threshold
        return (activations.logits, inputs.probabilities, label, *metric_scores.values(), accepted)


@torch.no_grad()
def detector_outputs(
    detector: DeployedModel, images: np.ndarray, batch_size: int = 500, progress: str | None = None
) -> dict[str, np.ndarray]:
    """Every output of the detector (named as the graph's) for `images`, as numpy.

    `images` are float32 in [0, 1] (the graph's input) or uint8 pixels (converted by
    `to_tensor`, batch by batch); `progress` names a progress bar over them (none when None).
    """
    detector.eval()
    names = detector.output_names
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = (
                to_tensor(chunk)
                if chunk.dtype == np.uint8
                else torch.from_numpy(np.ascontiguousarray(chunk))
            )
            for name, value in zip(names, detector(batch), strict=True):
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


@torch.no_grad()
def layer_features(
    network: nn.Module, images: np.ndarray, batch_size: int = 500, progress: str | None = None
) -> dict[str, np.ndarray]:
    """Every layer of `ResNet.forward_layers` (features included) for uint8 images, in eval
    mode; `progress` names a progress bar over the images (none when None)."""
    network.eval()
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            batch = to_tensor(images[start : start + batch_size])
            _, _, layers = network(batch, layers=True)
            for name, value in layers.items():
                parts.setdefault(name, []).append(value.numpy())
            bar.update(len(images[start : start + batch_size]))
    return {name: np.concatenate(values) for name, values in parts.items()}


def accuracy(model: nn.Module, objective: Objective, split: Split) -> float:
    predicted, _ = predict(model, objective, split.images)
    return float((predicted == split.labels).mean())
