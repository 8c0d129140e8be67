"""The training loop: plain functions, a config dataclass saved in every checkpoint, resumable.

SGD (momentum 0.9, weight decay 2e-4), lr 0.1 with step decays, batch 128, seeded. The objective
(`rce` or `ce`) is the only difference between the paper's two runs. Two recipes:

- `official` (the default): the official code's (github.com/P2333/Reverse-Cross-Entropy) MNIST
  run, scaled to a step budget: `steps` SGD steps (official: 20,000), lr x0.1 at 50% and 75% of
  them (10k, 15k), weight decay on conv and FC weights only (the code decays variables named DW),
  FC weights uniform unit scaling (+-sqrt(3 / fan_in)) with zero bias, BatchNorm eps 1e-3 and
  momentum 0.1 (TF decay 0.9).
- `legacy`: what rcegate trained before (and the committed v1 models): `epochs` epochs with the
  decays at 50% / 75% of the epochs, weight decay on every parameter, PyTorch's default FC
  init, BatchNorm eps 1e-5. Checkpoints that predate the recipe field load as legacy.

`revert` names parts of the official recipe done the legacy way instead ("bn-eps", "fc-init",
"decay-scope"): one run per part is the ablation of `rcegate ablation`. The config itself lives in
`training/config.py`, checkpoint files in `training/checkpoints.py`. Data-parallel training runs
under `torchrun` (DistributedDataParallel, gloo on CPU, nccl on GPU): each process takes its own
shard of every epoch's permutation and rank 0 writes the checkpoint. `dry_run` stops after a few
batches so tests exercise this exact code.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import Split, load_dataset, to_tensor
from training.deployed import accuracy
from training.losses import deployed_logits, loss_for
from training.nets import build_model
from training.runtime import distributed, seed_everything

logger = logging.getLogger(__name__)
DRY_RUN_BATCHES = 3


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Official: weight decay on conv and FC weights only; legacy: on every parameter."""
    if not config.uses("decay-scope"):
        return [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    decayed = [
        module.weight for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def pad_crop_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """CIFAR augmentation: pad 4, random 32x32 crop, random horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(2) if flips[i] else crop
    return out


def batches(
    split: Split, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """This process's shard of a seeded per-epoch permutation, in batches."""
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
    shard = order[rank::world]
    for start in range(0, len(shard), batch_size):
        index = np.sort(shard[start : start + batch_size])
        yield to_tensor(split.images[index]), torch.from_numpy(split.labels[index])


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Legacy schedule: decays at fractions of the epochs."""
    decays = sum(epoch >= max(1, round(m * config.epochs)) for m in config.lr_milestones)
    return config.lr * config.lr_gamma**decays


def lr_at_step(config: TrainConfig, step: int) -> float:
    """Official schedule: decays at fractions of the step budget (10k and 15k of 20k)."""
    decays = sum(step >= round(m * config.steps) for m in config.lr_milestones)
    return config.lr * config.lr_gamma**decays


def train(config: TrainConfig, checkpoint: Path, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) and write `checkpoint` after every epoch; returns the final payload."""
    rank, world = distributed()
    seed_everything(config.seed)
    dataset = load_dataset(config.dataset, config.data_path, config.seed)
    train_split = dataset.train.head(config.train_limit) if config.train_limit else dataset.train
    model = build_model(config, dataset)
    optimizer = torch.optim.SGD(
        parameter_groups(model, config), config.lr, momentum=config.momentum
    )
    steps_per_epoch = -(-len(train_split) // (config.batch_size * world))
    total_steps = config.total_steps(steps_per_epoch)
    epochs = -(-total_steps // steps_per_epoch)
    start_epoch, history = 0, []
    if resume and checkpoint.is_file():
        payload = load_checkpoint(checkpoint)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        start_epoch, history = payload["epoch"], list(payload["history"])
        logger.info("resuming %s at epoch %d", checkpoint, start_epoch)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    generator = torch.Generator().manual_seed(config.seed + rank)
    payload = {}
    for epoch in range(start_epoch, epochs):
        first = epoch * steps_per_epoch
        schedule: Callable[[int], float] | None = None
        if config.official:
            schedule = lambda step, first=first: lr_at_step(config, first + step)  # noqa: E731
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(config, first) if config.official else lr_at(config, epoch)
        started = time.perf_counter()
        loss, correct, seen = train_epoch(
            net, optimizer, config, train_split, epoch, rank, world, generator,
            schedule, min(steps_per_epoch, total_steps - first),
        )  # fmt: skip
        record = {
            "epoch": epoch + 1,
            "loss": loss,
            "train_accuracy": correct / max(seen, 1),
            "seconds": time.perf_counter() - started,
            "lr": optimizer.param_groups[0]["lr"],
            "steps": min(first + steps_per_epoch, total_steps),
        }
        if rank == 0:
            record["test_accuracy"] = accuracy(model, config.objective, dataset.test)
            history.append(record)
            payload = {
                "config": dataclasses.asdict(config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "class_names": dataset.class_names,
            }
            save_checkpoint(checkpoint, payload)
            logger.info("epoch %d: %s", epoch + 1, record)
        if config.dry_run:
            break
    if world > 1:
        dist.barrier()
    return payload


def train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    split: Split,
    epoch: int,
    rank: int,
    world: int,
    generator: torch.Generator,
    schedule: Callable[[int], float] | None = None,
    max_steps: int | None = None,
) -> tuple[float, int, int]:
    """One epoch (at most `max_steps` steps); `schedule` gives the lr of each step, if any."""
    net.train()
    total_loss, correct, seen = 0.0, 0, 0
    steps = -(-len(split) // (config.batch_size * world))
    steps = min(steps, max_steps) if max_steps is not None else steps
    progress = tqdm(
        batches(split, config.batch_size, epoch, config.seed, rank, world),
        total=min(steps, DRY_RUN_BATCHES) if config.dry_run else steps,
        desc=f"epoch {epoch + 1} [{config.objective}, {config.recipe}]",
        disable=rank != 0,
        leave=False,
    )
    for step, (images, labels) in enumerate(progress):
        if step >= steps:
            break
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        if config.use_augmentation:
            images = pad_crop_flip(images, generator)
        logits, _ = net(images)
        loss = loss_for(config.objective, logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += int((deployed_logits(config.objective, logits).argmax(1) == labels).sum())
        seen += len(labels)
        progress.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        if config.dry_run and step + 1 >= DRY_RUN_BATCHES:
            break
    return total_loss / max(seen, 1), correct, seen
