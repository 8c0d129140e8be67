"""ROC curves and score histograms of an evaluation, as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from models.files import staged_file
from models.manifest import METRICS
from training.evaluate import AttackScores
from training.report import ATTACK_TITLES, OBJECTIVE_TITLES, metric_title
from training.results import EvaluationResults

matplotlib.use("Agg")


def save_figure(figure: Any, path: Path) -> Path:
    """Lay out `figure`, write it to `path` as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with staged_file(path) as staging:
        # The staging name ends in .tmp: the format is given, not guessed from the suffix.
        figure.savefig(staging, dpi=80, format="png")
    plt.close(figure)
    return path


def _grid(count: int) -> tuple[int, int]:
    columns = min(count, 3)
    return math.ceil(count / columns), columns


def plot_roc(scores: dict[str, AttackScores], objective: str, path: Path) -> None:
    """One panel per attack, one curve per metric (clean = positive, higher score = normal)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    attacks = [a for a, s in scores.items() if s.normal[METRICS[0]].size]
    rows, columns = _grid(max(len(attacks), 1))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for metric in scores[attack].normal:
            normal, adversarial = scores[attack].normal[metric], scores[attack].adversarial[metric]
            truth = np.concatenate([np.ones(normal.size), np.zeros(adversarial.size)])
            fpr, tpr, _ = roc_curve(truth, np.concatenate([normal, adversarial]))
            ax.plot(fpr, tpr, label=metric_title(metric))
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
        ax.set_title(ATTACK_TITLES.get(attack, attack), fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    figure.suptitle(f"ROC, {OBJECTIVE_TITLES.get(objective, objective)} model (normal = positive)")
    save_figure(figure, path)


def plot_histograms(
    scores: dict[str, AttackScores], objective: str, metric: str, threshold: float, path: Path
) -> None:
    """Clean vs adversarial histograms of `metric` per attack, with the deployed threshold."""
    import matplotlib.pyplot as plt

    attacks = [a for a, s in scores.items() if s.normal[metric].size]
    rows, columns = _grid(max(len(attacks), 1))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=False):
        normal, adversarial = scores[attack].normal[metric], scores[attack].adversarial[metric]
        values = np.concatenate([normal, adversarial, [threshold]])
        bins = np.linspace(values.min(), values.max(), 40)
        ax.hist(normal, bins=bins, alpha=0.6, label="clean")
        ax.hist(adversarial, bins=bins, alpha=0.6, label="adversarial")
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(ATTACK_TITLES.get(attack, attack), fontsize=9)
        ax.set_xlabel(metric_title(metric))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    figure.suptitle(
        f"{metric_title(metric)} scores, {OBJECTIVE_TITLES.get(objective, objective)}"
        " model (kept pairs)"
    )
    save_figure(figure, path)


def write_figures(
    results: EvaluationResults, scores: dict[str, dict[str, AttackScores]], directory: Path
) -> list[Path]:
    paths = []
    for objective, per_attack in scores.items():
        model = results.models[objective]
        roc = directory / f"roc-{objective}.png"
        plot_roc(per_attack, objective, roc)
        hist = directory / f"hist-{objective}.png"
        metric = model.default_metric
        plot_histograms(per_attack, objective, metric, model.thresholds[metric], hist)
        paths += [roc, hist]
    return paths
