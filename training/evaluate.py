"""The evaluation protocol: attack exported models and measure the thresholding test.

For each model (an exported artifact plus the checkpoint and calibration that produced it) the
torch detector is first checked against ONNX Runtime on real test images, so the attacks hit
exactly what is deployed. Then every attack runs on a seeded sample of test images and, following
Pang et al. 2018 (section 4), only pairs whose clean image is classified correctly and whose
adversarial image is misclassified are kept. Per metric (confidence, non-ME, K-density, and the
Mahalanobis and combined scores of artifacts that have them):

- ROC-AUC with the clean images of the kept pairs as the positive class (higher score = normal),
- detection rate: fraction of kept adversarial images rejected at the calibrated threshold,
- accuracy on accepted inputs: over all attacked clean images and all their adversarial
  counterparts (kept or not), the accuracy of the predictions the detector lets through.

Plus distortion (L2 and L-inf, on kept pairs), attack success rate and time per image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.manifest import MODEL_FILE, Manifest, Metric
from models.manifest import sha256_file as _sha256
from training.attacks import ATTACKS, REGISTRY, SLOW_ATTACKS, AttackSettings, run_attack
from training.calibrate import Calibration, calibration_from_artifact
from training.checkpoints import load_trained_model
from training.data import Dataset, to_tensor
from training.deployed import DeployedModel, detector_outputs
from training.parity import CHECK_IMAGES, ParityError, check_parity, onnx_outputs
from training.provenance import source_commit
from training.results import (
    AttackResult,
    CleanResult,
    Distortion,
    EvaluationResults,
    MetricResult,
    ModelResult,
)
from training.runtime import seed_everything

logger = logging.getLogger(__name__)


class EvaluationError(Exception):
    """The inputs of an evaluation are inconsistent (artifact vs checkpoint, datasets, ONNX)."""


@dataclass
class ModelUnderTest:
    """An exported artifact together with the torch detector that reproduces it."""

    artifact: Path
    manifest: Manifest
    detector: DeployedModel
    dataset: Dataset
    onnx_errors: dict[str, float]


@dataclass
class AttackScores:
    """Per-metric scores of the kept pairs, for ROC curves and histograms."""

    normal: dict[str, np.ndarray]
    adversarial: dict[str, np.ndarray]


@dataclass
class Evaluation:
    results: EvaluationResults
    scores: dict[str, dict[str, AttackScores]] = field(default_factory=dict)


def roc_auc(normal: np.ndarray, adversarial: np.ndarray) -> float:
    """ROC-AUC with normal as the positive class and higher score = normal.

    Equals P(s_normal > s_adv) + P(s_normal = s_adv) / 2, the Mann-Whitney U statistic over
    n_normal * n_adv, computed from mid-ranks.
    """
    normal = np.asarray(normal, dtype=np.float64)
    adversarial = np.asarray(adversarial, dtype=np.float64)
    if normal.size == 0 or adversarial.size == 0:
        raise ValueError("ROC-AUC needs at least one normal and one adversarial score")
    scores = np.concatenate([normal, adversarial])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0
    rank_sum = mid_ranks[inverse[: normal.size]].sum()
    u = rank_sum - normal.size * (normal.size + 1) / 2.0
    return float(u / (normal.size * adversarial.size))


def keep_pairs(labels: np.ndarray, clean_pred: np.ndarray, adv_pred: np.ndarray) -> np.ndarray:
    """The paper's filter: clean image classified correctly AND adversarial image misclassified."""
    return np.asarray((clean_pred == labels) & (adv_pred != labels), dtype=bool)


def load_model_under_test(
    artifact: Path, checkpoint: Path | None = None, calibration: Path | None = None
) -> ModelUnderTest:
    """Load the network and calibration behind `artifact` and verify they reproduce it: from
    `checkpoint` (and its calibration file), or without one from the artifact itself (the
    network rebuilt from model.onnx, the detector's constants from the manifest)."""
    from training.recover import RecoveryError, load_artifact_network

    manifest = Manifest.load(artifact)
    if _sha256(artifact / MODEL_FILE) != manifest.sha256:
        raise EvaluationError(f"{artifact / MODEL_FILE}: sha256 does not match the manifest")
    if checkpoint is None:
        try:
            network, _, dataset = load_artifact_network(artifact)
            result = calibration_from_artifact(network, manifest, dataset)
        except (RecoveryError, ValueError) as error:
            raise EvaluationError(f"{artifact}: {error}") from error
        objective = manifest.objective
        calibration = artifact
    else:
        network, config, dataset = load_trained_model(checkpoint)
        calibration = calibration or checkpoint.with_suffix(".calibration.pt")
        result = Calibration.load(calibration)
        objective = config.objective
    if objective != manifest.objective or result.objective != manifest.objective:
        raise EvaluationError(
            f"objective mismatch: artifact {manifest.objective}, checkpoint {objective}, "
            f"calibration {result.objective}"
        )
    if set(result.metrics) != set(manifest.metrics):
        raise EvaluationError(
            f"{calibration} scores {list(result.metrics)}, the artifact {list(manifest.metrics)}"
        )
    for metric in manifest.metrics:
        deployed, ours = manifest.detection.thresholds[metric], result.thresholds[metric]
        if not np.isclose(deployed, ours, rtol=1e-6, atol=1e-6):
            raise EvaluationError(
                f"{calibration}: {metric} threshold {ours} differs from the artifact's {deployed}"
            )
    detector = result.deployed(network).eval()
    detector.requires_grad_(False)
    images = dataset.test.images[:CHECK_IMAGES]
    try:
        errors = check_parity(artifact / MODEL_FILE, detector, to_tensor(images).numpy())
    except ParityError as error:
        raise EvaluationError(f"{artifact / MODEL_FILE}: {error}") from error
    logger.info("%s: torch detector matches ONNX Runtime (max abs error %s)", artifact, errors)
    return ModelUnderTest(artifact, manifest, detector, dataset, errors)


