"""Epoch time of RCE vs CE training on the same network and data, measured side by side.

RCE only changes the loss, so its epoch should cost the same as CE's (goal: ratio <= 1.03).
Epochs alternate RCE / CE so machine noise hits both alike; the figure is the ratio of medians.

    python bench/train_rce_vs_ce.py [--dataset mnist-5k] [--depth 32] [--images 2048] [--repeats 9]
        [--json bench/results/train_rce_vs_ce.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import table, write_result  # noqa: E402
from training.cost import training_cost  # noqa: E402
from training.data import load_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the figures here")
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
    if args.json:
        rows = [
            ["RCE", cost.rce_median_seconds, ", ".join(f"{t:.2f}" for t in cost.rce_epoch_seconds)],
            ["CE", cost.ce_median_seconds, ", ".join(f"{t:.2f}" for t in cost.ce_epoch_seconds)],
            ["ratio RCE / CE (goal <= 1.03)", cost.ratio, ""],
        ]
        write_result(
            args.json,
            "train_rce_vs_ce",
            f"RCE vs CE training cost: ResNet-{cost.depth}, {cost.images} {cost.dataset} images "
            f"per epoch, {cost.repeats} alternating repeats, {cost.threads} torch thread(s)",
            cost.model_dump(),
            [table("Epoch time", ["objective", "median epoch (s)", "all epochs (s)"], rows,
                   ["", ".3f", ""])],
        )  # fmt: skip


if __name__ == "__main__":
    main()
