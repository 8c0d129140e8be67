"""The train loop's parts: the legacy lr schedule, data-parallel sharding, CIFAR augmentation and
when it applies, and the objective each run trains with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.data import Split
from training.losses import cross_entropy, deployed_logits, loss_for, reverse_cross_entropy
from training.nets import ResNet
from training.train import batches, lr_at, pad_crop_flip, train, train_epoch


def test_legacy_schedule_decays_tenfold_at_half_and_three_quarters_of_the_epochs() -> None:
    config = TrainConfig(recipe="legacy", epochs=30)
    # Milestones round(0.5 * 30) = 15 and round(0.75 * 30) = 22.
    rates = [lr_at(config, e) for e in (0, 14, 15, 21, 22, 29)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)
    # A one-epoch run never decays: a milestone is never before the end of the first epoch.
    assert lr_at(TrainConfig(recipe="legacy", epochs=1), 0) == 0.1


@pytest.mark.parametrize(
    "budget", [{"recipe": "legacy", "epochs": 4}, {"recipe": "official", "steps": 4}]
)
def test_training_follows_the_schedule_of_its_recipe(tmp_path: Path, budget: dict) -> None:
    # 128 images in one batch: one step per epoch, so each epoch's lr is one point of the
    # schedule, decayed x0.1 at 50% and 75% of the epochs (legacy) or steps (official).
    config = TrainConfig(depth=8, train_limit=128, **budget)
    history = train(config, tmp_path / "run.pt")["history"]
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.01, 0.001], rel=1e-12)


def _identity_split(n: int) -> Split:
    """A split whose labels are the example indices, so a batch tells which examples it holds."""
    return Split(np.zeros((n, 1, 2, 2), np.uint8), np.arange(n, dtype=np.int64))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_shard_each_epoch_permutation_disjointly_across_processes(world: int) -> None:
    split = _identity_split(50)
    shards = [
        np.concatenate([labels.numpy() for _, labels in batches(split, 8, 3, 1, rank, world)])
        for rank in range(world)
    ]
    every = np.concatenate(shards)
    assert sorted(every.tolist()) == list(range(50))  # disjoint, and together the whole split
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(len(b) <= 8 for _, b in batches(split, 8, 3, 1, 0, world))
    # Seeded per epoch: the same epoch again is the same shard, the next epoch reshuffles.
    again = np.concatenate([lab.numpy() for _, lab in batches(split, 8, 3, 1, 0, world)])
    other = np.concatenate([lab.numpy() for _, lab in batches(split, 8, 4, 1, 0, world)])
    assert np.array_equal(again, shards[0])
    assert not np.array_equal(np.sort(other), np.sort(shards[0])) or world == 1
    assert not np.array_equal(other, shards[0])


def test_pad_crop_flip_shifts_by_at_most_4_pixels_and_flips_horizontally() -> None:
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = pad_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = F.pad(images, (4, 4, 4, 4))
    found = []
    for i in range(len(images)):
        crops = {
            (dy, dx): padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)
        }
        # flip(-1) mirrors the width axis of [C, H, W]: a horizontal flip.
        matches = [
            (dy, dx, flip)
            for (dy, dx), crop in crops.items()
            for flip in (False, True)
            if torch.equal(out[i], crop.flip(-1) if flip else crop)
        ]
        assert len(matches) == 1, f"image {i} is no padded crop (or flip) of its input"
        found.append(matches[0])
    dys, dxs, flips = zip(*found, strict=True)
    assert set(dys) == set(dxs) == set(range(9))  # every shift in [-4, 4], both axes
    assert 16 <= sum(flips) <= 48  # about half flipped
    assert torch.equal(pad_crop_flip(images, torch.Generator().manual_seed(0)), out)


@pytest.mark.parametrize(
    ("dataset", "augment", "expected"),
    [("cifar10", None, True), ("mnist-5k", None, False), ("mnist-5k", True, True),
     ("cifar10", False, False)],
)  # fmt: skip
def test_training_augments_exactly_when_the_config_says(
    dataset: str, augment: bool | None, expected: bool
) -> None:
    config = TrainConfig(dataset=dataset, augment=augment, depth=8, batch_size=4)
    assert config.use_augmentation is expected
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), np.arange(8) % 10)
    model = ResNet(8, 3, 10)
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state().clone()
    _, _, seen = train_epoch(model, optimizer, config, split, 0, 0, 1, generator)
    assert seen == 8
    # Only the augmentation draws from the training generator.
    assert (not torch.equal(generator.get_state(), before)) is expected


def test_objective_selects_the_loss_and_the_deployed_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([0, 2])
    rce, ce = loss_for("rce", logits, labels), loss_for("ce", logits, labels)
    assert torch.equal(rce, reverse_cross_entropy(logits, labels))
    assert torch.equal(ce, cross_entropy(logits, labels))
    assert not torch.isclose(rce, ce)
    assert torch.equal(deployed_logits("rce", logits), -logits)
    assert torch.equal(deployed_logits("ce", logits), logits)
