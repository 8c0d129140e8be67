"""Which Mahalanobis detector to deploy: the variants of Lee et al. (NeurIPS 2018), measured.

`rcegate detector-variants` attacks exported models (oblivious attacks: they ignore every
detector, so one set of adversarial images serves every variant) and scores the same clean and
adversarial images with each variant: the Mahalanobis score on the final features alone (the
issue's simplest form) or on a layer ensemble, with class means and tied covariance fitted on
the K-density bank's images or on the whole training split, each alone and combined with
K-density (`training.mahalanobis`); and Lee et al.'s input preprocessing (one signed gradient
step of size eps towards a higher score before scoring), whose cost is a backward pass per
input, timed against the plain score. Per variant: ROC-AUC and the fraction of kept
adversarial images rejected at the variant's own threshold calibrated for `target_fpr` on the
calibration split, and that threshold's rejection of the clean test split.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from training.attacks import AttackSettings, run_attack
from training.calibrate import bank_indices, calibrated_threshold, calibration_from_artifact
from training.data import to_tensor
from training.deployed import DeployedModel, detector_outputs, layer_features
from training.evaluate import keep_pairs, roc_auc
from training.mahalanobis import LAYERS, fit_combined, fit_mahalanobis
from training.nets import ResNet
from training.recover import load_artifact_network
from training.results import ResultsFile
from training.runtime import seed_everything
from training.scores import mahalanobis_distances

# Layer sets: the final features alone (Lee et al.'s single-layer score) up to every layer.
LAYER_SETS: dict[str, tuple[str, ...]] = {
    "features": ("features",),
    "stage1+features": ("stage1", "features"),
    "stage1+stage2+features": ("stage1", "stage2", "features"),
    "all": LAYERS,
}
# Oblivious attacks: (name, attack, settings); FGSM 0.2 and PGD 0.15 x 20 are the issue's.
ATTACKS: tuple[tuple[str, str, dict[str, float | int]], ...] = (
    ("FGSM eps 0.2", "fgsm", {"eps": 0.2}),
    ("PGD eps 0.15, 20 steps", "pgd", {"pgd_eps": 0.15, "pgd_step": 0.015, "pgd_steps": 20}),
    ("FGSM eps 0.1", "fgsm", {"eps": 0.1}),
    ("BIM eps 0.1", "bim", {"eps": 0.1}),
    ("PGD eps 0.1, 40 steps", "pgd", {"pgd_eps": 0.1, "pgd_step": 0.01, "pgd_steps": 40}),
)
PREPROCESSING_EPS = (0.001, 0.005)
PREPROCESSED_SETS = ("features", "all")
# Clean images (calibration and test split, each) scored with preprocessing: it costs three
# network passes per image and eps, so its thresholds come from this many calibration images.
PREPROCESSED_CLEAN = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Cell(_Strict):
    roc_auc: float | None
    detection_rate: float | None


class ModelVariants(_Strict):
    name: str
    version: int
    objective: str
    train_per_class: list[int]
    bank_per_class: list[int]
    clean_test_rejection: dict[str, float] = Field(description="Per variant, at its threshold.")
    attacks: dict[str, dict[str, Cell]] = Field(description="attack -> variant -> cell.")
    kept: dict[str, int]
    preprocessing_cost: dict[str, float] = Field(
        description="Batch 64, torch, one thread: seconds of the plain score and of the "
        "preprocessed one (forward, backward, forward), and their ratio."
    )


class VariantResults(ResultsFile):
    """results.json of `rcegate detector-variants`."""

    dataset: str
    created_at: datetime
    source_commit: str | None
    seed: int
    images: int
    target_fpr: float
    models: dict[str, ModelVariants] = Field(description="Keyed by objective: ce, rce.")


def _score_fn(
    network: ResNet, fit_means: Sequence[np.ndarray], fit_precisions: Sequence[np.ndarray],
    centres: np.ndarray, scales: np.ndarray, layers: tuple[str, ...],
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    means = [torch.from_numpy(np.asarray(m, np.float32)) for m in fit_means]
    precisions = [torch.from_numpy(np.asarray(p, np.float32)) for p in fit_precisions]

    def score(images: torch.Tensor) -> torch.Tensor:
        _, _, found = network.forward_layers(images)
        parts = [
            (-mahalanobis_distances(found[n], means[i], precisions[i]).min(dim=1).values
             - float(centres[i])) / float(scales[i])
            for i, n in enumerate(layers)
        ]  # fmt: skip
        return torch.stack(parts, dim=1).mean(dim=1)

    return score


def preprocessed(
    score: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, eps: float
) -> np.ndarray:
    """Lee et al.'s input preprocessing: x' = x + eps * sign(grad_x score(x)), then score(x')."""
    out = []
    for start in range(0, len(images), 100):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + 100]))
        x.requires_grad_(True)
        (gradient,) = torch.autograd.grad(score(x).sum(), x)
        with torch.no_grad():
            out.append(score((x + eps * gradient.sign()).clamp(0.0, 1.0)).numpy())
    return np.concatenate(out)


