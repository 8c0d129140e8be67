"""End to end on a slice of mnist-5k: train, calibrate, export, then run the artifact in ORT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from models.manifest import INPUT_NAME, METRICS, OUTPUT_NAMES, Manifest, sha256_file
from service.cli import app
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact
from training import export as export_module
from training.calibrate import Calibration
from training.data import load_mnist_5k
from training.export import ExportError, NearChanceError, export_artifact, minimum_accuracy
from training.train import TrainConfig, load_checkpoint, load_trained_model, to_tensor, train


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
    assert np.array_equal(got["accepted"], got["log_kd"] >= threshold)
    # RCE deploys the reversed logits: the graph's logits are -Z of the network.
    with torch.no_grad():
        raw, _ = model(to_tensor(images))
    np.testing.assert_allclose(got["logits"], -raw.numpy(), rtol=1e-4, atol=1e-4)


def test_export_refuses_to_overwrite_and_leaves_no_partial_artifact(
    tiny_artifact: TinyArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, config, dataset = load_trained_model(tiny_artifact.checkpoint)
    calibration = Calibration.load(tiny_artifact.calibration)
    with pytest.raises(FileExistsError):
        export_artifact(
            model, config, dataset, calibration, tiny_artifact.model_dir, tiny_artifact.name, 1
        )

    def disagree(*args: object) -> None:
        raise ExportError("ONNX Runtime and torch disagree on labels")

    monkeypatch.setattr(export_module, "check_against_torch", disagree)
    with pytest.raises(ExportError, match="disagree"):
        export_artifact(model, config, dataset, calibration, tmp_path, "broken", 1, force=True)
    assert list((tmp_path / "broken").iterdir()) == []


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
def test_checkpoint_stores_its_config_and_resumes(tmp_path: Path, budget: dict) -> None:
    checkpoint = tmp_path / "run.pt"
    config = TrainConfig(depth=8, train_limit=256, dry_run=True, **budget)
    train(config, checkpoint)
    payload = load_checkpoint(checkpoint)
    assert payload["config"]["depth"] == 8 and payload["epoch"] == 1
    # 256 images, batch 128: two steps per epoch, so both budgets end after the second epoch.
    resumed = train(TrainConfig(depth=8, train_limit=256, **budget), checkpoint, resume=True)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2


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
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["artifact"] == str(tmp_path / "models" / "cli" / "1")
    assert set(summary["thresholds"]) == set(METRICS)


def test_cli_names_a_missing_dataset_directory(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--dry-run"]
    )
    assert result.exit_code == 2
    assert "nope: no such directory" in result.output


def test_torchrun_trains_with_two_processes(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ddp.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "service.cli", "train", "--checkpoint", str(checkpoint), "--depth", "8",
        "--epochs", "1", "--train-limit", "512", "--batch-size", "64", "--dry-run",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = load_checkpoint(checkpoint)
    # Rank 0 writes; each process saw its own half of every batch step.
    assert payload["history"][0]["epoch"] == 1
    assert not any(k.startswith("module.") for k in payload["model"])


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
    assert "calibrate: bank features" in result.output and "calibrate: scores" in result.output
    assert out.is_file()
