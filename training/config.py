"""The training config: one dataclass, saved inside every checkpoint and manifest.

Two recipes (see `training/train.py` for what each means): `official`, the official code's
(github.com/P2333/Reverse-Cross-Entropy) MNIST run scaled to a step budget, and `legacy`, what
rcegate trained before (the committed v1 models). `revert` names parts of the official recipe done
the legacy way instead; one run per part is the ablation of `rcegate ablation`. Checkpoints and
manifests that predate the recipe field load as legacy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.manifest import Objective

Recipe = Literal["official", "legacy"]
RECIPES: tuple[Recipe, ...] = ("official", "legacy")
RecipePart = Literal["bn-eps", "fc-init", "decay-scope"]
RECIPE_PARTS: tuple[RecipePart, ...] = ("bn-eps", "fc-init", "decay-scope")
OFFICIAL_STEPS = 20_000


@dataclass
class TrainConfig:
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    objective: Objective = "rce"
    depth: int = 32
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_gamma: float = 0.1
    seed: int = 0
    augment: bool | None = None
    train_limit: int | None = None
    dry_run: bool = False
    recipe: Recipe = "official"
    steps: int = OFFICIAL_STEPS
    revert: list[RecipePart] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.revert) - set(RECIPE_PARTS)
        if unknown:
            raise ValueError(f"unknown recipe parts {sorted(unknown)}; expected {RECIPE_PARTS}")

    def uses(self, part: RecipePart) -> bool:
        """Whether the official recipe's `part` is in force (official and not reverted)."""
        return self.official and part not in self.revert

    @property
    def use_augmentation(self) -> bool:
        return self.augment if self.augment is not None else self.dataset == "cifar10"

    @property
    def official(self) -> bool:
        return self.recipe == "official"

    @property
    def data_path(self) -> Path | None:
        """`data_dir` as a path (None: the dataset's default location)."""
        return Path(self.data_dir) if self.data_dir else None

    def total_steps(self, steps_per_epoch: int) -> int:
        """SGD steps of the whole run: `steps` (official) or `epochs` full epochs (legacy)."""
        return self.steps if self.official else self.epochs * steps_per_epoch

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        # Checkpoints and manifests written before recipes existed were trained the legacy way.
        values = {"recipe": "legacy", **values}
        return cls(**{k: v for k, v in values.items() if k in known})