def attack_result(
    name: str,
    labels: np.ndarray,
    images: np.ndarray,
    adversarial: np.ndarray,
    clean: dict[str, np.ndarray],
    adv: dict[str, np.ndarray],
    thresholds: dict[Metric, float],
    default_metric: Metric,
    seconds: float,
    targets: np.ndarray | None,
    params: dict[str, float | int | str],
    onnx_label_agreement: float | None = None,
) -> tuple[AttackResult, AttackScores]:
    """Every number of one (model, attack) cell from the clean and adversarial detector outputs."""
    correct = clean["label"] == labels
    kept = keep_pairs(labels, clean["label"], adv["label"])
    n_kept = int(kept.sum())
    metrics: dict[str, MetricResult] = {}
    scores = AttackScores({}, {})
    mixed_labels = np.concatenate([labels, labels])
    mixed_correct = np.concatenate([clean["label"], adv["label"]]) == mixed_labels
    for metric in thresholds:
        threshold = thresholds[metric]
        normal, attacked = clean[metric][kept], adv[metric][kept]
        scores.normal[metric], scores.adversarial[metric] = normal, attacked
        accepted = np.concatenate([clean[metric], adv[metric]]) >= threshold
        metrics[metric] = MetricResult(
            roc_auc=roc_auc(normal, attacked) if n_kept else None,
            detection_rate=float((attacked < threshold).mean()) if n_kept else None,
            clean_rejection_rate=float((normal < threshold).mean()) if n_kept else None,
            accuracy_on_accepted=(
                float(mixed_correct[accepted].mean()) if accepted.any() else None
            ),
            accepted_fraction=float(accepted.mean()),
            threshold=threshold,
        )
    delta = (adversarial - images).reshape(len(images), -1)
    l2, linf = np.linalg.norm(delta, axis=1), np.abs(delta).max(axis=1)
    targeted = None
    if targets is not None and correct.any():
        targeted = float((adv["label"][correct] == targets[correct]).mean())
    default_accepted = adv[default_metric] >= thresholds[default_metric]
    result = AttackResult(
        params=params,
        images=len(labels),
        clean_correct=int(correct.sum()),
        kept=n_kept,
        success_rate=n_kept / max(int(correct.sum()), 1),
        targeted_success_rate=targeted,
        undetected_success_rate=float((kept & default_accepted).sum() / max(int(correct.sum()), 1)),
        distortion=Distortion(
            l2=float(l2[kept].mean()) if n_kept else None,
            linf=float(linf[kept].mean()) if n_kept else None,
            l2_max=float(l2.max()),
            linf_max=float(linf.max()),
        ),
        seconds_per_image=seconds / max(len(labels), 1),
        onnx_label_agreement=onnx_label_agreement,
        metrics=metrics,
    )
    logger.info(
        "%s: kept %d/%d, success %.3f, AUC %s",
        name, n_kept, int(correct.sum()), result.success_rate,
        {m: metrics[m].roc_auc for m in metrics},
    )  # fmt: skip
    return result, scores


def attack_cell(
    name: str,
    detector: DeployedModel,
    images: np.ndarray,
    labels: np.ndarray,
    clean: dict[str, np.ndarray],
    thresholds: dict[Metric, float],
    default_metric: Metric,
    settings: AttackSettings,
    seed: int,
    artifact: Path | None = None,
) -> tuple[AttackResult, AttackScores]:
    """Run attack `name` (seeded) on float `images` whose clean detector outputs are `clean`,
    score the adversarial images and measure the cell; with `artifact`, also the fraction of
    adversarial images on which its ONNX graph predicts the torch detector's label."""
    seed_everything(seed)
    output = run_attack(
        name, detector, images, labels, clean["label"], clean["probabilities"], thresholds,
        settings, seed,
    )  # fmt: skip
    adv = detector_outputs(detector, output.adversarial)
    agreement = None
    if artifact is not None:
        onnx_labels = onnx_outputs(artifact / MODEL_FILE, output.adversarial)["label"]
        agreement = float((onnx_labels == adv["label"]).mean())
    return attack_result(
        name, labels, images, output.adversarial, clean, adv, thresholds, default_metric,
        output.seconds, output.targets, output.params, agreement,
    )  # fmt: skip


