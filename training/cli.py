"""Training-side subcommands of the `rcegate` CLI: train, calibrate, export, pipeline, evaluate,
report, stamp, samples.

torch is imported inside the commands, so `rcegate serve` starts without it and a service-only
install reports a clear message instead of an ImportError.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer

from models.manifest import METRICS, Objective
from training.config import RECIPES, TrainConfig
from training.defaults import BANK_PER_CLASS, DEFAULT_METRIC, TARGET_FPR

if TYPE_CHECKING:
    from training.calibrate import Calibration
    from training.data import Dataset
    from training.nets import ResNet

RUNS = Path("runs")
# The training options' defaults are the config's own.
DEFAULTS = TrainConfig()
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)

DatasetOption = Annotated[
    str, typer.Option(help="mnist-5k | mnist | fashion-mnist | cifar10 | folder")
]
DataDir = Annotated[Path | None, typer.Option(help="Directory of the dataset files.")]
ObjectiveOption = Annotated[str, typer.Option(help="rce (reverse cross-entropy) or ce (baseline).")]
Checkpoint = Annotated[Path, typer.Option(help="Checkpoint file (.pt).")]
CalibrationFile = Annotated[Path, typer.Option(help="Calibration file written by `calibrate`.")]
ModelDir = Annotated[Path, typer.Option(help="Model repository directory.")]
AttackLossOption = Annotated[
    str,
    typer.Option(
        help="Loss of FGSM / BIM / ILLCM / PGD: both (cross-entropy, then the logit margin where "
        "it failed; not masked), ce (masked on saturated models), margin."
    ),
]
RecipeOption = Annotated[
    str,
    typer.Option(
        help="official: the official code's recipe scaled to --steps (lr x0.1 at 50% and 75% of "
        "the steps, weight decay on conv/FC weights only, FC uniform unit scaling, BN eps 1e-3); "
        "legacy: --epochs with decays at 50%/75% of the epochs, decay on every parameter, "
        "PyTorch's FC init, BN eps 1e-5 (the committed v1 models)."
    ),
]
StepsOption = Annotated[
    int, typer.Option(help="SGD steps of the official recipe (official MNIST run: 20000).")
]
EpochsOption = Annotated[int, typer.Option(help="Epochs of the legacy recipe.")]
DepthOption = Annotated[int, typer.Option(help="ResNet depth 6n+2 (20, 32, 56).")]
BatchSize = Annotated[int, typer.Option(help="Images per SGD step.")]
LearningRate = Annotated[float, typer.Option(help="Initial learning rate (SGD, momentum 0.9).")]
Seed = Annotated[int, typer.Option(help="Seed of the data split, the init and the batches.")]
TrainLimit = Annotated[
    int | None, typer.Option(help="Train on the first N training images only (default: all).")
]
DryRun = Annotated[bool, typer.Option(help="A few batches only (smoke test).")]
TargetFpr = Annotated[
    float, typer.Option(help="Fraction of clean calibration data the threshold rejects.")
]
BankPerClass = Annotated[
    int, typer.Option(help="K-density bank size per class (a seeded sample of training features).")
]
VersionOption = Annotated[int, typer.Option(help="Model version in the repository.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing NAME/VERSION directory.")]
Force = Annotated[
    bool,
    typer.Option(
        help="Export even when clean test accuracy is near chance (below chance + 25% of the "
        "way to 100%; 32.5% for 10 balanced classes)."
    ),
]


NEEDS_TRAIN = "needs the training extra: pip install 'rcegate[train]' (in a checkout: '.[train]')"


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        typer.echo(f"error: this command {NEEDS_TRAIN}", err=True)
        raise typer.Exit(1) from None


def training_options(
    dataset: DatasetOption = DEFAULTS.dataset,
    data_dir: DataDir = None,
    objective: ObjectiveOption = DEFAULTS.objective,
    depth: DepthOption = DEFAULTS.depth,
    recipe: RecipeOption = DEFAULTS.recipe,
    steps: StepsOption = DEFAULTS.steps,
    epochs: EpochsOption = DEFAULTS.epochs,
    batch_size: BatchSize = DEFAULTS.batch_size,
    lr: LearningRate = DEFAULTS.lr,
    seed: Seed = DEFAULTS.seed,
    train_limit: TrainLimit = None,
    dry_run: DryRun = False,
) -> TrainConfig:
    """The training options of `train` and `pipeline` (declared once, here), checked one by one
    (a bad value is a one-line error naming the option) and turned into a TrainConfig."""
    if objective not in OBJECTIVES:
        raise typer.BadParameter("must be rce or ce", param_hint="--objective")
    if recipe not in RECIPES:
        raise typer.BadParameter(f"must be one of {', '.join(RECIPES)}", param_hint="--recipe")
    if steps < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--steps")
    if (depth - 2) % 6 != 0 or depth < 8:
        raise typer.BadParameter(
            f"must be 6n+2 (20, 32, 56, ...), got {depth}", param_hint="--depth"
        )
    return TrainConfig(
        recipe=recipe,
        steps=steps,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        objective=objective,
        depth=depth,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        train_limit=train_limit,
        dry_run=dry_run,
    )


def with_training_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with the options of `training_options` added to what Typer sees; the command
    itself takes the TrainConfig they describe as `config`."""
    # Evaluated annotations: Typer reads the options' help from them (this module postpones them).
    shared = inspect.signature(training_options, eval_str=True).parameters
    own = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.name != "config"
    ]

    @functools.wraps(command)
    def run(**values: Any) -> None:
        config = training_options(**{name: values.pop(name) for name in shared})
        command(config=config, **values)

    # A parameter without a default may not follow one with a default: required ones first.
    required = [p for p in own if p.default is inspect.Parameter.empty]
    optional = [p for p in own if p.default is not inspect.Parameter.empty]
    run.__signature__ = inspect.Signature([*required, *shared.values(), *optional])  # type: ignore[attr-defined]
    hints = {**training_options.__annotations__, **command.__annotations__}
    run.__annotations__ = {k: v for k, v in hints.items() if k not in ("config", "return")}
    return run


