"""The paper's pre-activation ResNet family (He et al. 2016, v2), as used by Pang et al. 2018.

Depth 6n+2 (20/32/56), stage widths 16/32/64, batch norm, leaky-ReLU 0.1, and a 64-d final hidden
vector z(x) from global average pooling that feeds the last linear layer. Inputs arrive in [0, 1]
and are normalised in the model (x/255 - 0.5 on the 0..255 scale, i.e. x - 0.5 here), so the ONNX
graph takes raw pixel fractions. `forward` returns (logits Z, features z); `forward_layers` also
the spatially averaged output of each stage (the Mahalanobis score's layers). `bn_eps` and
`fc_init="unit-uniform"` give the official code's BatchNorm epsilon (1e-3) and TF's
uniform_unit_scaling_initializer(1.0) for the last layer (U(+-sqrt(3 / fan_in)), zero bias);
`build_model` picks them as a training config's recipe says.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.data import Dataset

WIDTHS = (16, 32, 64)
SLOPE = 0.1


class PreActBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, stride: int, bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=bn_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(x), SLOPE)
        skip: Tensor = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        residual: Tensor = self.conv2(F.leaky_relu(self.bn2(out), SLOPE))
        return residual + skip


class ResNet(nn.Module):
    """Pre-activation ResNet-(6n+2) returning (logits, 64-d features)."""

    def __init__(
        self,
        depth: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        bn_eps: float = 1e-5,
        fc_init: Literal["default", "unit-uniform"] = "default",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        channels = WIDTHS[0]
        for stage, width in enumerate(WIDTHS):
            for block in range(n):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, width, stride, bn_eps))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels, eps=bn_eps)
        self.fc = nn.Linear(channels, num_classes)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
        if fc_init == "unit-uniform":
            bound = math.sqrt(3.0 / channels)
            nn.init.uniform_(self.fc.weight, -bound, bound)
            nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor, layers: bool = False) -> tuple[Tensor, ...]:
        """(logits, features), or with `layers` `forward_layers`' triple: through the module
        call either way, so forward hooks see every evaluation of the network."""
        if layers:
            return self.forward_layers(images)  # type: ignore[return-value]
        out = self.blocks(self.conv(images - 0.5))
        features = torch.flatten(F.adaptive_avg_pool2d(F.leaky_relu(self.bn(out), SLOPE), 1), 1)
        return self.fc(features), features

    def forward_layers(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(logits, features, layers): `layers` maps stage1..stage3 to the spatial mean of that
        stage's output [N, width] and `features` to z(x) (Lee et al. 2018's feature list)."""
        layers: dict[str, Tensor] = {}
        per_stage = len(self.blocks) // len(WIDTHS)
        out = self.conv(images - 0.5)
        for index, block in enumerate(self.blocks):
            out = block(out)
            if (index + 1) % per_stage == 0:
                # Global average pooling, not mean(): ONNX Runtime pools the blocked (NCHWc)
                # layout in place instead of reordering the whole feature map first.
                pooled = F.adaptive_avg_pool2d(out, 1)
                layers[f"stage{(index + 1) // per_stage}"] = torch.flatten(pooled, 1)
        features = torch.flatten(F.adaptive_avg_pool2d(F.leaky_relu(self.bn(out), SLOPE), 1), 1)
        layers["features"] = features
        return self.fc(features), features, layers


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(config: TrainConfig, dataset: Dataset) -> ResNet:
    """The network `config` describes, for `dataset`'s input shape and classes."""
    return ResNet(
        config.depth,
        dataset.shape[0],
        dataset.num_classes,
        bn_eps=1e-3 if config.uses("bn-eps") else 1e-5,
        fc_init="unit-uniform" if config.uses("fc-init") else "default",
    )
