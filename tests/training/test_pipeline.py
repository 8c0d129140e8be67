"""End to end on a slice of mnist-5k: train, calibrate, export, then run the artifact in ORT."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from models.manifest import INPUT_NAME, METRICS, OUTPUT_NAMES, Manifest, sha256_file
from rcegate.cli import app
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact, last_json
from training.calibrate import Calibration
from training.checkpoints import load_checkpoint, load_trained_model
from training.config import TrainConfig
from training.data import Split, load_dataset, load_mnist_5k, to_tensor
from training.deployed import DeployedModel
from training.export import (
    ExportError,
    NearChanceError,
    check_against_torch,
    export_artifact,
    export_onnx,
    minimum_accuracy,
)
from training.losses import loss_for
from training.nets import ResNet, build_model
from training.parity import ATOL as EXPORT_ATOL
from training.parity import CHECK_IMAGES
from training.runtime import seed_everything
from training.train import DRY_RUN_BATCHES, lr_at_step, parameter_groups, train


def run_artifact(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {INPUT_NAME: to_tensor(images).numpy()})
    return dict(zip(OUTPUT_NAMES, outputs, strict=True))


def test_exported_artifact_matches_torch_and_its_manifest(tiny_artifact: TinyArtifact) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    assert manifest.sha256 == sha256_file(tiny_artifact.path / "model.onnx")
    graph = onnx.load(str(tiny_artifact.path / "model.onnx"))
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert manifest.opset >= 17
    assert manifest.objective == "rce"
    assert manifest.dataset.split.model_dump() == {
        "train": 4000, "calibration": 500, "test": 500, "seed": 0
    }  # fmt: skip

    images = load_mnist_5k().test.images[:37]
    got = run_artifact(tiny_artifact.path, images)
    model, config, _ = load_trained_model(tiny_artifact.checkpoint)
    deployed = Calibration.load(tiny_artifact.calibration).deployed(model)
    with torch.no_grad():
        expected = dict(
            zip(OUTPUT_NAMES, (t.numpy() for t in deployed(to_tensor(images))), strict=True)
        )
    assert got["logits"].shape == (37, 10)
    assert np.array_equal(got["label"], expected["label"])
    assert np.array_equal(got["label"], got["logits"].argmax(axis=1))
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    for name in ("probabilities", *METRICS):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-3)
    threshold = manifest.detection.thresholds[manifest.detection.default_metric]
    assert np.array_equal(got["accepted"], got[manifest.detection.default_metric] >= threshold)
    # RCE deploys the reversed logits: the graph's logits are -Z of the network.
    with torch.no_grad():
        raw, _ = model(to_tensor(images))
    np.testing.assert_allclose(got["logits"], -raw.numpy(), rtol=1e-4, atol=1e-4)


class DivergesFromItsTrace(ResNet):
    """A network whose eager forward is not what ONNX export traces: eagerly it adds 0.5 to
    every raw logit. Softmax, the label and the three scores are shift-invariant, so only the
    `logits` output of the graph disagrees with torch."""

    def forward(self, images: torch.Tensor, layers: bool = False) -> tuple[torch.Tensor, ...]:
        out = super().forward(images, layers)
        return out if torch.jit.is_tracing() else (out[0] + 0.5, *out[1:])


class FlipsOneDecision(DeployedModel):
    """The deployed detector with one image's `accepted` decision inverted (eager only)."""

    flip = 0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *outputs, accepted = super().forward(images)
        accepted = accepted.clone()
        accepted[self.flip] = ~accepted[self.flip]
        return (*outputs, accepted)


def test_export_refuses_to_overwrite_and_leaves_no_partial_artifact(
    tiny_artifact: TinyArtifact, tmp_path: Path
) -> None:
    model, config, dataset = load_trained_model(tiny_artifact.checkpoint)
    calibration = Calibration.load(tiny_artifact.calibration)
    with pytest.raises(FileExistsError):
        export_artifact(
            model, config, dataset, calibration, tiny_artifact.model_dir, tiny_artifact.name, 1
        )
    # A real mismatch, not a stubbed guard: the traced graph lacks the eager logit shift.
    diverging = DivergesFromItsTrace(config.depth, 1, 10, bn_eps=1e-3, fc_init="unit-uniform")
    diverging.load_state_dict(model.state_dict())
    with pytest.raises(ExportError, match="disagree on logits"):
        export_artifact(
            diverging.eval(), config, dataset, calibration, tmp_path, "broken", 1, force=True
        )
    assert list((tmp_path / "broken").iterdir()) == []


