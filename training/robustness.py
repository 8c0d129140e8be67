"""Gradient-masking checks: robustness vs epsilon with the thresholding test disabled.

Carlini et al., "On Evaluating Adversarial Robustness" (2019), list the signs that an attack is
weakened by the gradients it follows rather than by the model: success that does not rise with
the budget or stops short of ~100% at a large one (eps 0.3 on MNIST), single-step attacks that
do as well as iterative ones, and a logit-margin loss (Carlini & Wagner's f6) that does much
better than cross-entropy. This module measures exactly that for the attacks `rcegate evaluate`
runs (FGSM and BIM through `training.attacks.run_attack`, the "pipeline" variant) next to two
independent torch implementations of the same attacks with a cross-entropy loss and with the
margin loss. Accuracy is over all attacked images with every input accepted (no detector), as in
Pang et al. 2018, Fig. 2; success is the evaluation's kept / clean-correct.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm import tqdm

from training.attacks import AttackSettings, margin_loss, run_attack
from training.data import Dataset, to_tensor
from training.deployed import DeployedLogits, DeployedModel
from training.results import RESULTS_FILE, ResultsFile

EPS_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
MASKING_ATTACKS = ("fgsm", "bim")
AttackLoss = Literal["ce", "margin"]
LOSSES: tuple[AttackLoss, ...] = ("ce", "margin")
VARIANTS = ("pipeline", "ce", "margin")
# Tolerances of the checks, in success-rate points over the attacked clean-correct images.
MONOTONE_TOLERANCE = 0.02
MARGIN_TOLERANCE = 0.05
FULL_SUCCESS = 0.9
PLOT_FILE = "robustness.png"


def attack_loss(loss: AttackLoss, logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example loss an untargeted attack maximises: cross-entropy or the C&W f6 margin."""
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    return margin_loss(logits, labels)


def linf_attack(
    logits_of: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    eps: float,
    steps: int,
    loss: AttackLoss,
    batch_size: int = 100,
) -> Tensor:
    """Untargeted L-inf attack: `steps` signed-gradient steps of eps / steps (1 step = FGSM),
    projected on the eps-ball and [0, 1]; the final iterate, as FGSM and BIM define it."""
    parts = []
    for start in range(0, len(images), batch_size):
        clean, y = images[start : start + batch_size], labels[start : start + batch_size]
        adversarial = clean.clone()
        for _ in range(steps):
            adversarial.requires_grad_(True)
            objective = attack_loss(loss, logits_of(adversarial), y).sum()
            (gradient,) = torch.autograd.grad(objective, adversarial)
            with torch.no_grad():
                adversarial = adversarial + (eps / steps) * gradient.sign()
                adversarial = torch.clamp(adversarial, clean - eps, clean + eps).clamp(0.0, 1.0)
        parts.append(adversarial.detach())
    return torch.cat(parts)


def zero_gradient_fraction(
    logits_of: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, loss: AttackLoss
) -> float:
    """Fraction of images whose input gradient of the attack loss is exactly zero."""
    images = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(attack_loss(loss, logits_of(images), labels).sum(), images)
    return float((gradient.flatten(1).abs().amax(1) == 0).float().mean())


def lost_true_class_gradient(logits: Tensor, labels: Tensor) -> float:
    """Fraction of images whose float32 cross-entropy gradient w.r.t. the labelled logit is 0.

    d CE / d Z_y = p_y - 1, and p_y rounds to exactly 1.0 once the margin exceeds about 17 in
    float32: the gradient then only raises the other logits and never lowers Z_y, a different
    and weaker direction than the loss's true gradient (a saturated softmax)."""
    z = logits.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(F.cross_entropy(z, labels, reduction="sum"), z)
    return float((gradient.gather(1, labels[:, None]) == 0).float().mean())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CurvePoint(_Strict):
    eps: float
    accuracy: float = Field(description="Accuracy on all attacked images, nothing rejected.")
    success_rate: float = Field(description="Misclassified adversarial / clean-correct images.")