def evaluate_model(
    model: ModelUnderTest,
    attacks: tuple[str, ...],
    n_fast: int,
    n_slow: int,
    settings: AttackSettings,
    seed: int,
) -> tuple[ModelResult, dict[str, AttackScores]]:
    detector, dataset = model.detector, model.dataset
    thresholds: dict[Metric, float] = dict(model.manifest.detection.thresholds)
    default_metric = model.manifest.detection.default_metric
    test = dataset.test
    full = detector_outputs(detector, to_tensor(test.images).numpy())
    clean_result = CleanResult(
        images=len(test),
        accuracy=float((full["label"] == test.labels).mean()),
        rejection_rate={m: float((full[m] < thresholds[m]).mean()) for m in thresholds},
    )
    order = np.random.default_rng(seed).permutation(len(test))
    results: dict[str, AttackResult] = {}
    scores: dict[str, AttackScores] = {}
    name = f"{model.manifest.name} ({model.manifest.objective})"
    for attack in tqdm(attacks, desc=name):
        index = np.sort(order[: n_slow if attack in SLOW_ATTACKS else n_fast])
        images = to_tensor(test.images[index]).numpy()
        labels = test.labels[index]
        clean = {k: v[index] for k, v in full.items()}
        results[attack], scores[attack] = attack_cell(
            attack, detector, images, labels, clean, thresholds, default_metric, settings, seed,
            model.artifact,
        )  # fmt: skip
    manifest = model.manifest
    d = manifest.detection
    return (
        ModelResult(
            name=manifest.name,
            version=manifest.version,
            objective=manifest.objective,
            artifact=str(model.artifact),
            sha256=manifest.sha256,
            architecture=manifest.architecture.name,
            default_metric=default_metric,
            target_fpr=manifest.detection.target_fpr,
            thresholds=thresholds,
            onnx_max_abs_error=model.onnx_errors,
            clean=clean_result,
            attacks=results,
            mahalanobis_layers=(
                [layer.name for layer in maha.layers] if (maha := d.mahalanobis) else None
            ),
            mahalanobis_source=d.mahalanobis.source if d.mahalanobis else None,
            combined_metrics=list(d.combined.metrics) if d.combined else None,
        ),
        scores,
    )


def applicable_attacks(metrics: list[tuple[Metric, ...]]) -> tuple[str, ...]:
    """Every attack, except the adaptive ones aimed at a score some model does not compute."""
    return tuple(
        a for a in ATTACKS
        if (aim := REGISTRY[a].metric) is None or all(aim in m for m in metrics)
    )  # fmt: skip


def evaluate(
    models: list[ModelUnderTest],
    attacks: tuple[str, ...] = ATTACKS,
    n_fast: int = 500,
    n_slow: int = 100,
    settings: AttackSettings | None = None,
    seed: int = 0,
) -> Evaluation:
    """Evaluate every model under every attack; models must share one dataset and test split."""
    settings = settings or AttackSettings()
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise EvaluationError(f"unknown attacks {sorted(unknown)}; expected some of {ATTACKS}")
    first = models[0].dataset
    for model in models[1:]:
        if model.dataset.name != first.name or not np.array_equal(
            model.dataset.test.labels, first.test.labels
        ):
            raise EvaluationError("all models must be evaluated on the same dataset and test split")
    objectives = [m.manifest.objective for m in models]
    if len(set(objectives)) != len(objectives):
        raise EvaluationError(f"one model per objective, got {objectives}")
    for model in models:
        lacking = [
            a for a in attacks
            if (aim := REGISTRY[a].metric) is not None and aim not in model.manifest.metrics
        ]  # fmt: skip
        if lacking:
            raise EvaluationError(
                f"{model.artifact} has no score for the adaptive attacks {lacking} to aim at"
            )
    evaluation = Evaluation(
        EvaluationResults(
            dataset=first.name,
            created_at=datetime.now(UTC).replace(microsecond=0),
            source_commit=source_commit(),
            seed=seed,
            images_fast=min(n_fast, len(first.test)),
            images_slow=min(n_slow, len(first.test)),
            slow_attacks=[a for a in attacks if a in SLOW_ATTACKS],
            settings=settings.to_dict(),
            torch_threads=torch.get_num_threads(),
            models={},
        )
    )
    for model in models:
        result, scores = evaluate_model(model, attacks, n_fast, n_slow, settings, seed)
        evaluation.results.models[model.manifest.objective] = result
        evaluation.scores[model.manifest.objective] = scores
    return evaluation