@pytest.fixture(scope="module")
def borderline_graph(
    tiny_artifact: TinyArtifact, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Calibration, ResNet, np.ndarray, float]:
    """A graph whose log_kd threshold sits 1e-4 below the score of test image 0: within the
    guard's tolerance of it, yet clear of float noise, so both torch and ORT accept image 0."""
    model, _, dataset = load_trained_model(tiny_artifact.checkpoint)
    calibration = Calibration.load(tiny_artifact.calibration)
    images = dataset.test.images[:CHECK_IMAGES]
    with torch.no_grad():
        log_kd = calibration.deployed(model)(to_tensor(images))[5].numpy()
    threshold = float(log_kd[0]) - 1e-4
    path = tmp_path_factory.mktemp("guard") / "model.onnx"
    export_onnx(_detector(DeployedModel, calibration, model, threshold), dataset.shape, path)
    return path, calibration, model, images, threshold


def _detector(
    cls: type[DeployedModel], calibration: Calibration, network: ResNet, threshold: float
) -> DeployedModel:
    return cls(
        network, calibration.objective, calibration.bank, calibration.bank_mask,
        calibration.sigma2, "log_kd", threshold, calibration.mahalanobis, calibration.combined,
    ).eval()  # fmt: skip


def test_export_guard_compares_every_output_of_a_faithful_graph(borderline_graph) -> None:
    path, calibration, model, images, threshold = borderline_graph
    errors = check_against_torch(
        path, _detector(DeployedModel, calibration, model, threshold), images
    )
    assert set(errors) == set(OUTPUT_NAMES) - {"label", "accepted"}
    assert all(errors[name] <= atol for name, atol in EXPORT_ATOL.items())


def test_export_guard_refuses_a_flipped_decision_away_from_the_threshold(borderline_graph) -> None:
    path, calibration, model, images, threshold = borderline_graph
    detector = _detector(FlipsOneDecision, calibration, model, threshold)
    with torch.no_grad():
        log_kd = detector(to_tensor(images))[5].numpy()
    distance = np.abs(log_kd - threshold)
    detector.flip = int(distance.argmax())
    # Five times the guard's tolerance (1e-2 + 1e-4 * |T|) away: no rounding excuses a flip.
    assert distance[detector.flip] > 5 * (EXPORT_ATOL["log_kd"] + 1e-4 * abs(threshold))
    with pytest.raises(ExportError, match="disagree on accepted for 1 image"):
        check_against_torch(path, detector, images)


def test_export_guard_tolerates_a_flipped_decision_on_the_threshold(borderline_graph) -> None:
    path, calibration, model, images, threshold = borderline_graph
    detector = _detector(FlipsOneDecision, calibration, model, threshold)
    detector.flip = 0  # its log_kd is 1e-4 above the threshold: a rounding may flip it
    check_against_torch(path, detector, images)


def test_export_guard_refuses_a_graph_whose_weights_changed(borderline_graph) -> None:
    path, calibration, model, images, threshold = borderline_graph
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        noise = torch.randn(perturbed.conv.weight.shape, generator=torch.Generator().manual_seed(0))
        perturbed.conv.weight.add_(0.05 * noise)
    with pytest.raises(ExportError, match="disagree"):
        check_against_torch(
            path, _detector(DeployedModel, calibration, perturbed, threshold), images
        )


def test_export_refuses_a_near_chance_model_unless_forced(
    tiny_artifact: TinyArtifact, tmp_path: Path
) -> None:
    model, config, dataset = load_trained_model(tiny_artifact.checkpoint)
    calibration = Calibration.load(tiny_artifact.calibration)
    chance, least = minimum_accuracy(dataset.test.labels)
    assert chance == pytest.approx(0.1, abs=0.03) and least == pytest.approx(
        chance + 0.25 * (1 - chance)
    )
    assert Manifest.load(tiny_artifact.path).clean_test_accuracy < least
    with pytest.raises(NearChanceError, match=r"near chance .* needs at least"):
        export_artifact(model, config, dataset, calibration, tmp_path, "weak", 1)
    assert not (tmp_path / "weak").exists()
    forced = export_artifact(model, config, dataset, calibration, tmp_path, "weak", 1, force=True)
    assert Manifest.load(forced).name == "weak"


