"""Training cost of RCE vs CE: epoch time on the same network and data, measured side by side.

RCE only changes the loss (a soft-label cross-entropy against the reverse label vector), so an
epoch should cost what a CE epoch costs. Epochs alternate RCE / CE so machine noise hits both
alike; the figure is the ratio of the medians. Used by `bench/train_rce_vs_ce.py` and recorded
in the evaluation report.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.manifest import Objective
from training.config import TrainConfig
from training.data import Dataset
from training.nets import build_model
from training.results import TrainingCost
from training.runtime import seed_everything
from training.train import train_epoch


def epoch_seconds(dataset: Dataset, objective: Objective, depth: int, images: int) -> float:
    """Wall time of one training epoch over the first `images` training images."""
    config = TrainConfig(dataset=dataset.name, objective=objective, depth=depth, epochs=1)
    seed_everything(0)
    model = build_model(config, dataset)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=2e-4)
    split = dataset.train.head(images)
    started = time.perf_counter()
    train_epoch(model, optimizer, config, split, 0, 0, 1, torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def training_cost(dataset: Dataset, depth: int, images: int, repeats: int) -> TrainingCost:
    epoch_seconds(dataset, "ce", depth, min(images, 256))  # warm-up: allocator, kernels
    times: dict[Objective, list[float]] = {"rce": [], "ce": []}
    for repeat in range(repeats):
        order: tuple[Objective, Objective] = ("rce", "ce") if repeat % 2 == 0 else ("ce", "rce")
        for objective in order:
            times[objective].append(epoch_seconds(dataset, objective, depth, images))
    rce, ce = statistics.median(times["rce"]), statistics.median(times["ce"])
    return TrainingCost(
        dataset=dataset.name,
        depth=depth,
        images=min(images, len(dataset.train)),
        repeats=repeats,
        threads=torch.get_num_threads(),
        rce_epoch_seconds=times["rce"],
        ce_epoch_seconds=times["ce"],
        rce_median_seconds=rce,
        ce_median_seconds=ce,
        ratio=rce / ce,
    )
