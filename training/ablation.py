"""Ablation of the official recipe: which differences from the official code matter.

Every variant changes one thing relative to the official recipe (training/train.py) at the same
step budget, CE and RCE alike: BatchNorm epsilon, FC initialisation, weight-decay scope (each
reverted to rcegate's legacy choice), training length, training-set size, and the K-density bank
size (a calibration-only change: it reuses the official checkpoints). For each (variant,
objective) the report gives clean accuracy on the whole test split, the clean logit-margin and
top-probability distribution, accuracy vs eps under FGSM and BIM with the thresholding test
disabled (Pang et al. 2018, Fig. 2), and the oblivious ROC-AUC and detection rate of each metric
under the fast attacks, with the same attack code and kept-pairs rule as `rcegate evaluate`.

Checkpoints are cached in the work directory under a name derived from the training config and
reused only when the config saved inside equals the variant's; missing ones are trained in
`jobs` parallel processes of `threads` torch threads each.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from models.manifest import PAPER_METRICS, Metric, Objective
from training.attacks import AttackSettings
from training.calibrate import calibrate
from training.checkpoints import load_checkpoint, load_trained_model
from training.config import RecipePart, TrainConfig
from training.data import to_tensor
from training.defaults import BANK_PER_CLASS
from training.deployed import detector_outputs
from training.evaluate import attack_cell
from training.report import AUC_TIE, metric_title
from training.results import RESULTS_FILE, AttackResult, ResultsFile
from training.robustness import MASKING_ATTACKS, ModelRobustness, robustness
from training.runtime import seed_everything
from training.train import train

logger = logging.getLogger(__name__)
PLOT_FILE = "robustness.png"
OBJECTIVES: tuple[Objective, ...] = ("ce", "rce")
AUC_ATTACKS = ("fgsm", "bim", "illcm", "pgd")
# The metric the ablation decides with: the paper's K-density test, whose recipe it ablates.
ABLATION_METRIC: Metric = "log_kd"
EVERY_IMAGE = 1_000_000
# Clean accuracy gap the target allows between RCE and CE, in accuracy points.
CLEAN_GAP = 0.005


@dataclass(frozen=True)
class Variant:
    """One change to the official recipe; the rest stays official."""

    name: str
    change: str
    revert: tuple[RecipePart, ...] = ()
    steps_factor: int = 1
    train_limit: int | None = None
    bank_per_class: int = BANK_PER_CLASS


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("official", "none: the official code's recipe (reference row)"),
        Variant("bn-eps", "BatchNorm eps 1e-5 (PyTorch default) instead of 1e-3", ("bn-eps",)),
        Variant(
            "fc-init", "PyTorch's default FC init instead of uniform unit scaling", ("fc-init",)
        ),
        Variant(
            "decay-scope",
            "weight decay on every parameter instead of conv/FC weights only",
            ("decay-scope",),
        ),
        Variant("long", "5x the training steps (same schedule fractions)", steps_factor=5),
        Variant("train-4000", "4,000 training images instead of the whole split", train_limit=4000),
        Variant("bank-100", "K-density bank of 100 per class instead of 1,000", bank_per_class=100),
        Variant("bank-all", "K-density bank of every training image", bank_per_class=EVERY_IMAGE),
    )
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ObjectiveResult(_Strict):
    checkpoint: str
    steps: int
    train_images: int
    bank_per_class: int
    clean_accuracy: float = Field(description="On the whole test split.")
    rejection_rate: dict[Metric, float] = Field(description="Clean test split, per metric.")
    robustness: ModelRobustness = Field(description="Thresholding disabled; pipeline attacks.")
    attacks: dict[str, AttackResult] = Field(description="Oblivious attacks, detector on.")


class VariantResult(_Strict):
    change: str
    objectives: dict[str, ObjectiveResult]


class AblationResults(ResultsFile):
    dataset: str
    created_at: datetime
    source_commit: str | None
    seed: int
    depth: int
    steps: int = Field(description="Step budget of every variant but `long`.")
    target_fpr: float
    images: int = Field(description="Test images per attack and per eps.")
    eps: list[float]
    settings: dict[str, float | int | str]
    torch_threads: int
    variants: dict[str, VariantResult]


@dataclass(frozen=True)
class Plan:
    dataset: str
    depth: int
    steps: int
    work_dir: Path
    data_dir: str | None = None
    seed: int = 0

    def config(self, variant: Variant, objective: Objective) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset,
            data_dir=self.data_dir,
            objective=objective,
            depth=self.depth,
            steps=self.steps * variant.steps_factor,
            seed=self.seed,
            train_limit=variant.train_limit,
            revert=list(variant.revert),
        )

    def checkpoint(self, config: TrainConfig) -> Path:
        parts = [config.dataset, config.objective, f"d{config.depth}", f"s{config.steps}"]
        parts += [f"revert-{p}" for p in config.revert]
        if config.train_limit:
            parts.append(f"n{config.train_limit}")
        return self.work_dir / ("-".join(parts) + ".pt")


def reusable(path: Path, config: TrainConfig) -> bool:
    """A cached checkpoint counts only if it finished and was trained with exactly `config`."""
    if not path.is_file():
        return False
    payload = load_checkpoint(path)
    saved = TrainConfig.from_dict(payload["config"])
    finished = bool(payload["history"]) and payload["history"][-1]["steps"] >= config.steps
    return finished and dataclasses.asdict(saved) == dataclasses.asdict(config)


def _train_one(config: TrainConfig, path: Path, threads: int) -> str:
    torch.set_num_threads(threads)
    train(config, path)
    return str(path)


def train_missing(
    plan: Plan, variants: Sequence[Variant], jobs: int, threads: int
) -> dict[tuple[str, str], Path]:
    """Checkpoint of every (variant, objective); trains those not cached, `jobs` at a time."""
    paths: dict[tuple[str, str], Path] = {}
    todo: dict[Path, TrainConfig] = {}
    for variant in variants:
        for objective in OBJECTIVES:
            config = plan.config(variant, objective)
            path = plan.checkpoint(config)
            paths[variant.name, objective] = path
            if path not in todo and not reusable(path, config):
                todo[path] = config
    if todo:
        logger.info("training %d checkpoints, %d at a time", len(todo), jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = [pool.submit(_train_one, c, p, threads) for p, c in todo.items()]
            for future in futures:
                logger.info("trained %s", future.result())
    return paths


def evaluate_variant(
    path: Path,
    variant: Variant,
    images: int,
    eps: tuple[float, ...],
    settings: AttackSettings,
    target_fpr: float,
    seed: int,
) -> ObjectiveResult:
    seed_everything(seed)
    network, config, dataset = load_trained_model(path)
    network.requires_grad_(False)
    # The paper's detector only: the ablation asks which recipe differences move it.
    calibration = calibrate(
        network, config.objective, dataset, target_fpr, variant.bank_per_class,
        default_metric=ABLATION_METRIC, seed=seed, mahalanobis_layers=(), combine=(),
    )  # fmt: skip
    detector = calibration.deployed(network)
    thresholds = calibration.thresholds
    test = dataset.test
    full = detector_outputs(detector, to_tensor(test.images).numpy())
    curves = robustness(
        detector, dataset, str(path), images, eps, settings, seed, variants=("pipeline",)
    )
    index = np.sort(np.random.default_rng(seed).permutation(len(test))[:images])
    x, labels = to_tensor(test.images[index]).numpy(), test.labels[index]
    clean = {k: v[index] for k, v in full.items()}
    attacks = {}
    default = calibration.default_metric
    for name in AUC_ATTACKS:
        attacks[name], _ = attack_cell(
            name, detector, x, labels, clean, thresholds, default, settings, seed
        )
    train_images = min(config.train_limit or len(dataset.train), len(dataset.train))
    return ObjectiveResult(
        checkpoint=str(path),
        steps=config.steps,
        train_images=train_images,
        bank_per_class=int(calibration.bank_mask.sum(axis=1).max()),
        clean_accuracy=float((full["label"] == test.labels).mean()),
        rejection_rate={m: float((full[m] < t).mean()) for m, t in thresholds.items()},
        robustness=curves,
        attacks=attacks,
    )


def run_ablation(
    plan: Plan,
    variants: Sequence[Variant],
    images: int,
    eps: tuple[float, ...],
    settings: AttackSettings,
    target_fpr: float,
    jobs: int,
    threads: int,
    created_at: datetime,
    source_commit: str | None,
) -> AblationResults:
    paths = train_missing(plan, variants, jobs, threads)
    torch.set_num_threads(threads * jobs)
    results: dict[str, VariantResult] = {}
    for variant in tqdm(variants, desc="ablation: evaluate"):
        results[variant.name] = VariantResult(
            change=variant.change,
            objectives={
                objective: evaluate_variant(
                    paths[variant.name, objective],
                    variant,
                    images,
                    eps,
                    settings,
                    target_fpr,
                    plan.seed,
                )  # fmt: skip
                for objective in OBJECTIVES
            },
        )
    return AblationResults(
        dataset=plan.dataset,
        created_at=created_at,
        source_commit=source_commit,
        seed=plan.seed,
        depth=plan.depth,
        steps=plan.steps,
        target_fpr=target_fpr,
        images=images,
        eps=list(eps),
        settings=settings.to_dict(),
        torch_threads=torch.get_num_threads(),
        variants=results,
    )


def _accuracy_at(result: ObjectiveResult, attack: str, eps: float) -> float | None:
    for point in result.robustness.curves.get(f"{attack}/pipeline", []):
        if abs(point.eps - eps) < 1e-9:
            return point.accuracy
    return None


def verdicts(results: AblationResults, default_metric: Metric = ABLATION_METRIC) -> list[str]:
    """Per variant, the issue's three targets in plain words (measured, not assumed)."""
    lines = []
    for name, variant in results.variants.items():
        ce, rce = variant.objectives["ce"], variant.objectives["rce"]
        gap = rce.clean_accuracy - ce.clean_accuracy
        clean = "met" if gap >= -CLEAN_GAP else "missed"
        worse = [
            a
            for a in AUC_ATTACKS
            if (r := rce.attacks[a].metrics[default_metric].roc_auc) is not None
            and (c := ce.attacks[a].metrics[default_metric].roc_auc) is not None
            and r < c - AUC_TIE
        ]
        auc = "met" if not worse else f"missed on {', '.join(a.upper() for a in worse)}"
        bim = [
            e
            for e in results.eps
            if e > 0
            and (r_acc := _accuracy_at(rce, "bim", e)) is not None
            and (c_acc := _accuracy_at(ce, "bim", e)) is not None
            and r_acc < c_acc
        ]
        robust = "met" if not bim else "missed at eps " + ", ".join(f"{e:g}" for e in bim)
        lines.append(
            f"- **{name}**: RCE clean accuracy within {100 * CLEAN_GAP:.1f} pp of CE: {clean} "
            f"({100 * gap:+.2f} pp); RCE K-density AUC >= CE's on every attack: {auc}; "
            f"RCE accuracy under BIM >= CE's with thresholding disabled: {robust}."
        )
    return lines