@with_training_options
def train(
    config: TrainConfig,
    checkpoint: Checkpoint = RUNS / "model.pt",
    resume: Annotated[bool, typer.Option(help="Continue from --checkpoint.")] = False,
) -> None:
    """Train a ResNet with RCE or CE; run under `torchrun` for data-parallel training."""
    _require_torch()
    from training.data import DatasetError
    from training.train import train as run_training

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
    target_fpr: TargetFpr = TARGET_FPR,
    bank_per_class: BankPerClass = BANK_PER_CLASS,
    sigma2: Annotated[float | None, typer.Option(help="Default 0.1/0.26 RCE, 1/0.26 CE.")] = None,
    metric: Annotated[
        str, typer.Option(help=f"Metric of the accept decision: {' | '.join(METRICS)}.")
    ] = DEFAULT_METRIC,
) -> None:
    """Build the K-density bank and calibrate per-metric thresholds on held-out clean data."""
    _require_torch()
    from training.calibrate import calibrate as run_calibration
    from training.checkpoints import load_trained_model

    if metric not in METRICS:
        raise typer.BadParameter(f"must be one of {', '.join(METRICS)}", param_hint="--metric")
    model, config, data = load_trained_model(checkpoint)
    result = run_calibration(
        model, config.objective, data, target_fpr, bank_per_class, sigma2, metric,
        seed=config.seed,
    )  # fmt: skip
    result.save(out)
    typer.echo(json.dumps({"target_fpr": target_fpr, "thresholds": result.thresholds}))


def export(
    checkpoint: Checkpoint = RUNS / "model.pt",
    calibration: CalibrationFile = RUNS / "calibration.pt",
    name: Annotated[str, typer.Option(help="Model name in the repository.")] = "model",
    version: VersionOption = 1,
    model_dir: ModelDir = Path("models"),
    overwrite: Overwrite = False,
    force: Force = False,
) -> None:
    """Export model.onnx + manifest.json into MODEL_DIR/NAME/VERSION (validated, atomic).

    Refuses (exit 2) a model whose clean accuracy on its own test split is near chance."""
    _require_torch()
    from training.calibrate import Calibration
    from training.checkpoints import load_trained_model

    model, config, data = load_trained_model(checkpoint)
    calibration_result = Calibration.load(calibration)
    target = _export(
        model, config, data, calibration_result, model_dir, name, version, overwrite, force
    )
    typer.echo(_summary(target))


