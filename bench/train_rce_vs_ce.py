"""Epoch time of RCE vs CE training on the same network and data, measured side by side.

RCE only changes the loss (a soft-label cross-entropy against the reverse label vector), so its
epoch should cost the same as CE's (goal: ratio <= 1.03). Epochs alternate RCE / CE so machine
noise hits both alike; the figure is the ratio of medians.

    python bench/train_rce_vs_ce.py [--depth 32] [--images 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training.data import load_mnist_5k
from training.losses import Objective
from training.train import TrainConfig, _train_epoch, build_model, seed_everything


def epoch_seconds(objective: Objective, depth: int, images: int, epoch: int) -> float:
    dataset = load_mnist_5k()
    config = TrainConfig(objective=objective, depth=depth, epochs=1)
    seed_everything(0)
    model = build_model(config, dataset)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=2e-4)
    split = dataset.train.head(images)
    started = time.perf_counter()
    _train_epoch(model, optimizer, config, split, epoch, 0, 1, torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    epoch_seconds("ce", args.depth, 256, 0)  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {"rce": [], "ce": []}
    for repeat in range(args.repeats):
        for objective in ("rce", "ce") if repeat % 2 == 0 else ("ce", "rce"):
            times[objective].append(epoch_seconds(objective, args.depth, args.images, repeat))
    rce, ce = statistics.median(times["rce"]), statistics.median(times["ce"])
    print(f"resnet-{args.depth}, {args.images} mnist-5k images/epoch, {args.repeats} repeats")
    print(f"threads: {torch.get_num_threads()}")
    print(f"RCE epoch median: {rce:.3f} s  ({', '.join(f'{t:.2f}' for t in times['rce'])})")
    print(f"CE  epoch median: {ce:.3f} s  ({', '.join(f'{t:.2f}' for t in times['ce'])})")
    print(f"ratio RCE/CE: {rce / ce:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
