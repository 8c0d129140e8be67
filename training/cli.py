"""Training-side subcommands of the `rcegate` CLI: train, calibrate, export, pipeline, evaluate,
report, stamp.

torch is imported inside the commands, so `rcegate serve` starts without it and a service-only
install reports a clear message instead of an ImportError.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from training.train import TrainConfig

RUNS = Path("runs")

Dataset = Annotated[str, typer.Option(help="mnist-5k | mnist | fashion-mnist | cifar10 | folder")]
DataDir = Annotated[Path | None, typer.Option(help="Directory of the dataset files.")]
Objective = Annotated[str, typer.Option(help="rce (reverse cross-entropy) or ce (baseline).")]
Checkpoint = Annotated[Path, typer.Option(help="Checkpoint file (.pt).")]
CalibrationFile = Annotated[Path, typer.Option(help="Calibration file written by `calibrate`.")]
ModelDir = Annotated[Path, typer.Option(help="Model repository directory.")]


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        typer.echo("This command needs the training extra: pip install 'rcegate[train]'", err=True)
        raise typer.Exit(2) from None


def _train_config(
    dataset: str,
    data_dir: Path | None,
    objective: str,
    depth: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_limit: int | None,
    dry_run: bool,
) -> TrainConfig:
    from training.train import TrainConfig

    if objective not in ("rce", "ce"):
        raise typer.BadParameter("must be rce or ce", param_hint="--objective")
    return TrainConfig(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        objective=objective,  # type: ignore[arg-type]
        depth=depth,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        train_limit=train_limit,
        dry_run=dry_run,
    )


def train(
    checkpoint: Checkpoint = RUNS / "model.pt",
    dataset: Dataset = "mnist-5k",
    data_dir: DataDir = None,
    objective: Objective = "rce",
    depth: Annotated[int, typer.Option(help="ResNet depth 6n+2 (20, 32, 56).")] = 32,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    train_limit: Annotated[int | None, typer.Option(help="Use only the first N.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option(help="A few batches only (smoke test).")] = False,
) -> None:
    """Train a ResNet with RCE or CE; run under `torchrun` for data-parallel training."""
    _require_torch()
    from training.data import DatasetError
    from training.train import train as run_training

    config = _train_config(
        dataset, data_dir, objective, depth, epochs, batch_size, lr, seed, train_limit, dry_run
    )
    try:
        payload = run_training(config, checkpoint, resume=resume)
    except DatasetError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if payload:
        typer.echo(json.dumps(payload["history"][-1]))


def calibrate(
    checkpoint: Checkpoint = RUNS / "model.pt",
    out: CalibrationFile = RUNS / "calibration.pt",
    target_fpr: Annotated[float, typer.Option(help="Fraction of clean data to reject.")] = 0.05,
    bank_per_class: int = 1000,
    sigma2: Annotated[float | None, typer.Option(help="Default 0.1/0.26 RCE, 1/0.26 CE.")] = None,
    metric: Annotated[
        str, typer.Option(help="Default metric: log_kd|non_me|confidence")
    ] = "log_kd",
) -> None:
    """Build the K-density bank and calibrate per-metric thresholds on held-out clean data."""
    _require_torch()
    from training.calibrate import calibrate as run_calibration
    from training.train import load_trained_model

    if metric not in ("log_kd", "non_me", "confidence"):
        raise typer.BadParameter("must be log_kd, non_me or confidence", param_hint="--metric")
    model, config, data = load_trained_model(checkpoint)
    result = run_calibration(
        model, config.objective, data, target_fpr, bank_per_class, sigma2, metric,  # type: ignore[arg-type]
        seed=config.seed,
    )  # fmt: skip
    result.save(out)
    typer.echo(json.dumps({"target_fpr": target_fpr, "thresholds": result.thresholds}))


def export(
    checkpoint: Checkpoint = RUNS / "model.pt",
    calibration: CalibrationFile = RUNS / "calibration.pt",
    name: Annotated[str, typer.Option(help="Model name in the repository.")] = "model",
    version: int = 1,
    model_dir: ModelDir = Path("models"),
    overwrite: bool = False,
) -> None:
    """Export model.onnx + manifest.json into MODEL_DIR/NAME/VERSION (validated, atomic)."""
    _require_torch()
    from training.calibrate import Calibration
    from training.export import export_artifact
    from training.train import load_trained_model

    model, config, data = load_trained_model(checkpoint)
    target = export_artifact(
        model, config, data, Calibration.load(calibration), model_dir, name, version, overwrite
    )
    typer.echo(_summary(target))


def pipeline(
    name: Annotated[str, typer.Option(help="Model name in the repository.")],
    version: int = 1,
    dataset: Dataset = "mnist-5k",
    data_dir: DataDir = None,
    objective: Objective = "rce",
    depth: int = 32,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    train_limit: int | None = None,
    target_fpr: float = 0.05,
    bank_per_class: int = 1000,
    model_dir: ModelDir = Path("models"),
    work_dir: Annotated[Path, typer.Option(help="Where checkpoints go.")] = RUNS,
    overwrite: bool = False,
    dry_run: bool = False,
) -> None:
    """train -> calibrate -> export in one command."""
    _require_torch()
    from training.calibrate import calibrate as run_calibration
    from training.export import export_artifact
    from training.train import load_trained_model
    from training.train import train as run_training

    config = _train_config(
        dataset, data_dir, objective, depth, epochs, batch_size, lr, seed, train_limit, dry_run
    )
    checkpoint = work_dir / f"{name}-v{version}.pt"
    run_training(config, checkpoint)
    model, config, data = load_trained_model(checkpoint)
    result = run_calibration(
        model, config.objective, data, target_fpr, bank_per_class, seed=config.seed
    )
    result.save(checkpoint.with_suffix(".calibration.pt"))
    target = export_artifact(model, config, data, result, model_dir, name, version, overwrite)
    typer.echo(_summary(target))


def _summary(target: Path) -> str:
    from models.manifest import Manifest

    manifest = Manifest.load(target)
    return json.dumps(
        {
            "artifact": str(target),
            "clean_test_accuracy": manifest.clean_test_accuracy,
            "thresholds": manifest.detection.thresholds,
            "clean_acceptance": manifest.detection.clean_acceptance,
            "sha256": manifest.sha256,
        }
    )


def evaluate(
    artifact: Annotated[
        list[Path], typer.Option(help="Exported model directory (repeat: one CE, one RCE).")
    ],
    checkpoint: Annotated[
        list[Path], typer.Option(help="The checkpoint behind each --artifact, in the same order.")
    ],
    calibration: Annotated[
        list[Path] | None,
        typer.Option(help="Calibration files in --artifact order (default: next to checkpoint)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory (reports/<dataset>).")] = Path(
        "reports"
    ),
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks.")] = (
        "fgsm,bim,illcm,jsma,cw-l2,cw-hc,pgd,pgd-adaptive,cw-wb"
    ),
    images: Annotated[int, typer.Option(help="Test images per fast attack.")] = 500,
    slow_images: Annotated[
        int, typer.Option(help="Test images per JSMA / C&W / PGD attack.")
    ] = 100,
    eps: Annotated[float, typer.Option(help="FGSM/BIM/ILLCM L-inf budget ([0,1] scale).")] = 0.1,
    cw_binary_steps: Annotated[int, typer.Option(help="C&W binary-search steps.")] = 5,
    cw_max_iter: Annotated[int, typer.Option(help="C&W iterations per step.")] = 100,
    pgd_eps: float = 0.1,
    pgd_steps: int = 40,
    seed: int = 0,
    cost_repeats: Annotated[
        int, typer.Option(help="RCE-vs-CE training epochs timed per objective (0 = skip).")
    ] = 3,
    cost_images: Annotated[int, typer.Option(help="Training images per timed epoch.")] = 1024,
) -> None:
    """Attack exported models with ART + adaptive attacks; write results.json, report.md, PNGs."""
    _require_torch()
    from training.attacks import AttackSettings
    from training.evaluate import EvaluationError, load_model_under_test
    from training.evaluate import evaluate as run_evaluation
    from training.plots import write_figures
    from training.report import write_report, write_results
    from training.train import seed_everything

    if len(artifact) != len(checkpoint) or (calibration and len(calibration) != len(artifact)):
        raise typer.BadParameter("give one --checkpoint (and --calibration) per --artifact")
    seed_everything(seed)
    settings = AttackSettings(
        eps=eps, cw_binary_steps=cw_binary_steps, cw_max_iter=cw_max_iter, pgd_eps=pgd_eps,
        pgd_steps=pgd_steps, pgd_step=pgd_eps / 10,
    )  # fmt: skip
    try:
        models = [
            load_model_under_test(a, c, calibration[i] if calibration else None)
            for i, (a, c) in enumerate(zip(artifact, checkpoint, strict=True))
        ]
        evaluation = run_evaluation(
            models, tuple(a.strip() for a in attacks.split(",") if a.strip()), images,
            slow_images, settings, seed,
        )  # fmt: skip
    except EvaluationError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    results = evaluation.results
    if cost_repeats > 0:
        from training.cost import training_cost

        under_test = next((m for m in models if m.manifest.objective == "rce"), models[-1])
        cost = training_cost(
            under_test.dataset, under_test.manifest.architecture.depth, cost_images, cost_repeats
        )
        results = results.model_copy(update={"training_cost": cost})
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_results(results, out), write_report(results, out)]
    paths += write_figures(evaluation.results, evaluation.scores, out)
    typer.echo(json.dumps({"written": [str(p) for p in paths]}))


def report(
    results: Annotated[Path, typer.Argument(help="A results.json written by `evaluate`.")],
    cost_repeats: Annotated[
        int, typer.Option(help="Also time RCE-vs-CE training epochs and record them (0 = no).")
    ] = 0,
    cost_images: Annotated[int, typer.Option(help="Training images per timed epoch.")] = 1024,
    cost_depth: Annotated[int | None, typer.Option(help="Default: the RCE model's depth.")] = None,
) -> None:
    """Re-render report.md from results.json (optionally adding the training-cost figures)."""
    _require_torch()
    from training.report import read_results, write_report, write_results

    evaluation = read_results(results)
    if cost_repeats > 0:
        from training.cost import training_cost
        from training.data import load_dataset

        timed = evaluation.models.get("rce") or next(iter(evaluation.models.values()))
        depth = cost_depth or int(timed.architecture.removeprefix("preact-resnet"))
        cost = training_cost(load_dataset(evaluation.dataset), depth, cost_images, cost_repeats)
        evaluation = evaluation.model_copy(update={"training_cost": cost})
        write_results(evaluation, results.parent)
    typer.echo(str(write_report(evaluation, results.parent)))


def stamp(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories <name>/<version>.")],
    force: Annotated[
        bool, typer.Option(help="Rebind a graph already bound to other values.")
    ] = False,
) -> None:
    """Bind each manifest's decision constants to its graph (ONNX metadata) without retraining;
    prints the new sha256 of each model.onnx. Re-sign signed artifacts afterwards."""
    try:
        from training.stamp import StampError, restamp
    except ModuleNotFoundError:
        typer.echo("This command needs the onnx package: pip install 'rcegate[train]'", err=True)
        raise typer.Exit(2) from None
    for directory in artifacts:
        try:
            digest = restamp(directory, force=force)
        except (StampError, OSError, ValueError) as exc:
            typer.echo(f"{directory}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{directory}: {digest}")


def register(app: typer.Typer) -> None:
    for command in (train, calibrate, export, pipeline, evaluate, report, stamp):
        app.command()(command)
    logging.getLogger("training").setLevel(logging.INFO)
