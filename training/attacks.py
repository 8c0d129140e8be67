"""Attacks on the deployed classifier: ART's standard attacks and two adaptive white-box attacks.

Every attack sees the DEPLOYED logits (softmax(-Z) for RCE models, Pang et al. 2018, 3.2) through
`DeployedLogits`, wrapped in ART's `PyTorchClassifier`. Inputs are pixel fractions in [0, 1], so
every epsilon is a fraction of the pixel range.

- Oblivious attacks from ART: FGSM (label = the clean prediction), BIM (`bim_steps` steps of
  eps / `bim_steps`), ILLCM (the same iteration targeted at the least-likely class), JSMA (targeted
  at the least-likely class) and L-inf PGD on the true label.
- C&W-L2 with kappa 0 and C&W-hc with kappa 10 (random targets) run on our torch implementation
  of Carlini & Wagner's L2 attack (Adam in tanh space, binary search over c, early abort), the
  same code as C&W-wb without the detector term. ART's `CarliniL2Method` computes the same
  objective but with a numpy line search: on ResNet-32, 100 MNIST images, one CPU thread it took
  118 s for 10 iterations against 11 s for ours, which does not fit the compute budget.
- Adaptive attacks (ours, plain torch, against the detector too):
  `cw_wb` is the paper's C&W-wb (section 4.3): the C&W-L2 objective anchored to the CLEAN image
  plus a hinge max(T - log KD_t(x'), 0) that pushes the detection score of the target class t above
  the DEPLOYED threshold T (the paper aims at the class median; the deployed threshold is what an
  attacker of this service must beat). `adaptive_pgd` is an L-inf PGD that maximises a clipped
  margin loss on the label while pushing the score of the runner-up class above T.
  Each aims at one metric at its deployed threshold: K-density (`cw-wb`, `pgd-adaptive`), the
  Mahalanobis score (`-mahalanobis`) or the combined decision (`-combined`), which is attacked
  through one hinge per component at the component's threshold (its clean T-quantile: the
  union test's equivalent form), not through the combined score's piecewise-linear CDF, whose
  gradient vanishes above the top knot and is coarse between knots.
  Both keep, per image, the best iterate: misclassified AND accepted with the smallest distortion
  (C&W) or first found (PGD), else misclassified with the least total shortfall below the
  thresholds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.manifest import Metric
from training.deployed import Activations, DeployedLogits, DeployedModel
from training.scores import SCORES, combined

# The loss ART's gradient attacks (FGSM, BIM, ILLCM, PGD) follow. "ce" alone is masked on models
# with a saturated softmax (see `training.robustness`); "both" runs the attack with each loss and
# keeps, per image, the cross-entropy result where it succeeds and the margin result otherwise.
AttackLoss = Literal["ce", "margin", "both"]
ATTACK_LOSSES: tuple[AttackLoss, ...] = ("both", "ce", "margin")
GRADIENT_ATTACKS = ("fgsm", "bim", "illcm", "pgd")


@dataclass(frozen=True)
class AttackSettings:
    """Attack hyper-parameters; recorded verbatim in results.json."""

    eps: float = 0.1
    bim_steps: int = 10
    jsma_theta: float = 1.0
    jsma_gamma: float = 0.1
    cw_binary_steps: int = 5
    cw_max_iter: int = 100
    cw_learning_rate: float = 0.1
    cw_initial_const: float = 1.0
    cw_hc_kappa: float = 10.0
    pgd_eps: float = 0.1
    pgd_step: float = 0.01
    pgd_steps: int = 40
    adaptive_weight: float = 1.0
    adaptive_margin: float = 0.5
    batch_size: int = 100
    attack_loss: AttackLoss = "both"

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example logit margin max_{i != y} Z_i - Z_y (Carlini & Wagner 2017, f6 without the
    kappa clip): positive iff the image is misclassified. Unlike cross-entropy it does not
    saturate, and its gradient sign does not change when the logits are scaled."""
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return others.amax(dim=1) - logits.gather(1, labels[:, None]).squeeze(1)


