"""The official recipe (DESIGN.md section 1) and the legacy one that trained the v1 models."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from training.checkpoints import load_checkpoint
from training.config import TrainConfig
from training.nets import build_model
from training.train import lr_at_step, parameter_groups, train

MNIST_LIKE = SimpleNamespace(shape=(1, 28, 28), num_classes=10)


def test_official_recipe_is_the_default() -> None:
    config = TrainConfig()
    assert config.recipe == "official" and config.steps == 20_000
    assert (config.batch_size, config.lr, config.weight_decay) == (128, 0.1, 2e-4)


def test_official_schedule_decays_at_10k_and_15k_of_20k_steps() -> None:
    config = TrainConfig()
    rates = [lr_at_step(config, s) for s in (0, 9_999, 10_000, 14_999, 15_000, 19_999)]
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    scaled = TrainConfig(steps=2_000)
    assert lr_at_step(scaled, 999) == pytest.approx(0.1)
    assert lr_at_step(scaled, 1_000) == pytest.approx(0.01)
    assert lr_at_step(scaled, 1_500) == pytest.approx(0.001)


def test_official_recipe_decays_only_conv_and_fc_weights() -> None:
    config = TrainConfig(depth=8)
    model = build_model(config, MNIST_LIKE)  # type: ignore[arg-type]
    decayed, free = parameter_groups(model, config)
    assert decayed["weight_decay"] == 2e-4 and free["weight_decay"] == 0.0
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in weights}
    assert model.fc.bias is not None and any(p is model.fc.bias for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    legacy = TrainConfig(depth=8, recipe="legacy")
    (everything,) = parameter_groups(model, legacy)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_official_recipe_initialises_fc_and_batch_norm_like_the_official_code() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(depth=8), MNIST_LIKE)  # type: ignore[arg-type]
    bound = math.sqrt(3.0 / 64)
    assert model.fc.weight.abs().max() <= bound
    assert model.fc.weight.abs().max() > 0.9 * bound  # uniform over the whole range
    assert torch.equal(model.fc.bias, torch.zeros(10))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-3 and m.momentum == 0.1 for m in norms)
    legacy = build_model(TrainConfig(depth=8, recipe="legacy"), MNIST_LIKE)  # type: ignore[arg-type]
    assert all(m.eps == 1e-5 for m in legacy.modules() if isinstance(m, nn.BatchNorm2d))
    assert legacy.fc.bias.abs().sum() > 0  # PyTorch's default init


def test_configs_saved_before_recipes_existed_load_as_legacy() -> None:
    old = {"dataset": "mnist-5k", "objective": "rce", "depth": 32, "epochs": 30, "lr": 0.1}
    assert TrainConfig.from_dict(old).recipe == "legacy"
    assert TrainConfig.from_dict({**old, "recipe": "official"}).recipe == "official"


def test_official_training_runs_exactly_its_step_budget(tmp_path: Path) -> None:
    checkpoint = tmp_path / "official.pt"
    # 256 images in batches of 64: 4 steps per epoch, so 6 steps end inside the second epoch.
    config = TrainConfig(depth=8, steps=6, train_limit=256, batch_size=64)
    payload = train(config, checkpoint)
    history = payload["history"]
    assert [h["steps"] for h in history] == [4, 6]
    assert history[-1]["lr"] == pytest.approx(lr_at_step(config, 5))
    assert load_checkpoint(checkpoint)["config"]["recipe"] == "official"


def _norm_eps(model: nn.Module) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}


def test_each_reverted_part_is_done_the_legacy_way_and_only_that_part() -> None:
    torch.manual_seed(0)
    bn = build_model(TrainConfig(depth=8, revert=["bn-eps"]), MNIST_LIKE)  # type: ignore[arg-type]
    assert _norm_eps(bn) == {1e-5}
    assert torch.equal(bn.fc.bias, torch.zeros(10))  # FC init still official
    fc = build_model(TrainConfig(depth=8, revert=["fc-init"]), MNIST_LIKE)  # type: ignore[arg-type]
    assert _norm_eps(fc) == {1e-3} and fc.fc.bias.abs().sum() > 0
    config = TrainConfig(depth=8, revert=["decay-scope"])
    model = build_model(config, MNIST_LIKE)  # type: ignore[arg-type]
    (everything,) = parameter_groups(model, config)
    assert len(everything["params"]) == len(list(model.parameters()))
    assert _norm_eps(model) == {1e-3}
    # A revert means nothing under the legacy recipe, which is legacy throughout.
    legacy = TrainConfig(depth=8, recipe="legacy", revert=["bn-eps"])
    assert not any(legacy.uses(part) for part in ("bn-eps", "fc-init", "decay-scope"))


def test_an_unknown_recipe_part_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown recipe parts"):
        TrainConfig(revert=["bn-momentum"])  # type: ignore[list-item]
