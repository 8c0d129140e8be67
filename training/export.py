"""Export the deployed detector to a self-describing artifact: `model.onnx` + `manifest.json`.

Detection lives in the graph (the K-density bank is a constant), so every ONNX host gets the
same answer. Before anything is written the graph passes the ONNX checker and ONNX Runtime is
compared against torch on real test images (as timm's export does). The manifest's decision
constants are then stamped into the graph's metadata (`training/stamp.py`), so editing the
manifest alone cannot move a decision. The artifact is assembled in a temporary directory next to
its destination and renamed into place: never half an artifact.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from models.files import staged_directory
from models.layout import version_directory
from models.manifest import (
    INPUT_NAME,
    MODEL_FILE,
    ArchitectureInfo,
    DatasetInfo,
    DetectionInfo,
    InputSpec,
    Manifest,
    Metric,
    SplitInfo,
    sha256_file,
)
from training.calibrate import Calibration, calibrate
from training.config import TrainConfig
from training.data import Dataset, to_tensor
from training.deployed import DeployedModel, detector_outputs
from training.mahalanobis import Source
from training.nets import WIDTHS, ResNet, count_parameters
from training.parity import CHECK_IMAGES, ParityError, check_parity
from training.provenance import library_versions, source_commit
from training.stamp import stamp_graph

logger = logging.getLogger(__name__)
OPSET = 17
# A model must beat chance (the share of the test split's most frequent class, what a constant
# answer scores) by this fraction of the way to 100%: 32.5% for 10 balanced classes.
MIN_GAIN_OVER_CHANCE = 0.25


class ExportError(Exception):
    """The exported graph failed validation; nothing was written."""


class NearChanceError(ExportError):
    """The model's clean accuracy on its own test split is near chance; nothing was written."""


def minimum_accuracy(labels: np.ndarray) -> tuple[float, float]:
    """(chance, the least clean accuracy export accepts) for a test split's labels."""
    chance = float(np.bincount(labels).max() / max(len(labels), 1))
    return chance, chance + MIN_GAIN_OVER_CHANCE * (1.0 - chance)


def export_onnx(model: DeployedModel, shape: tuple[int, int, int], path: Path) -> None:
    dummy = torch.zeros((2, *shape), dtype=torch.float32)
    outputs = list(model.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            opset_version=OPSET,
            dynamo=False,
        )


