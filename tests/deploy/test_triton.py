"""`rcegate export-triton`: the Triton model-repository layout, checked against Triton's own
model-config schema (the protobuf in tritonclient) and against the graph it describes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from models import MANIFEST_FILE, MODEL_FILE, OUTPUT_NAMES, Manifest, sha256_file
from models.triton import TritonExportError, export_triton
from rcegate.cli import app
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact

ModelConfig = model_config_pb2.ModelConfig
DataType = model_config_pb2.DataType


@pytest.fixture(scope="module")
def model_dir(tiny_artifact: TinyArtifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny artifact's repository (tests corrupt it)."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(tiny_artifact.model_dir, root / "models")
    return root / "models"


@pytest.fixture
def exported(model_dir: Path, tmp_path: Path) -> Path:
    return export_triton(model_dir, "tiny", tmp_path / "triton")


def _config(path: Path) -> Any:
    return text_format.Parse((path / "config.pbtxt").read_text(), ModelConfig())


def test_export_writes_the_triton_layout(exported: Path, model_dir: Path) -> None:
    assert sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*")) == [
        "1",
        "1/manifest.json",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    manifest = Manifest.load(exported / "1")
    assert sha256_file(exported / "1" / MODEL_FILE) == manifest.sha256
    assert (exported / "labels.txt").read_text().splitlines() == manifest.class_names


def test_config_parses_as_a_triton_model_config(exported: Path) -> None:
    config = _config(exported)
    manifest = Manifest.load(exported / "1")
    assert config.name == "tiny"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    (images,) = config.input
    assert images.name == "images"
    assert images.data_type == DataType.Value("TYPE_FP32")
    assert tuple(images.dims) == manifest.input.shape
    outputs = {o.name: o for o in config.output}
    assert tuple(outputs) == OUTPUT_NAMES
    assert tuple(outputs["logits"].dims) == (manifest.num_classes,)
    assert outputs["probabilities"].label_filename == "labels.txt"
    assert outputs["accepted"].data_type == DataType.Value("TYPE_BOOL")
    assert outputs["label"].data_type == DataType.Value("TYPE_INT64")
    for scalar in ("label", "confidence", "non_me", "log_kd", "accepted"):
        assert tuple(outputs[scalar].dims) == (1,)
        assert outputs[scalar].HasField("reshape") and not outputs[scalar].reshape.shape
    parameters = config.parameters
    metric = manifest.detection.default_metric
    assert parameters["rcegate.metric"].string_value == metric
    assert (
        float(parameters["rcegate.threshold"].string_value) == manifest.detection.thresholds[metric]
    )
    assert float(parameters["rcegate.target_fpr"].string_value) == manifest.detection.target_fpr


def test_cli_exports_the_highest_version(model_dir: Path, tmp_path: Path) -> None:
    # Versions 1, 2 and 10 of the same graph: the highest by number is 10 (by name, "2").
    repo = tmp_path / "repo"
    shutil.copytree(model_dir, repo)
    for version in (2, 10):
        target = repo / "tiny" / str(version)
        shutil.copytree(repo / "tiny" / "1", target)
        Manifest.load(target).model_copy(update={"version": version}).dump(target)
    result = CliRunner().invoke(
        app, ["export-triton", str(tmp_path / "out"), "--name", "tiny", "--model-dir", str(repo)]
    )
    assert result.exit_code == 0, result.output
    exported = tmp_path / "out" / "tiny"
    assert sorted(p.name for p in exported.iterdir() if p.is_dir()) == ["10"]
    assert Manifest.load(exported / "10").version == 10
    config = _config(exported)
    assert config.parameters["rcegate.version"].string_value == "10"
    assert config.max_batch_size == 64


def test_export_refuses_to_replace_a_version_unless_asked(exported: Path, model_dir: Path) -> None:
    with pytest.raises(TritonExportError, match="exists"):
        export_triton(model_dir, "tiny", exported.parent)
    assert export_triton(model_dir, "tiny", exported.parent, overwrite=True) == exported
    assert (exported / "1" / MODEL_FILE).is_file()


def test_export_refuses_a_model_that_does_not_match_its_manifest(
    model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    manifest = json.loads((broken / "tiny" / "1" / MANIFEST_FILE).read_text())
    manifest["sha256"] = "0" * 64
    (broken / "tiny" / "1" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TritonExportError, match="sha256"):
        export_triton(broken, "tiny", tmp_path / "triton")
    assert not (tmp_path / "triton").exists()


def test_cli_reports_a_missing_model_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["export-triton", str(tmp_path / "out"), "--name", "nope", "--model-dir", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "no versions of model 'nope'" in result.output


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / MODEL_FILE).is_file(), reason="the default model is not committed yet"
)
def test_the_committed_default_model_exports(tmp_path: Path) -> None:
    path = export_triton(DEFAULT_MODEL_DIR.parent.parent, "mnist-rce", tmp_path)
    config = _config(path)
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    assert [o.name for o in config.output] == manifest.outputs
    assert tuple(config.input[0].dims) == manifest.input.shape