class MarginLoss(nn.Module):
    """`margin_loss` summed over the batch, as ART's loss: ART ascends it for untargeted attacks
    (towards any other class) and descends it for targeted ones (towards the target)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        # ART reduces one-hot labels to indices for its known losses only.
        indices = labels.argmax(dim=1) if labels.ndim == 2 else labels.long()
        return margin_loss(logits, indices).sum()


def art_classifier(
    detector: DeployedModel,
    shape: tuple[int, int, int],
    classes: int,
    loss: Literal["ce", "margin"] = "ce",
) -> Any:
    """ART's PyTorchClassifier over the deployed logits of `detector`'s network."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=DeployedLogits(detector.network, detector.objective),
        loss=nn.CrossEntropyLoss() if loss == "ce" else MarginLoss(),
        input_shape=shape,
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def score_of_class(
    detector: DeployedModel, metric: Metric, activations: Activations, classes: Tensor
) -> Tensor:
    """The detection score as if `classes` were the prediction (differentiable): the deployed
    graph's own score function (`training.scores.SCORES`) for other classes."""
    return SCORES[metric].function(detector.score_inputs(activations, classes))


def aims(detector: DeployedModel, metric: Metric, threshold: float) -> list[tuple[Metric, float]]:
    """The (metric, threshold) pairs an adaptive attack on `metric` at `threshold` must clear:
    the metric itself, or for the combined decision each component at its clean quantile."""
    if metric not in detector.metrics:
        raise ValueError(f"the detector has no {metric} score to attack")
    fit = detector.combined_fit
    if metric == "combined" and fit is not None:
        return [(m, fit.component_threshold(m, threshold)) for m in fit.metrics]
    return [(metric, threshold)]


@dataclass(frozen=True)
class DetectorTerms:
    """What an adaptive attack sees of the detector for one iterate: the hinge to minimise,
    whether the deployed test accepts it, and its shortfall below the thresholds (<= 0)."""

    hinge: Tensor
    accepted: Tensor
    slack: Tensor


def detector_terms(
    detector: DeployedModel,
    metric: Metric,
    threshold: float,
    activations: Activations,
    classes: Tensor,
    margin: float,
) -> DetectorTerms:
    """sum over `aims` of max(T_m + margin - s_m(x'), 0), each score for `classes`; accepted
    means the deployed metric's own score for `classes` is >= `threshold`."""
    hinge: Tensor | float = 0.0
    slack: Tensor | float = 0.0
    components: dict[Metric, Tensor] = {}
    for name, bound in aims(detector, metric, threshold):
        components[name] = score_of_class(detector, name, activations, classes)
        hinge = hinge + (bound + margin - components[name]).clamp_min(0.0)
        slack = slack - (bound - components[name]).clamp_min(0.0)
    if metric == "combined" and detector.combined_fit is not None:
        inputs = detector.score_inputs(activations, classes)
        assert inputs.combined is not None
        score = combined(components, inputs.combined)
    else:
        score = components[metric]
    assert isinstance(hinge, Tensor) and isinstance(slack, Tensor)
    return DetectorTerms(hinge, (score >= threshold).detach(), slack.detach())


def _one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.asarray(np.eye(classes, dtype=np.float32)[labels])