def check_against_torch(path: Path, model: DeployedModel, images: np.ndarray) -> dict[str, float]:
    """The ONNX checker, then ONNX Runtime against torch on real uint8 images, every output of
    the graph (`training.parity`); raise ExportError on any disagreement. Returns the max abs
    error of each float output."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    try:
        return check_parity(path, model, to_tensor(images).numpy())
    except ParityError as error:
        raise ExportError(str(error)) from error


def export_artifact(
    network: ResNet,
    config: TrainConfig,
    dataset: Dataset,
    calibration: Calibration,
    model_dir: Path,
    name: str,
    version: int,
    overwrite: bool = False,
    force: bool = False,
) -> Path:
    """Write `model_dir/name/version/` atomically and return its path.

    Refuses (NearChanceError) a model whose clean test accuracy is below `minimum_accuracy`
    unless `force`: a barely trained network must not ship silently as a detector."""
    target = version_directory(model_dir, name, version)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite to replace it")
    deployed = calibration.deployed(network).eval()
    test_scores = detector_outputs(deployed, dataset.test.images, progress="export: test accuracy")
    accuracy = float((test_scores["label"] == dataset.test.labels).mean())
    chance, least = minimum_accuracy(dataset.test.labels)
    if accuracy < least:
        message = (
            f"clean test accuracy {accuracy:.1%} is near chance ({chance:.1%}, the most frequent "
            f"class); export needs at least {least:.1%} (pass --force to export anyway)"
        )
        if not force:
            raise NearChanceError(message)
        logger.warning("exporting anyway: %s", message)
    clean_acceptance = {
        m: float((test_scores[m] >= calibration.thresholds[m]).mean()) for m in deployed.metrics
    }
    steps = tqdm(total=3, desc="export: ONNX graph", unit="step")
    try:
        with staged_directory(target) as staging:
            onnx_path = staging / MODEL_FILE
            export_onnx(deployed, dataset.shape, onnx_path)
            steps.update()
            steps.set_description("export: ONNX Runtime vs torch")
            errors = check_against_torch(onnx_path, deployed, dataset.test.images[:CHECK_IMAGES])
            steps.update()
            steps.set_description("export: manifest")
            logger.info("ONNX Runtime matches torch (max abs error %s)", errors)
            channels, height, width = dataset.shape
            manifest = Manifest(
                name=name,
                version=version,
                created_at=datetime.now(UTC).replace(microsecond=0),
                source_commit=source_commit(),
                dataset=DatasetInfo(
                    name=dataset.name,
                    class_names=dataset.class_names,
                    split=SplitInfo(
                        train=len(dataset.train),
                        calibration=len(dataset.calibration),
                        test=len(dataset.test),
                        seed=dataset.seed,
                    ),
                ),
                input=InputSpec(channels=channels, height=height, width=width),
                outputs=list(deployed.output_names),
                objective=config.objective,
                architecture=ArchitectureInfo(
                    name=f"preact-resnet{network.depth}",
                    depth=network.depth,
                    widths=list(WIDTHS),
                    feature_dim=network.feature_dim,
                    parameters=count_parameters(network),
                ),
                clean_test_accuracy=accuracy,
                detection=DetectionInfo(
                    default_metric=calibration.default_metric,
                    sigma2=calibration.sigma2,
                    bank_size_per_class=[int(n) for n in calibration.bank_mask.sum(axis=1)],
                    target_fpr=calibration.target_fpr,
                    thresholds=calibration.thresholds,
                    calibration_size=calibration.calibration_size,
                    calibration_table=calibration.table,
                    clean_acceptance=clean_acceptance,
                    mahalanobis=(
                        calibration.mahalanobis.to_info() if calibration.mahalanobis else None
                    ),
                    combined=calibration.combined.to_info() if calibration.combined else None,
                ),
                sha256="0" * 64,  # set once the graph carries the binding
                opset=OPSET,
                library_versions=library_versions(),
                training={k: v for k, v in vars(config).items() if k != "data_dir"},
            )
            graph = onnx.load(str(onnx_path))
            stamp_graph(graph, manifest.binding())
            onnx.save(graph, str(onnx_path))
            manifest = manifest.model_copy(update={"sha256": sha256_file(onnx_path)})
            manifest.dump(staging)
        steps.update()
    finally:
        steps.close()
    return target


def reexport_artifact(
    artifact: Path,
    model_dir: Path,
    default_metric: Metric,
    mahalanobis_layers: Sequence[str],
    mahalanobis_source: Source,
    combine: Sequence[Metric],
    version: int | None = None,
) -> tuple[Path, dict[Metric, float]]:
    """Re-export `artifact` with the current detectors, from the artifact alone: the network
    rebuilt from its model.onnx (exact, `training.recover`), the training config and split from
    its manifest, then calibrate -> export as the pipeline does, into `model_dir/name/version`
    (default: the same version, replaced). Refuses a rebuild whose K-density bank or clean test
    accuracy differs from the manifest's; returns the new directory and, per metric the old
    manifest already had, the largest change of its calibrated thresholds (table included)."""
    from training.recover import load_artifact_network

    old = Manifest.load(artifact)
    network, _, dataset = load_artifact_network(artifact)
    config = TrainConfig.from_dict(old.training)
    d = old.detection
    calibration = calibrate(
        network, old.objective, dataset, d.target_fpr, max(d.bank_size_per_class), d.sigma2,
        default_metric, config.seed, mahalanobis_layers, mahalanobis_source, combine,
    )  # fmt: skip
    sizes = [int(n) for n in calibration.bank_mask.sum(axis=1)]
    if sizes != d.bank_size_per_class:
        raise ExportError(
            f"rebuilt bank has {sizes} per class, the manifest {d.bank_size_per_class}"
        )
    target = export_artifact(
        network, config, dataset, calibration, model_dir, old.name,
        old.version if version is None else version, overwrite=True,
    )  # fmt: skip
    new = Manifest.load(target)
    if new.clean_test_accuracy != old.clean_test_accuracy:
        raise ExportError(
            f"{target}: clean test accuracy {new.clean_test_accuracy} differs from the original "
            f"{old.clean_test_accuracy}: the rebuilt network is not the same"
        )
    changes = {
        m: float(max(
            abs(a - b) for a, b in zip(
                [d.thresholds[m], *d.calibration_table.thresholds[m]],
                [new.detection.thresholds[m], *new.detection.calibration_table.thresholds[m]],
                strict=True,
            )
        ))
        for m in old.metrics
    }  # fmt: skip
    return target, changes