class Check(_Strict):
    name: str
    passed: bool
    detail: str


class ModelRobustness(_Strict):
    objective: str
    checkpoint: str
    architecture: str
    images: int
    clean_accuracy: float
    logit_margin_quantiles: dict[str, float] = Field(
        description="Deployed top-1 minus top-2 logit on the attacked clean images."
    )
    top_probability_quantiles: dict[str, float]
    saturated_fraction: float = Field(description="Clean images whose top probability is 1.0.")
    lost_true_class_gradient: float = Field(
        description="Clean images whose float32 CE gradient w.r.t. the predicted logit is 0."
    )
    zero_gradient_fraction: dict[str, float] = Field(
        description="Clean images whose input gradient of each attack loss is exactly zero."
    )
    curves: dict[str, list[CurvePoint]] = Field(description="Keyed '<attack>/<variant>'.")
    checks: list[Check]


class MaskingResults(ResultsFile):
    dataset: str
    created_at: datetime
    source_commit: str | None
    seed: int
    eps: list[float]
    bim_steps: int
    torch_threads: int
    pipeline: str = Field(description="How `rcegate evaluate` runs FGSM and BIM.")
    models: dict[str, ModelRobustness]


QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{int(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}


def _point(
    eps: float, labels: np.ndarray, clean: np.ndarray, adversarial: np.ndarray
) -> CurvePoint:
    correct = clean == labels
    fooled = correct & (adversarial != labels)
    return CurvePoint(
        eps=eps,
        accuracy=float((adversarial == labels).mean()),
        success_rate=float(fooled.sum() / max(int(correct.sum()), 1)),
    )


def masking_checks(curves: dict[str, list[CurvePoint]]) -> list[Check]:
    """The Carlini et al. (2019) sanity checks on the curves of one model.

    - every variant's success rises with eps (up to MONOTONE_TOLERANCE),
    - the pipeline's BIM reaches FULL_SUCCESS at the largest eps,
    - the pipeline's BIM does at least as well as its FGSM at every eps,
    - the margin loss beats the pipeline by at most MARGIN_TOLERANCE (per attack, per eps).
    """
    checks = []
    for key, points in curves.items():
        drops = [
            f"{a.eps:g}->{b.eps:g}: {a.success_rate:.3f}->{b.success_rate:.3f}"
            for a, b in zip(points, points[1:], strict=False)
            if b.success_rate < a.success_rate - MONOTONE_TOLERANCE
        ]
        checks.append(
            Check(
                name=f"{key}: success rises with eps",
                passed=not drops,
                detail="; ".join(drops) or "non-decreasing",
            )  # fmt: skip
        )
    bim, fgsm = curves.get("bim/pipeline"), curves.get("fgsm/pipeline")
    if bim:
        last = bim[-1]
        checks.append(
            Check(
                name=f"bim/pipeline: success >= {FULL_SUCCESS:g} at eps {last.eps:g}",
                passed=last.success_rate >= FULL_SUCCESS,
                detail=f"{last.success_rate:.3f}",
            )
        )
    if bim and fgsm:
        worse = [
            f"eps {b.eps:g}: BIM {b.success_rate:.3f} < FGSM {f.success_rate:.3f}"
            for b, f in zip(bim, fgsm, strict=True)
            if b.success_rate < f.success_rate - MONOTONE_TOLERANCE
        ]
        checks.append(
            Check(
                name="iterative (BIM) >= single-step (FGSM)",
                passed=not worse,
                detail="; ".join(worse) or "at every eps",
            )  # fmt: skip
        )
    for attack in MASKING_ATTACKS:
        ours, margin = curves.get(f"{attack}/pipeline"), curves.get(f"{attack}/margin")
        if not ours or not margin:
            continue
        gaps = [m.success_rate - p.success_rate for p, m in zip(ours, margin, strict=True)]
        worst = int(np.argmax(gaps))
        checks.append(
            Check(
                name=f"{attack}: margin loss beats the pipeline by <= {MARGIN_TOLERANCE:g}",
                passed=gaps[worst] <= MARGIN_TOLERANCE,
                detail=f"largest gap {gaps[worst]:+.3f} at eps {ours[worst].eps:g}",
            )
        )
    return checks


def robustness(
    detector: DeployedModel,
    dataset: Dataset,
    checkpoint: str,
    images: int,
    eps_grid: tuple[float, ...],
    settings: AttackSettings,
    seed: int,
    variants: tuple[str, ...] = VARIANTS,
) -> ModelRobustness:
    """Curves and checks for one model on a seeded sample of its test split; `variants` picks
    which of the three ways each attack runs (the ablation runs only the pipeline's)."""
    network, objective = detector.network, detector.objective
    logits_of = DeployedLogits(network, objective)

    order = np.random.default_rng(seed).permutation(len(dataset.test))
    index = np.sort(order[: min(images, len(dataset.test))])
    x = to_tensor(dataset.test.images[index])
    labels = dataset.test.labels[index]
    y = torch.from_numpy(labels).long()
    with torch.no_grad():
        logits = logits_of(x)
    clean = logits.argmax(1).numpy()
    probabilities = F.softmax(logits, dim=1)
    top2 = logits.topk(2, dim=1).values
    curves: dict[str, list[CurvePoint]] = {}
    jobs = [(a, v) for a in MASKING_ATTACKS for v in variants]
    for attack, variant in tqdm(jobs, desc=f"masking check [{objective}]"):
        points = []
        for eps in eps_grid:
            if eps == 0.0:
                adversarial = x
            elif variant == "pipeline":
                output = run_attack(
                    attack, detector, x.numpy(), labels, clean, probabilities.numpy(),
                    {}, _at_eps(settings, eps), seed,
                )  # fmt: skip
                adversarial = torch.from_numpy(output.adversarial)
            else:
                steps = 1 if attack == "fgsm" else settings.bim_steps
                loss: AttackLoss = "ce" if variant == "ce" else "margin"
                # FGSM and BIM of the evaluation use the clean prediction as the label.
                adversarial = linf_attack(
                    logits_of, x, torch.from_numpy(clean), eps, steps, loss, settings.batch_size
                )
            with torch.no_grad():
                predicted = logits_of(adversarial).argmax(1).numpy()
            points.append(_point(eps, labels, clean, predicted))
        curves[f"{attack}/{variant}"] = points
    return ModelRobustness(
        objective=objective,
        checkpoint=checkpoint,
        architecture=f"preact-resnet{getattr(network, 'depth', '?')}",
        images=len(index),
        clean_accuracy=float((clean == labels).mean()),
        logit_margin_quantiles=_quantiles((top2[:, 0] - top2[:, 1]).numpy()),
        top_probability_quantiles=_quantiles(probabilities.max(1).values.numpy()),
        saturated_fraction=float((probabilities.max(1).values == 1.0).float().mean()),
        lost_true_class_gradient=lost_true_class_gradient(logits, torch.from_numpy(clean)),
        zero_gradient_fraction={
            name: zero_gradient_fraction(logits_of, x, y, name) for name in LOSSES
        },
        curves=curves,
        checks=masking_checks(curves),
    )


def _at_eps(settings: AttackSettings, eps: float) -> AttackSettings:
    from dataclasses import replace

    return replace(settings, eps=eps)


def plot_robustness(results: MaskingResults, path: Path) -> Path:
    """Accuracy vs eps with nothing rejected, CE vs RCE, one panel per attack (Pang Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.plots import save_figure

    styles = {"pipeline": "-", "ce": "--", "margin": ":"}
    colours = {"ce": "tab:blue", "rce": "tab:red"}
    figure, axes = plt.subplots(1, len(MASKING_ATTACKS), figsize=(5 * len(MASKING_ATTACKS), 3.8))
    for ax, attack in zip(np.atleast_1d(axes), MASKING_ATTACKS, strict=True):
        for objective, model in results.models.items():
            for variant in VARIANTS:
                points = model.curves.get(f"{attack}/{variant}")
                if not points:
                    continue
                ax.plot(
                    [p.eps for p in points], [p.accuracy for p in points],
                    linestyle=styles[variant], marker="o" if variant == "pipeline" else None,
                    markersize=3, color=colours.get(objective),
                    label=f"{objective.upper()} {_VARIANT_TITLES[variant]}",
                )  # fmt: skip
        ax.set_title(f"{attack.upper()} (thresholding disabled)", fontsize=10)
        ax.set_xlabel("eps (L-inf, fraction of pixel range)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(figure, path)


_VARIANT_TITLES = {
    "pipeline": "rcegate evaluate",
    "ce": "CE loss (independent)",
    "margin": "margin loss (independent)",
}


def render_report(results: MaskingResults) -> str:
    lines = [
        f"# Gradient-masking checks: {results.dataset}",
        "",
        f"Generated by `rcegate masking-check` on {results.created_at:%Y-%m-%d %H:%M} UTC from "
        f"commit `{results.source_commit}`, seed {results.seed}, {results.torch_threads} torch "
        f"thread(s). Raw numbers: [`{RESULTS_FILE}`]({RESULTS_FILE}).",
        "",
        "Thresholding test disabled (every input accepted). Each attack runs three ways: "
        f"*{_VARIANT_TITLES['pipeline']}* is {results.pipeline}; the two independent variants "
        "are plain torch FGSM / BIM with a cross-entropy loss and with the logit-margin loss "
        "max_{i != y} Z_i - Z_y (C&W f6) on the deployed logits. All use the clean prediction "
        f"as the label; BIM takes {results.bim_steps} steps of eps/{results.bim_steps}. "
        "Success = misclassified adversarial / clean-correct, the evaluation's definition.",
        "",
        f"![accuracy vs eps]({PLOT_FILE})",
        "",
        "## Models",
        "",
        "| Obj. | Checkpoint | Images | Clean acc. | Logit margin q10 / q50 / q90 | "
        "Top prob. q10 / q50 | Top prob. = 1.0 | CE grad. at Z_y = 0 | "
        "Zero input gradient (CE / margin) |",
        "|---|---|---:|---:|---|---|---:|---:|---|",
    ]
    for objective, m in results.models.items():
        q, p = m.logit_margin_quantiles, m.top_probability_quantiles
        z = m.zero_gradient_fraction
        lines.append(
            f"| {objective.upper()} | `{m.checkpoint}` | {m.images} | {m.clean_accuracy:.1%} | "
            f"{q['q10']:.2f} / {q['q50']:.2f} / {q['q90']:.2f} | "
            f"{p['q10']:.4f} / {p['q50']:.4f} | {m.saturated_fraction:.1%} | "
            f"{m.lost_true_class_gradient:.1%} | "
            f"{z['ce']:.1%} / {z['margin']:.1%} |"
        )
    for attack in MASKING_ATTACKS:
        lines += ["", f"## {attack.upper()}: success rate vs eps", ""]
        eps = results.eps
        lines.append("| Obj. | Variant | " + " | ".join(f"{e:g}" for e in eps) + " |")
        lines.append("|---|---|" + "---:|" * len(eps))
        for objective, m in results.models.items():
            for variant in VARIANTS:
                points = m.curves.get(f"{attack}/{variant}", [])
                cells = " | ".join(f"{pt.success_rate:.1%}" for pt in points)
                lines.append(f"| {objective.upper()} | {_VARIANT_TITLES[variant]} | {cells} |")
    lines += ["", "## Checks (Carlini et al. 2019)", "", "| Obj. | Check | Result | Detail |",
              "|---|---|---|---|"]  # fmt: skip
    for objective, m in results.models.items():
        for check in m.checks:
            verdict = "pass" if check.passed else "**FAIL**"
            lines.append(f"| {objective.upper()} | {check.name} | {verdict} | {check.detail} |")
    return "\n".join(lines) + "\n"


def all_passed(results: MaskingResults) -> bool:
    return all(c.passed for m in results.models.values() for c in m.checks)


def created_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