def _cell(clean: np.ndarray, adversarial: np.ndarray, threshold: float) -> Cell:
    if clean.size == 0:
        return Cell(roc_auc=None, detection_rate=None)
    return Cell(
        roc_auc=roc_auc(clean, adversarial),
        detection_rate=float((adversarial < threshold).mean()),
    )


def _timed(fn: Callable[[], object], rounds: int = 10) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_model(artifact: Path, images: int, target_fpr: float, seed: int) -> ModelVariants:
    seed_everything(seed)
    network, manifest, dataset = load_artifact_network(artifact)
    network.requires_grad_(False)
    calibration = calibration_from_artifact(network, manifest, dataset)
    detector = DeployedModel(
        network, manifest.objective, calibration.bank, calibration.bank_mask,
        calibration.sigma2,
    ).eval()  # fmt: skip
    labels_train = dataset.train.labels
    train = layer_features(network, dataset.train.images, progress="variants: train features")
    per_class = max(manifest.detection.bank_size_per_class)
    bank_rows = np.concatenate(
        bank_indices(labels_train, dataset.num_classes, per_class, calibration.bank_seed)
    )
    calibration_layers = layer_features(network, dataset.calibration.images)
    fits = {}
    for source, rows in (("train", slice(None)), ("bank", bank_rows)):
        for name, layers in LAYER_SETS.items():
            fits[f"{name} ({source})"] = fit_mahalanobis(
                {k: train[k][rows] for k in layers}, labels_train[rows], calibration_layers,
                dataset.num_classes, layers, source,  # type: ignore[arg-type]
            )  # fmt: skip
    functions = {
        key: _score_fn(network, f.means, f.precisions, f.centres, f.scales, f.layers)
        for key, f in fits.items()
    }

    def all_scores(float_images: np.ndarray, preprocess: int) -> dict[str, np.ndarray]:
        """Every variant's scores; the preprocessed ones for the first `preprocess` images."""
        out = detector_outputs(detector, float_images)
        layers = _float_layers(network, float_images)
        scores = {"K-density": out["log_kd"]}
        scores |= {key: fit.score(layers) for key, fit in fits.items()}
        for name in PREPROCESSED_SETS:
            for eps in PREPROCESSING_EPS:
                scores[f"{name} (train), preprocessed eps {eps:g}"] = preprocessed(
                    functions[f"{name} (train)"], float_images[:preprocess], eps
                )
        return scores

    calibration_float = to_tensor(dataset.calibration.images).numpy()
    clean_calibration = all_scores(calibration_float, PREPROCESSED_CLEAN)
    combined = {
        key: fit_combined(clean_calibration, ("K-density", key))  # type: ignore[arg-type]
        for key in fits
    }

    def with_combined(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return scores | {f"K-density or {k}": c.score(scores) for k, c in combined.items()}

    clean_calibration = with_combined(clean_calibration)
    thresholds = {k: calibrated_threshold(v, target_fpr) for k, v in clean_calibration.items()}
    test_float = to_tensor(dataset.test.images).numpy()
    clean_test = with_combined(all_scores(test_float, PREPROCESSED_CLEAN))
    rejection = {k: float((clean_test[k] < thresholds[k]).mean()) for k in thresholds}
    order = np.random.default_rng(seed).permutation(len(dataset.test))
    index = np.sort(order[:images])
    x, y = test_float[index], dataset.test.labels[index]
    outputs = detector_outputs(detector, x)
    clean = with_combined(all_scores(x, len(x)))
    cells: dict[str, dict[str, Cell]] = {}
    kept_counts: dict[str, int] = {}
    for title, attack, overrides in ATTACKS:
        settings = AttackSettings(**overrides)  # type: ignore[arg-type]
        result = run_attack(
            attack, detector, x, y, outputs["label"], outputs["probabilities"], {}, settings, seed
        )
        adversarial_labels = detector_outputs(detector, result.adversarial)["label"]
        kept = keep_pairs(y, outputs["label"], adversarial_labels)
        adversarial = with_combined(all_scores(result.adversarial, len(x)))
        kept_counts[title] = int(kept.sum())
        cells[title] = {
            k: _cell(clean[k][kept], adversarial[k][kept], thresholds[k]) for k in thresholds
        }
    batch = torch.from_numpy(test_float[:64])
    plain_score = functions["all (train)"]
    with torch.no_grad():
        plain = _timed(lambda: plain_score(batch))
    slow = _timed(lambda: preprocessed(plain_score, test_float[:64], 0.001))
    return ModelVariants(
        name=manifest.name,
        version=manifest.version,
        objective=manifest.objective,
        train_per_class=np.bincount(labels_train, minlength=dataset.num_classes).tolist(),
        bank_per_class=list(manifest.detection.bank_size_per_class),
        clean_test_rejection=rejection,
        attacks=cells,
        kept=kept_counts,
        preprocessing_cost={"plain_s": plain, "preprocessed_s": slow, "ratio": slow / plain},
    )


def _float_layers(network: ResNet, float_images: np.ndarray) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(float_images), 500):
            batch = torch.from_numpy(np.ascontiguousarray(float_images[start : start + 500]))
            for name, value in network.forward_layers(batch)[2].items():
                parts.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def render_report(results: VariantResults) -> str:
    """report.md of the study: one table per attack, variants as rows, CE and RCE as columns."""
    objectives = [o for o in ("ce", "rce") if o in results.models]
    first = results.models[objectives[0]]
    out = [
        f"# Mahalanobis variants: {results.dataset}",
        "",
        f"Generated by `rcegate detector-variants` on {results.created_at:%Y-%m-%d %H:%M} UTC "
        f"from commit `{results.source_commit or 'unknown'}`, seed {results.seed}, "
        f"{results.images} test images per attack. Raw numbers: [`results.json`](results.json). "
        "Oblivious attacks (they ignore every detector); per variant ROC-AUC and the fraction "
        "of kept adversarial images rejected at the variant's threshold, calibrated on the "
        f"calibration split for target FPR {results.target_fpr}. *(train)*: class means and "
        "tied covariance from the whole training split "
        f"({', '.join(f'{o.upper()} {sum(results.models[o].train_per_class)}' for o in objectives)}"
        " images); *(bank)*: from the K-density bank's images "
        f"({sum(first.bank_per_class)}). *Preprocessed*: Lee et al.'s input preprocessing "
        "(one signed gradient step of size eps towards a higher score, before scoring; its "
        f"thresholds and clean rejection from the first {PREPROCESSED_CLEAN} images of each "
        "split).",
        "",
        "## Clean test split rejected at each variant's threshold",
        "",
        "| Variant | " + " | ".join(o.upper() for o in objectives) + " |",
        "|---|" + "---:|" * len(objectives),
    ]
    for variant in first.clean_test_rejection:
        cells = [f"{results.models[o].clean_test_rejection[variant]:.1%}" for o in objectives]
        out.append(f"| {variant} | " + " | ".join(cells) + " |")
    for attack in first.attacks:
        kept = ", ".join(f"{o.upper()} {results.models[o].kept[attack]}" for o in objectives)
        out += [
            "",
            f"## {attack}",
            "",
            f"Kept pairs: {kept}. AUC / rejected at the threshold.",
            "",
            "| Variant | " + " | ".join(o.upper() for o in objectives) + " |",
            "|---|" + "---:|" * len(objectives),
        ]
        for variant in first.attacks[attack]:
            cells = []
            for o in objectives:
                c = results.models[o].attacks[attack][variant]
                auc = "-" if c.roc_auc is None else f"{c.roc_auc:.3f}"
                rate = "-" if c.detection_rate is None else f"{c.detection_rate:.1%}"
                cells.append(f"{auc} / {rate}")
            out.append(f"| {variant} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Cost of input preprocessing",
        "",
        "The all-layer score on a batch of 64 test images, torch on the CPU, median of 10: "
        "plain vs preprocessed (a forward pass, a backward pass to the input, a second forward "
        "pass). In the exported graph it would need the backward pass as graph nodes too.",
        "",
        "| Obj. | Plain (s) | Preprocessed (s) | Ratio |",
        "|---|---:|---:|---:|",
    ]
    for o in objectives:
        cost = results.models[o].preprocessing_cost
        out.append(
            f"| {o.upper()} | {cost['plain_s']:.4f} | {cost['preprocessed_s']:.4f} | "
            f"{cost['ratio']:.2f} |"
        )
    return "\n".join(out) + "\n"