def render_report(results: AblationResults) -> str:
    eps = [e for e in results.eps if e > 0]
    lines = [
        f"# Recipe ablation: {results.dataset}",
        "",
        f"Generated by `rcegate ablation` on {results.created_at:%Y-%m-%d %H:%M} UTC from commit "
        f"`{results.source_commit}`, seed {results.seed}, preact-resnet{results.depth}, "
        f"{results.steps} SGD steps of batch 128 per variant (lr 0.1, x0.1 at 50% and 75%), "
        f"{results.torch_threads} torch thread(s). Raw numbers: [`{RESULTS_FILE}`]"
        f"({RESULTS_FILE}).",
        "",
        "Each variant changes one thing relative to the official recipe (the first row); CE and "
        "RCE are trained identically apart from the loss. Robustness: accuracy on "
        f"{results.images} test images with the thresholding test disabled (every input "
        "accepted), FGSM and BIM (10 steps) exactly as `rcegate evaluate` runs them. Detection: "
        f"oblivious {', '.join(a.upper() for a in AUC_ATTACKS)} at eps "
        f"{results.settings['eps']} (PGD: {results.settings['pgd_steps']} steps) on the same "
        "images, the paper's kept-pairs rule, thresholds calibrated for target FPR "
        f"{results.target_fpr:g} on the calibration split.",
        "",
        f"![accuracy vs eps]({PLOT_FILE})",
        "",
        "## Verdicts against the issue's targets",
        "",
        *verdicts(results),
        "",
        "## Clean behaviour",
        "",
        "| Variant | Change | Steps | Train images | Bank / class | Obj. | Clean acc. | "
        "Logit margin q10 / q50 | Top prob. q10 / q50 |",
        "|---|---|---:|---:|---:|---|---:|---|---|",
    ]
    for name, variant in results.variants.items():
        for objective, r in variant.objectives.items():
            q, p = r.robustness.logit_margin_quantiles, r.robustness.top_probability_quantiles
            lines.append(
                f"| {name} | {variant.change} | {r.steps} | {r.train_images} | "
                f"{r.bank_per_class} | {objective.upper()} | {r.clean_accuracy:.2%} | "
                f"{q['q10']:.2f} / {q['q50']:.2f} | {p['q10']:.3f} / {p['q50']:.3f} |"
            )
    for attack in MASKING_ATTACKS:
        lines += [
            "",
            f"## {attack.upper()}: accuracy vs eps, thresholding disabled",
            "",
            "| Variant | Obj. | " + " | ".join(f"{e:g}" for e in eps) + " |",
            "|---|---|" + "---:|" * len(eps),
        ]
        for name, variant in results.variants.items():
            for objective, r in variant.objectives.items():
                cells = [_accuracy_at(r, attack, e) for e in eps]
                text = " | ".join("-" if c is None else f"{c:.1%}" for c in cells)
                lines.append(f"| {name} | {objective.upper()} | {text} |")
    # The default metric first, then the others in the manifest's order.
    for metric in (ABLATION_METRIC, *(m for m in PAPER_METRICS if m != ABLATION_METRIC)):
        lines += [
            "",
            f"## Oblivious ROC-AUC, {metric_title(metric)}",
            "",
            "| Variant | Obj. | " + " | ".join(a.upper() for a in AUC_ATTACKS) + " |",
            "|---|---|" + "---:|" * len(AUC_ATTACKS),
        ]
        for name, variant in results.variants.items():
            for objective, r in variant.objectives.items():
                cells = [r.attacks[a].metrics[metric].roc_auc for a in AUC_ATTACKS]
                text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                lines.append(f"| {name} | {objective.upper()} | {text} |")
    lines += [
        "",
        f"## Detection at the calibrated threshold ({metric_title(ABLATION_METRIC)}) and attack "
        "success",
        "",
        "Detection = kept adversarial images rejected; success = kept / clean-correct.",
        "",
        "| Variant | Obj. | " + " | ".join(f"{a.upper()} det. / succ." for a in AUC_ATTACKS) + " |",
        "|---|---|" + "---:|" * len(AUC_ATTACKS),
    ]
    for name, variant in results.variants.items():
        for objective, r in variant.objectives.items():
            pairs: list[str] = []
            for a in AUC_ATTACKS:
                rate = r.attacks[a].metrics[ABLATION_METRIC].detection_rate
                det = "-" if rate is None else f"{rate:.1%}"
                pairs.append(f"{det} / {r.attacks[a].success_rate:.1%}")
            lines.append(f"| {name} | {objective.upper()} | {' | '.join(pairs)} |")
    return "\n".join(lines) + "\n"


def plot_ablation(results: AblationResults, path: Path) -> Path:
    """Accuracy vs eps (thresholding disabled), one panel per variant: CE vs RCE, FGSM and BIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.plots import save_figure

    names = list(results.variants)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    colours = {"ce": "tab:blue", "rce": "tab:red"}
    styles = {"fgsm": "--", "bim": "-"}
    for ax, name in zip(axes.flat, names, strict=False):
        for objective, r in results.variants[name].objectives.items():
            for attack in MASKING_ATTACKS:
                points = r.robustness.curves.get(f"{attack}/pipeline", [])
                ax.plot(
                    [p.eps for p in points], [p.accuracy for p in points],
                    linestyle=styles[attack], marker="o", markersize=2,
                    color=colours[objective], label=f"{objective.upper()} {attack.upper()}",
                )  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    figure.supxlabel("eps (L-inf, fraction of pixel range)", fontsize=8)
    figure.supylabel("accuracy, thresholding disabled", fontsize=8)
    return save_figure(figure, path)