def test_cli_export_exits_2_on_a_near_chance_model(
    tiny_artifact: TinyArtifact, tmp_path: Path
) -> None:
    args = [
        "export", "--checkpoint", str(tiny_artifact.checkpoint), "--calibration",
        str(tiny_artifact.calibration), "--name", "weak", "--model-dir", str(tmp_path),
    ]  # fmt: skip
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert "near chance" in refused.output and "--force" in refused.output
    assert not (tmp_path / "weak" / "1").exists()
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0
    assert (tmp_path / "weak" / "1" / "manifest.json").is_file()
    # progress on stderr: the test split, then the three steps of writing the artifact
    for step in ("export: test accuracy", "export: ONNX Runtime vs torch", "export: manifest"):
        assert step in forced.output


@pytest.mark.parametrize(
    "budget", [{"recipe": "legacy", "epochs": 2}, {"recipe": "official", "steps": 4}]
)
def test_resumed_training_ends_where_the_uninterrupted_run_ends(
    tmp_path: Path, budget: dict
) -> None:
    # 256 images, batch 128: two steps per epoch, so both budgets end after the second epoch
    # (the official one with lr decays at steps 2 and 3, inside the resumed epoch).
    whole = train(TrainConfig(depth=8, train_limit=256, **budget), tmp_path / "whole.pt")
    checkpoint = tmp_path / "run.pt"
    train(TrainConfig(depth=8, train_limit=256, dry_run=True, **budget), checkpoint)
    payload = load_checkpoint(checkpoint)
    assert payload["config"]["depth"] == 8 and payload["epoch"] == 1
    resumed = train(TrainConfig(depth=8, train_limit=256, **budget), checkpoint, resume=True)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    # Weights, BatchNorm buffers and the optimizer's momentum all came back from the checkpoint.
    assert resumed["model"].keys() == whole["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    momentum = [s["momentum_buffer"] for s in whole["optimizer"]["state"].values()]
    restored = [s["momentum_buffer"] for s in resumed["optimizer"]["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)
    assert all(torch.equal(a, b) for a, b in zip(momentum, restored, strict=True))
    for done, again in zip(whole["history"], resumed["history"], strict=True):
        assert {k: v for k, v in done.items() if k != "seconds"} == {
            k: v for k, v in again.items() if k != "seconds"
        }


def test_cli_pipeline_writes_an_artifact_and_reports_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "pipeline",
            "--name",
            "cli",
            "--depth",
            "8",
            "--epochs",
            "1",
            "--dry-run",
            "--train-limit",
            "256",
            "--bank-per-class",
            "20",
            "--model-dir",
            str(tmp_path / "models"),
            "--work-dir",
            str(tmp_path / "runs"),
            "--force",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    assert summary["artifact"] == str(tmp_path / "models" / "cli" / "1")
    assert set(summary["thresholds"]) == set(METRICS)


def test_cli_calibrate_then_export_with_confidence_as_the_default_metric(
    tiny_artifact: TinyArtifact, tmp_path: Path
) -> None:
    calibration = tmp_path / "confidence.calibration.pt"
    runner = CliRunner()
    calibrated = runner.invoke(
        app,
        [
            "calibrate", "--checkpoint", str(tiny_artifact.checkpoint), "--out", str(calibration),
            "--metric", "confidence", "--target-fpr", "0.1", "--bank-per-class", "20",
        ],
    )  # fmt: skip
    assert calibrated.exit_code == 0, calibrated.output
    result = Calibration.load(calibration)
    assert result.default_metric == "confidence" and result.target_fpr == 0.1
    assert result.bank_mask.sum(axis=1).tolist() == [20] * 10
    assert last_json(calibrated.output) == {
        "target_fpr": 0.1, "thresholds": result.thresholds
    }  # fmt: skip
    exported = runner.invoke(
        app,
        [
            "export", "--checkpoint", str(tiny_artifact.checkpoint), "--calibration",
            str(calibration), "--name", "confident", "--version", "3", "--model-dir",
            str(tmp_path / "models"), "--force",
        ],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    artifact = tmp_path / "models" / "confident" / "3"
    manifest = Manifest.load(artifact)
    assert manifest.detection.default_metric == "confidence"
    assert manifest.detection.thresholds == result.thresholds
    # The graph's decision is confidence against its threshold, which differs from what
    # log K-density would decide on these images.
    out = run_artifact(artifact, load_mnist_5k().test.images)
    by_confidence = out["confidence"] >= result.thresholds["confidence"]
    by_log_kd = out["log_kd"] >= result.thresholds["log_kd"]
    assert not np.array_equal(by_confidence, by_log_kd)
    assert np.array_equal(out["accepted"], by_confidence)


def test_cli_names_a_missing_dataset_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--dry-run"]
    )
    assert result.exit_code == 2
    assert "nope: no such directory" in result.output


def _round_robin_shard(
    split: Split, batch_size: int, seed: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank `rank`'s batches of epoch 0 by the documented rule: the epoch's seeded permutation
    dealt round-robin (every world-th example from position rank), in batches of batch_size
    with the indices sorted within a batch. Built eagerly: a lazy generator here would read
    `rank` after the caller's loop has moved on."""
    shard = np.random.default_rng([seed, 0]).permutation(len(split))[rank::world]
    chunks = [
        np.sort(shard[start : start + batch_size]) for start in range(0, len(shard), batch_size)
    ]
    return iter([(to_tensor(split.images[i]), torch.from_numpy(split.labels[i])) for i in chunks])


def _replay_data_parallel(config: TrainConfig, world: int) -> dict[str, torch.Tensor]:
    """The dry run of `config` under DistributedDataParallel, replayed in one process: every step
    averages the gradients of each rank's batch of its own shard (built here from the documented
    rule by `_round_robin_shard`, not by `training.train.batches`). DDP broadcasts rank 0's
    BatchNorm buffers before each forward and rank 0 writes the checkpoint, so the other ranks
    run first and rank 0 runs last from the same buffers."""
    seed_everything(config.seed)
    dataset = load_dataset(config.dataset, None, config.seed)
    split = dataset.train.head(config.train_limit) if config.train_limit else dataset.train
    model = build_model(config, dataset).train()
    optimizer = torch.optim.SGD(
        parameter_groups(model, config), config.lr, momentum=config.momentum
    )
    shards = [
        _round_robin_shard(split, config.batch_size, config.seed, r, world) for r in range(world)
    ]
    for step in range(DRY_RUN_BATCHES):
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(config, step)
        optimizer.zero_grad()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        batch = [next(shard) for shard in shards]
        for rank in [*range(1, world), 0]:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            images, labels = batch[rank]
            logits, _ = model(images)
            (loss_for(config.objective, logits, labels) / world).backward()
        optimizer.step()
    return model.state_dict()


def test_torchrun_trains_each_process_on_its_own_shard(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ddp.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "rcegate", "train", "--checkpoint", str(checkpoint), "--depth", "8",
        "--epochs", "1", "--train-limit", "512", "--batch-size", "64", "--dry-run",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = load_checkpoint(checkpoint)
    assert payload["history"][0]["epoch"] == 1
    assert not any(k.startswith("module.") for k in payload["model"])
    # Rank 0 wrote weights that only the gradients of both ranks' shards, averaged, produce.
    expected = _replay_data_parallel(TrainConfig.from_dict(payload["config"]), world=2)
    assert payload["model"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(payload["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_committed_default_model_meets_its_targets() -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    assert manifest.sha256 == sha256_file(DEFAULT_MODEL_DIR / "model.onnx")
    assert manifest.dataset.name == "mnist-5k" and manifest.objective == "rce"
    assert manifest.clean_test_accuracy >= 0.97
    acceptance = manifest.detection.clean_acceptance[manifest.detection.default_metric]
    assert abs(acceptance - (1 - manifest.detection.target_fpr)) <= 0.02 + 1e-9
    dataset = load_mnist_5k(manifest.dataset.split.seed)
    out = run_artifact(DEFAULT_MODEL_DIR, dataset.test.images)
    assert float((out["label"] == dataset.test.labels).mean()) == pytest.approx(
        manifest.clean_test_accuracy
    )
    assert float(out["accepted"].mean()) == pytest.approx(acceptance)


def test_cli_calibrate_shows_progress_and_writes_the_calibration(
    tiny_artifact: TinyArtifact, tmp_path: Path
) -> None:
    out = tmp_path / "c.pt"
    args = ["calibrate", "--checkpoint", str(tiny_artifact.checkpoint), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--bank-per-class", "20"])
    assert result.exit_code == 0, result.output
    assert "calibrate: training features" in result.output and "calibrate: scores" in result.output
    assert out.is_file()
