"""Epoch time of RCE vs CE training on the same network and data, measured side by side.

RCE only changes the loss, so its epoch should cost the same as CE's (goal: ratio <= 1.03).
Epochs alternate RCE / CE so machine noise hits both alike; the figure is the ratio of medians.

    python bench/train_rce_vs_ce.py [--dataset mnist-5k] [--depth 32] [--images 2048] [--repeats 9]
"""

from __future__ import annotations

import argparse

from training.cost import training_cost
from training.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    cost = training_cost(load_dataset(args.dataset), args.depth, args.images, args.repeats)
    print(
        f"resnet-{cost.depth}, {cost.images} {cost.dataset} images per epoch, "
        f"{cost.repeats} repeats"
    )
    print(f"threads: {cost.threads}")
    for name, median, all_ in (
        ("RCE", cost.rce_median_seconds, cost.rce_epoch_seconds),
        ("CE ", cost.ce_median_seconds, cost.ce_epoch_seconds),
    ):
        print(f"{name} epoch median: {median:.3f} s  ({', '.join(f'{t:.2f}' for t in all_)})")
    print(f"ratio RCE/CE: {cost.ratio:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