def random_targets(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random class != label for every image (the C&W protocol)."""
    offsets = rng.integers(1, classes, size=labels.shape[0])
    return (labels + offsets) % classes


def _batched(fn: Callable[..., Tensor], batch_size: int, desc: str, *tensors: Tensor) -> Tensor:
    """`fn` over `batch_size` rows of every tensor at a time, the results concatenated."""
    parts = []
    starts = range(0, tensors[0].shape[0], batch_size)
    for start in tqdm(starts, desc=f"{desc} batches", leave=False, disable=len(starts) < 2):
        index = slice(start, start + batch_size)
        parts.append(fn(*(t[index] for t in tensors)))
    return torch.cat(parts)


def cw_wb(
    detector: DeployedModel,
    images: Tensor,
    targets: Tensor,
    threshold: float,
    metric: Metric,
    settings: AttackSettings,
    kappa: float = 0.0,
    detector_term: bool = True,
) -> Tensor:
    """C&W-L2 (Carlini & Wagner 2017) plus the paper's detector hinge, anchored to `images`.

    loss = ||x' - x||^2 + c * (max(max_{i!=t} Z_i - Z_t, -kappa) + max(T + m - s_t(x'), 0)),
    with binary search over c (the hinge summed over `aims` for the combined decision). An
    iterate succeeds when its label is t by at least kappa and the deployed test accepts it.
    `detector_term=False` gives the oblivious C&W-L2 of the same implementation.
    One batch: `run_attack` splits the images into batches of `batch_size`.
    """
    n = images.shape[0]
    w0 = torch.atanh((2.0 * images - 1.0).clamp(-1 + 1e-6, 1 - 1e-6))
    target_mask = F.one_hot(targets, detector.num_classes).bool()
    const = torch.full((n,), settings.cw_initial_const)
    lower, upper = torch.zeros(n), torch.full((n,), math.inf)
    best, best_l2 = images.clone(), torch.full((n,), math.inf)
    # Fallback for images never fully successful: label hit with the least shortfall.
    fallback, fallback_score = images.clone(), torch.full((n,), -math.inf)
    margin = settings.adaptive_margin if detector_term else 0.0
    steps = tqdm(range(settings.cw_binary_steps), desc="C&W binary search", leave=False)
    for _ in steps:
        w = w0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=settings.cw_learning_rate)
        round_ok = torch.zeros(n, dtype=torch.bool)
        previous = math.inf
        for step in range(settings.cw_max_iter):
            adversarial = (torch.tanh(w) + 1.0) / 2.0
            activations = detector.activations(adversarial)
            logits = activations.logits
            l2 = (adversarial - images).flatten(1).pow(2).sum(1)
            other = logits.masked_fill(target_mask, -math.inf).max(1).values
            gap = other - logits.gather(1, targets[:, None]).squeeze(1)
            terms = (
                detector_terms(detector, metric, threshold, activations, targets, margin)
                if detector_term
                else None
            )
            hinge = terms.hinge if terms is not None else 0.0
            loss = l2 + const * (gap.clamp_min(-kappa) + hinge)
            optimizer.zero_grad()
            loss.sum().backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            with torch.no_grad():
                hit = gap <= -kappa if kappa > 0 else logits.argmax(1) == targets
                ok = hit & terms.accepted if terms is not None else hit
                improved = ok & (l2 < best_l2)
                best[improved], best_l2[improved] = adversarial[improved], l2[improved]
                round_ok |= ok
                slack = terms.slack if terms is not None else -l2
                better = hit & (slack > fallback_score)
                fallback[better], fallback_score[better] = adversarial[better], slack[better]
            # Early abort as in the original C&W code: stop when the loss stalls.
            if step % max(settings.cw_max_iter // 10, 1) == 0:
                total = float(loss.detach().sum())
                if total > previous * 0.9999:
                    break
                previous = total
        upper = torch.where(round_ok, torch.minimum(upper, const), upper)
        lower = torch.where(round_ok, lower, torch.maximum(lower, const))
        const = torch.where(torch.isinf(upper), const * 10.0, (lower + upper) / 2.0)
    found = torch.isfinite(best_l2)
    return torch.where(found[:, None, None, None], best, fallback).detach()


def adaptive_pgd(
    detector: DeployedModel,
    images: Tensor,
    labels: Tensor,
    threshold: float,
    metric: Metric,
    settings: AttackSettings,
) -> Tensor:
    """L-inf PGD on the label AND the detector: maximise

    min(max_{i!=y} Z_i - Z_y, margin) - w * max(T + margin - s_t(x'), 0)

    with t = argmax_{i!=y} Z_i (the runner-up class, where the label is headed) and
    w = `adaptive_weight` (the hinge summed over `aims` for the combined decision), with signed
    gradient steps of `pgd_step`, projected on the eps-ball around the clean image. Per image it
    keeps the first iterate that is misclassified and accepted, else the misclassified iterate
    with the least shortfall. One batch: `run_attack` splits the images into batches of
    `batch_size`.
    """
    n = images.shape[0]
    label_mask = F.one_hot(labels, detector.num_classes).bool()
    margin = settings.adaptive_margin
    best, best_state = images.clone(), torch.zeros(n, dtype=torch.long)
    best_score = torch.full((n,), -math.inf)
    adversarial = images.clone()
    for step in tqdm(range(settings.pgd_steps + 1), desc="adaptive PGD", leave=False):
        adversarial.requires_grad_(True)
        activations = detector.activations(adversarial)
        logits = activations.logits
        other, runner_up = logits.masked_fill(label_mask, -math.inf).max(1)
        gap = other - logits.gather(1, labels[:, None]).squeeze(1)
        terms = detector_terms(detector, metric, threshold, activations, runner_up, margin)
        objective = gap.clamp_max(margin) - settings.adaptive_weight * terms.hinge
        (gradient,) = torch.autograd.grad(objective.sum(), adversarial)
        with torch.no_grad():
            missed = logits.argmax(1) != labels
            state = missed.long() + (missed & terms.accepted).long()
            better = (state > best_state) | (
                (state == best_state) & (state == 1) & (terms.slack > best_score)
            )
            best[better], best_state[better] = adversarial[better], state[better]
            best_score[better] = terms.slack[better]
            if step == settings.pgd_steps:
                break
            adversarial = adversarial + settings.pgd_step * gradient.sign()
            low, high = images - settings.pgd_eps, images + settings.pgd_eps
            adversarial = torch.maximum(torch.minimum(adversarial, high), low).clamp(0.0, 1.0)
    return best.detach()


def _gradient_params(name: str, s: AttackSettings) -> dict[str, float | int | str]:
    loss = {"both": "cross-entropy, then margin where it failed", "ce": "cross-entropy",
            "margin": "logit margin (C&W f6)"}[s.attack_loss]  # fmt: skip
    if name == "fgsm":
        params: dict[str, float | int | str] = {
            "eps": s.eps, "label": "clean prediction", "implementation": "ART FastGradientMethod"
        }  # fmt: skip
    elif name == "pgd":
        params = {
            "eps": s.pgd_eps, "eps_step": s.pgd_step, "steps": s.pgd_steps,
            "implementation": "ART ProjectedGradientDescent (no random start)",
        }  # fmt: skip
    else:
        params = {
            "eps": s.eps, "eps_step": s.eps / s.bim_steps, "steps": s.bim_steps,
            "implementation": "ART BasicIterativeMethod",
        }  # fmt: skip
        if name == "illcm":
            params["target"] = "least likely"
    params["loss"] = loss
    return params


def _art_gradient_attack(
    name: str, classifier: Any, images: np.ndarray, y: np.ndarray, s: AttackSettings
) -> np.ndarray:
    from art.attacks.evasion import (
        BasicIterativeMethod,
        FastGradientMethod,
        ProjectedGradientDescent,
    )

    if name == "fgsm":
        attack: Any = FastGradientMethod(classifier, eps=s.eps, batch_size=s.batch_size)
    elif name == "pgd":
        attack = ProjectedGradientDescent(
            classifier, eps=s.pgd_eps, eps_step=s.pgd_step, max_iter=s.pgd_steps,
            num_random_init=0, batch_size=s.batch_size,
        )  # fmt: skip
    else:
        attack = BasicIterativeMethod(
            classifier, s.eps, s.eps / s.bim_steps, s.bim_steps, name == "illcm", s.batch_size
        )
    adversarial: np.ndarray = attack.generate(images, y=_one_hot(y, classifier.nb_classes))
    return adversarial


@torch.no_grad()
def _deployed_labels(detector: DeployedModel, images: np.ndarray) -> np.ndarray:
    logits = DeployedLogits(detector.network, detector.objective)(torch.from_numpy(images))
    return np.asarray(logits.argmax(1).numpy())


def gradient_attack(
    name: str, detector: DeployedModel, images: np.ndarray, y: np.ndarray, s: AttackSettings
) -> np.ndarray:
    """FGSM, BIM, ILLCM (targeted at `y`) or PGD from ART, following `s.attack_loss`.

    Cross-entropy through a saturated softmax gives a CE model vanishing or sign-noisy input
    gradients (gradient masking, `training.robustness`); the logit margin does not saturate.
    With "both", images the cross-entropy run did not fool (untargeted) or did not send to the
    target (ILLCM) are attacked again with the margin loss: never weaker than either alone.
    """
    if name not in GRADIENT_ATTACKS:
        raise ValueError(f"{name!r} is not one of {GRADIENT_ATTACKS}")
    classes = detector.num_classes
    shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
    losses: tuple[Literal["ce", "margin"], ...] = (
        ("ce", "margin") if s.attack_loss == "both" else (s.attack_loss,)
    )
    result: np.ndarray | None = None
    for loss in losses:
        classifier = art_classifier(detector, shape, classes, loss)
        if result is None:
            result = _art_gradient_attack(name, classifier, images, y, s)
            continue
        predicted = _deployed_labels(detector, result)
        done = predicted == y if name == "illcm" else predicted != y
        if done.all():
            break
        retry = np.flatnonzero(~done)
        result[retry] = _art_gradient_attack(name, classifier, images[retry], y[retry], s)
    assert result is not None
    return result


@dataclass(frozen=True)
class AttackOutput:
    adversarial: np.ndarray
    seconds: float
    targets: np.ndarray | None
    params: dict[str, float | int | str]


@dataclass(frozen=True)
class AttackInputs:
    """What every attack is given: float images in [0, 1], their true labels, the clean
    predictions and probabilities of the deployed classifier, and the deployed thresholds."""

    detector: DeployedModel
    images: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    probabilities: np.ndarray
    thresholds: dict[Metric, float]
    settings: AttackSettings
    # Seeded by the run's seed alone, so C&W-L2, C&W-hc and C&W-wb aim at the same targets.
    rng: np.random.Generator

    @property
    def classes(self) -> int:
        return int(self.probabilities.shape[1])

    @property
    def least_likely(self) -> np.ndarray:
        return np.asarray(self.probabilities.argmin(axis=1))

    def threshold(self, metric: Metric) -> float:
        if metric not in self.thresholds:
            raise ValueError(f"no deployed threshold for {metric} to attack")
        return self.thresholds[metric]


# An attack: adversarial images, the targets it aimed at (targeted attacks) and its parameters.
Params = dict[str, float | int | str]
AttackFunction = Callable[[AttackInputs], tuple[np.ndarray, np.ndarray | None, Params]]


@dataclass(frozen=True)
class Attack:
    """One entry of the registry: how the attack runs and on which image budget."""

    run: AttackFunction
    adaptive: bool = False  # knows the detector (Pang et al. 2018, section 4.3)
    slow: bool = False  # runs on the smaller image budget
    metric: Metric | None = None  # the metric an adaptive attack aims at


def _gradient(name: str) -> AttackFunction:
    def run(x: AttackInputs) -> tuple[np.ndarray, np.ndarray | None, Params]:
        targeted = name == "illcm"
        # FGSM and BIM follow the clean prediction (no label leaking), PGD the true label.
        y = x.least_likely if targeted else x.labels if name == "pgd" else x.predictions
        adversarial = gradient_attack(name, x.detector, x.images, y, x.settings)
        return adversarial, x.least_likely if targeted else None, _gradient_params(name, x.settings)

    return run


def _jsma(x: AttackInputs) -> tuple[np.ndarray, np.ndarray | None, Params]:
    from art.attacks.evasion import SaliencyMapMethod

    s = x.settings
    shape = (int(x.images.shape[1]), int(x.images.shape[2]), int(x.images.shape[3]))
    classifier = art_classifier(x.detector, shape, x.classes)
    attack = SaliencyMapMethod(classifier, s.jsma_theta, s.jsma_gamma, s.batch_size)
    targets = x.least_likely
    params: Params = {
        "theta": s.jsma_theta, "gamma": s.jsma_gamma, "target": "least likely",
        "implementation": "ART SaliencyMapMethod",
    }  # fmt: skip
    return attack.generate(x.images, y=_one_hot(targets, x.classes)), targets, params


def _cw_budget(s: AttackSettings, kappa: float) -> Params:
    return {
        "kappa": kappa, "binary_search_steps": s.cw_binary_steps, "max_iter": s.cw_max_iter,
        "learning_rate": s.cw_learning_rate, "initial_const": s.cw_initial_const,
    }  # fmt: skip


def _cw(name: str, metric: Metric | None = None) -> AttackFunction:
    """C&W-L2 (kappa 0), C&W-hc (kappa 10), or with `metric` C&W-wb aimed at that metric."""
    detector_term = metric is not None

    def run(x: AttackInputs) -> tuple[np.ndarray, np.ndarray | None, Params]:
        s = x.settings
        kappa = s.cw_hc_kappa if name == "cw-hc" else 0.0
        targets = random_targets(x.labels, x.classes, x.rng)
        aimed: Metric = metric or "log_kd"
        threshold = x.threshold(aimed) if detector_term else 0.0
        params = _cw_budget(s, kappa)
        if detector_term:
            params |= {"margin": s.adaptive_margin, "metric": aimed, "threshold": threshold}
            params |= {"target": "random != true label", "anchor": "clean image"}
        else:
            params |= {"target": "random != true label", "implementation": "rcegate torch C&W-L2"}

        def batch(images: Tensor, aims: Tensor) -> Tensor:
            return cw_wb(x.detector, images, aims, threshold, aimed, s, kappa, detector_term)

        adversarial = _batched(
            batch, s.batch_size, name, torch.from_numpy(x.images), torch.from_numpy(targets)
        )
        return adversarial.numpy(), targets, params

    return run


def _pgd_adaptive(metric: Metric) -> AttackFunction:
    def run(x: AttackInputs) -> tuple[np.ndarray, np.ndarray | None, Params]:
        s = x.settings
        threshold = x.threshold(metric)
        params: Params = {
            "eps": s.pgd_eps, "eps_step": s.pgd_step, "steps": s.pgd_steps,
            "weight": s.adaptive_weight, "margin": s.adaptive_margin, "metric": metric,
            "threshold": threshold,
        }  # fmt: skip

        def batch(images: Tensor, labels: Tensor) -> Tensor:
            return adaptive_pgd(x.detector, images, labels, threshold, metric, s)

        adversarial = _batched(
            batch, s.batch_size, "pgd-adaptive", torch.from_numpy(x.images),
            torch.from_numpy(x.labels),
        )  # fmt: skip
        return adversarial.numpy(), None, params

    return run


# The registry, in report order: adding an attack is one entry here (and a title in
# `training.report.ATTACK_TITLES`). Slow: optimisation-based (C&W), compared at equal budget
# (PGD), or slow in ART (JSMA: about 1.4 s per MNIST image on one thread).
REGISTRY: dict[str, Attack] = {
    "fgsm": Attack(_gradient("fgsm")),
    "bim": Attack(_gradient("bim")),
    "illcm": Attack(_gradient("illcm")),
    "jsma": Attack(_jsma, slow=True),
    "cw-l2": Attack(_cw("cw-l2"), slow=True),
    "cw-hc": Attack(_cw("cw-hc"), slow=True),
    "pgd": Attack(_gradient("pgd"), slow=True),
    # Adaptive: the paper's target (K-density), then each score beyond the paper.
    "pgd-adaptive": Attack(_pgd_adaptive("log_kd"), True, True, "log_kd"),
    "cw-wb": Attack(_cw("cw-wb", "log_kd"), True, True, "log_kd"),
    "pgd-adaptive-mahalanobis": Attack(_pgd_adaptive("mahalanobis"), True, True, "mahalanobis"),
    "cw-wb-mahalanobis": Attack(_cw("cw-wb", "mahalanobis"), True, True, "mahalanobis"),
    "pgd-adaptive-combined": Attack(_pgd_adaptive("combined"), True, True, "combined"),
    "cw-wb-combined": Attack(_cw("cw-wb", "combined"), True, True, "combined"),
}
OBLIVIOUS_ATTACKS = tuple(name for name, a in REGISTRY.items() if not a.adaptive)
ADAPTIVE_ATTACKS = tuple(name for name, a in REGISTRY.items() if a.adaptive)
ATTACKS = (*OBLIVIOUS_ATTACKS, *ADAPTIVE_ATTACKS)
SLOW_ATTACKS = tuple(name for name, a in REGISTRY.items() if a.slow)


def run_attack(
    name: str,
    detector: DeployedModel,
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    thresholds: dict[Metric, float],
    settings: AttackSettings,
    seed: int,
) -> AttackOutput:
    """Run one attack of the registry on float images in [0, 1]; `labels` are the true labels,
    `thresholds` the deployed threshold of each metric (adaptive attacks aim at theirs)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    inputs = AttackInputs(
        detector, images, labels, predictions, probabilities, dict(thresholds), settings,
        np.random.default_rng(seed),
    )  # fmt: skip
    torch.manual_seed(seed)
    started = time.perf_counter()
    adversarial, targets, params = REGISTRY[name].run(inputs)
    seconds = time.perf_counter() - started
    return AttackOutput(np.clip(adversarial.astype(np.float32), 0.0, 1.0), seconds, targets, params)