def _export(
    model: ResNet,
    config: TrainConfig,
    data: Dataset,
    calibration: Calibration,
    model_dir: Path,
    name: str,
    version: int,
    overwrite: bool,
    force: bool,
) -> Path:
    """`export_artifact`, turning a near-chance refusal into exit code 2 with its message."""
    from training.export import NearChanceError, export_artifact

    try:
        return export_artifact(
            model, config, data, calibration, model_dir, name, version, overwrite, force
        )
    except NearChanceError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@with_training_options
def pipeline(
    config: TrainConfig,
    name: Annotated[str, typer.Option(help="Model name in the repository.")],
    version: VersionOption = 1,
    target_fpr: TargetFpr = TARGET_FPR,
    bank_per_class: BankPerClass = BANK_PER_CLASS,
    model_dir: ModelDir = Path("models"),
    work_dir: Annotated[Path, typer.Option(help="Where checkpoints go.")] = RUNS,
    overwrite: Overwrite = False,
    force: Force = False,
) -> None:
    """train -> calibrate -> export in one command."""
    _require_torch()
    from training.calibrate import calibrate as run_calibration
    from training.checkpoints import load_trained_model
    from training.train import train as run_training

    checkpoint = work_dir / f"{name}-v{version}.pt"
    run_training(config, checkpoint)
    model, config, data = load_trained_model(checkpoint)
    result = run_calibration(
        model, config.objective, data, target_fpr, bank_per_class, seed=config.seed
    )
    result.save(checkpoint.with_suffix(".calibration.pt"))
    target = _export(model, config, data, result, model_dir, name, version, overwrite, force)
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
    pgd_eps: Annotated[float, typer.Option(help="PGD L-inf budget ([0,1] scale).")] = 0.1,
    pgd_steps: Annotated[int, typer.Option(help="PGD steps (each pgd_eps / 10).")] = 40,
    attack_loss: AttackLossOption = "both",
    seed: Seed = 0,
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
    from training.report import render_report, write_report
    from training.runtime import seed_everything

    if len(artifact) != len(checkpoint) or (calibration and len(calibration) != len(artifact)):
        raise typer.BadParameter("give one --checkpoint (and --calibration) per --artifact")
    _check_attack_loss(attack_loss)
    seed_everything(seed)
    settings = AttackSettings(
        eps=eps, cw_binary_steps=cw_binary_steps, cw_max_iter=cw_max_iter, pgd_eps=pgd_eps,
        pgd_steps=pgd_steps, pgd_step=pgd_eps / 10,
        attack_loss=attack_loss,  # type: ignore[arg-type]
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
    paths = [results.write(out), write_report(render_report(results), out)]
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
    from training.report import render_report, write_report
    from training.results import EvaluationResults

    evaluation = EvaluationResults.read(results)
    if cost_repeats > 0:
        from training.cost import training_cost
        from training.data import load_dataset

        timed = evaluation.models.get("rce") or next(iter(evaluation.models.values()))
        depth = cost_depth or int(timed.architecture.removeprefix("preact-resnet"))
        cost = training_cost(load_dataset(evaluation.dataset), depth, cost_images, cost_repeats)
        evaluation = evaluation.model_copy(update={"training_cost": cost})
        evaluation.write(results.parent)
    typer.echo(str(write_report(render_report(evaluation), results.parent)))


def masking_check(
    checkpoint: Annotated[
        list[Path] | None, typer.Option(help="Checkpoint of a model (repeat; one per objective).")
    ] = None,
    artifact: Annotated[
        list[Path] | None,
        typer.Option(help="Exported model directory whose network is rebuilt from model.onnx."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/mnist-5k/masking"),
    images: Annotated[int, typer.Option(help="Test images attacked per eps.")] = 500,
    eps: Annotated[str, typer.Option(help="Comma-separated L-inf budgets ([0,1] scale).")] = (
        "0,0.02,0.05,0.1,0.15,0.2,0.25,0.3"
    ),
    bim_steps: Annotated[int, typer.Option(help="BIM steps (each eps / steps).")] = 10,
    attack_loss: AttackLossOption = "both",
    seed: Seed = 0,
) -> None:
    """Gradient-masking checks: FGSM / BIM success vs eps, thresholding disabled, CE vs RCE.

    Runs the evaluation's own FGSM and BIM next to independent CE-loss and margin-loss versions,
    applies the checks of Carlini et al. 2019 and writes results.json, report.md and
    robustness.png. Exit code 1 when a check fails."""
    _require_torch()
    import torch

    from training.attacks import AttackSettings
    from training.checkpoints import load_trained_model
    from training.deployed import DeployedModel
    from training.provenance import source_commit
    from training.recover import load_artifact_network
    from training.report import write_report
    from training.robustness import (
        PLOT_FILE,
        MaskingResults,
        all_passed,
        created_now,
        plot_robustness,
        render_report,
        robustness,
    )
    from training.runtime import seed_everything

    _check_attack_loss(attack_loss)
    sources = [*(checkpoint or []), *(artifact or [])]
    if not sources:
        raise typer.BadParameter("give at least one --checkpoint or --artifact")
    grid = tuple(sorted({float(e) for e in eps.split(",") if e.strip()}))
    settings = AttackSettings(bim_steps=bim_steps, attack_loss=attack_loss)  # type: ignore[arg-type]
    models = {}
    names = set()
    for path in sources:
        seed_everything(seed)
        if path in (checkpoint or []):
            network, config, dataset = load_trained_model(path)
            objective = config.objective
        else:
            network, manifest, dataset = load_artifact_network(path)
            objective = manifest.objective
        network.requires_grad_(False)
        names.add(dataset.name)
        # Thresholding is disabled: the detector only carries the network and its objective.
        detector = DeployedModel.classifier_only(
            network, objective, dataset.num_classes, network.feature_dim
        )
        if objective in models:
            raise typer.BadParameter(f"two {objective} models; give one per objective")
        models[objective] = robustness(detector, dataset, str(path), images, grid, settings, seed)
    if len(names) != 1:
        raise typer.BadParameter(f"models come from different datasets: {sorted(names)}")
    results = MaskingResults(
        dataset=names.pop(),
        created_at=created_now(),
        source_commit=source_commit(),
        seed=seed,
        eps=list(grid),
        bim_steps=bim_steps,
        torch_threads=torch.get_num_threads(),
        pipeline=_pipeline_description(attack_loss),
        models=models,
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = [results.write(out), write_report(render_report(results), out)]
    paths.append(plot_robustness(results, out / PLOT_FILE))
    typer.echo(json.dumps({"written": [str(p) for p in paths], "passed": all_passed(results)}))
    if not all_passed(results):
        raise typer.Exit(1)


def ablation(
    dataset: DatasetOption = DEFAULTS.dataset,
    data_dir: DataDir = None,
    variants: Annotated[
        str,
        typer.Option(
            help="Comma-separated variants: official, bn-eps, fc-init, decay-scope, long, "
            "train-4000, bank-100, bank-all (each changes one thing of the official recipe)."
        ),
    ] = "official,bn-eps,fc-init,decay-scope,long",
    depth: Annotated[int, typer.Option(help="ResNet depth 6n+2 of every variant.")] = 20,
    steps: Annotated[int, typer.Option(help="SGD steps of every variant (long: 5x).")] = 300,
    work_dir: Annotated[
        Path, typer.Option(help="Checkpoints; reused when their saved config matches.")
    ] = RUNS / "ablation",
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path(
        "reports/mnist-5k/ablation"
    ),
    images: Annotated[int, typer.Option(help="Test images per attack and per eps.")] = 200,
    eps: Annotated[str, typer.Option(help="Comma-separated L-inf budgets ([0,1] scale).")] = (
        "0,0.05,0.1,0.2,0.3"
    ),
    target_fpr: Annotated[float, typer.Option(help="Target FPR of the thresholds.")] = TARGET_FPR,
    jobs: Annotated[int, typer.Option(help="Checkpoints trained in parallel.")] = 2,
    threads: Annotated[int, typer.Option(help="Torch threads per training process.")] = 1,
    attack_loss: AttackLossOption = "both",
    seed: Annotated[int, typer.Option(help="Seed of training, sampling and attacks.")] = 0,
) -> None:
    """Ablation of the official recipe, CE and RCE alike: clean accuracy and margins, accuracy
    vs eps with thresholding disabled, oblivious ROC-AUC; writes results.json, report.md and
    robustness.png under --out."""
    _require_torch()
    from training.ablation import (
        PLOT_FILE,
        VARIANTS,
        Plan,
        plot_ablation,
        render_report,
        run_ablation,
    )
    from training.attacks import AttackSettings
    from training.provenance import source_commit
    from training.report import write_report
    from training.robustness import created_now

    _check_attack_loss(attack_loss)
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown {unknown}; expected some of {', '.join(VARIANTS)}", param_hint="--variants"
        )
    grid = tuple(sorted({float(e) for e in eps.split(",") if e.strip()}))
    plan = Plan(dataset, depth, steps, work_dir, str(data_dir) if data_dir else None, seed)
    results = run_ablation(
        plan, [VARIANTS[v] for v in chosen], images, grid,
        AttackSettings(attack_loss=attack_loss),  # type: ignore[arg-type]
        target_fpr, jobs, threads, created_now(), source_commit(),
    )  # fmt: skip
    paths = [results.write(out), write_report(render_report(results), out)]
    paths.append(plot_ablation(results, out / PLOT_FILE))
    typer.echo(json.dumps({"written": [str(p) for p in paths]}))


def _check_attack_loss(value: str) -> None:
    from training.attacks import ATTACK_LOSSES

    if value not in ATTACK_LOSSES:
        raise typer.BadParameter(
            f"must be one of {', '.join(ATTACK_LOSSES)}", param_hint="--attack-loss"
        )


def _pipeline_description(attack_loss: str) -> str:
    return (
        "`training.attacks.run_attack` (ART FastGradientMethod / BasicIterativeMethod over "
        f"`PyTorchClassifier`) with attack_loss={attack_loss}"
    )


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
        typer.echo(f"error: this command {NEEDS_TRAIN}", err=True)
        raise typer.Exit(1) from None
    for directory in artifacts:
        try:
            digest = restamp(directory, force=force)
        except (StampError, OSError, ValueError) as exc:
            typer.echo(f"{directory}: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{directory}: {digest}")


def samples(
    model: Annotated[
        Path, typer.Option(help="Exported model directory <name>/<version> (the default model).")
    ] = Path("models/mnist-rce/2"),
    out: Annotated[Path, typer.Option(help="Directory to (re)write.")] = Path("samples"),
    clean: Annotated[int, typer.Option(help="Clean digits, one per class, all accepted.")] = 3,
    eps: Annotated[float, typer.Option(help="BIM L-inf budget ([0,1] scale).")] = 0.1,
    seed: Seed = 0,
) -> None:
    """Sample images from the model's own test split: clean digits it accepts and a BIM digit it
    misclassifies and rejects (each checked with ONNX Runtime on the PNG as written)."""
    _require_torch()
    from training.samples import SampleError, make_samples

    try:
        made = make_samples(model, out, clean, eps, seed)
    except SampleError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for sample in made:
        verdict = "accepted" if sample.accepted else "rejected"
        typer.echo(
            f"{out / sample.file}: true {sample.true_label}, label {sample.label}, {verdict} "
            f"({sample.metric} {sample.score:.4g} vs threshold {sample.threshold:.4g})"
        )


def register(app: typer.Typer) -> None:
    # Without torch (a service-only install) these commands cannot run: --help leaves them out
    # and says which extra brings them; invoked anyway, each says so in one line.
    try:
        hidden = importlib.util.find_spec("torch") is None
    except (ImportError, ValueError):
        hidden = True
    app.command("masking-check", hidden=hidden)(masking_check)
    commands = (train, calibrate, export, pipeline, evaluate, report, stamp, samples, ablation)
    for command in commands:
        app.command(hidden=hidden)(command)
    if hidden:
        names = ", ".join(sorted(["masking-check", *(c.__name__ for c in commands)]))
        app.info.epilog = f"Not available in this install: {names}; each {NEEDS_TRAIN}."
    logging.getLogger("training").setLevel(logging.INFO)
