"""Checkpoints: the training state on disk, and the trained network rebuilt from it.

A checkpoint is a torch pickle of plain tensors and containers (the model and optimizer state,
the `TrainConfig` as a dict, the epoch history), written atomically so an interrupted save never
leaves half a file, and read back with `weights_only=True` so loading one cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.files import staged_file
from training.config import TrainConfig
from training.data import Dataset, load_dataset
from training.nets import ResNet, build_model


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with staged_file(path) as staging:
        torch.save(payload, staging)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return payload


def load_trained_model(path: Path) -> tuple[ResNet, TrainConfig, Dataset]:
    """Rebuild the network of a checkpoint, in eval mode, with the dataset it was trained on."""
    payload = load_checkpoint(path)
    config = TrainConfig.from_dict(payload["config"])
    dataset = load_dataset(config.dataset, config.data_path, config.seed)
    model = build_model(config, dataset)
    model.load_state_dict(payload["model"])
    return model.eval(), config, dataset
