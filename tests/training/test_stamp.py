"""Binding decision constants to the graph: `rcegate stamp` is reproducible and refuses to vouch
for an artifact that does not verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from models.layout import version_directories
from models.manifest import BINDING_KEY, MANIFEST_FILE, MODEL_FILE, Binding, Manifest, sha256_file
from rcegate.cli import app
from tests.conftest import DEFAULT_MODEL_DIR
from training.stamp import StampError, graph_binding, restamp


def unbound_copy(tmp_path: Path) -> Path:
    """The committed default model as it was before binding: no metadata, its old sha256."""
    target = tmp_path / "mnist-rce" / "1"
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    graph = onnx.load(str(target / MODEL_FILE))
    del graph.metadata_props[:]
    onnx.save(graph, str(target / MODEL_FILE))
    manifest = Manifest.load(target).model_copy(update={"sha256": sha256_file(target / MODEL_FILE)})
    manifest.dump(target)
    return target


def test_committed_models_carry_their_manifests_binding() -> None:
    directories = version_directories(DEFAULT_MODEL_DIR.parent.parent)
    assert DEFAULT_MODEL_DIR in directories
    for directory in directories:
        manifest = Manifest.load(directory)
        assert sha256_file(directory / MODEL_FILE) == manifest.sha256
        carried = graph_binding(onnx.load(str(directory / MODEL_FILE)))
        assert carried is not None
        assert Binding.model_validate_json(carried) == manifest.binding()


def test_stamp_reproduces_the_committed_bytes_and_is_idempotent(tmp_path: Path) -> None:
    old = unbound_copy(tmp_path)
    result = CliRunner().invoke(app, ["stamp", str(old)])
    assert result.exit_code == 0, result.output
    committed = Manifest.load(DEFAULT_MODEL_DIR).sha256
    assert result.output.strip() == f"{old}: {committed}"
    assert (old / MODEL_FILE).read_bytes() == (DEFAULT_MODEL_DIR / MODEL_FILE).read_bytes()
    assert (old / MANIFEST_FILE).read_text() == (DEFAULT_MODEL_DIR / MANIFEST_FILE).read_text()
    assert restamp(old) == committed  # stamping again changes nothing


def test_stamp_refuses_an_artifact_that_does_not_verify(tmp_path: Path) -> None:
    old = unbound_copy(tmp_path)
    with (old / MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(StampError, match="sha256 does not match the manifest"):
        restamp(old)


def test_stamp_rebinds_edited_constants_only_when_forced(tmp_path: Path) -> None:
    target = tmp_path / "mnist-rce" / "1"
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    data = json.loads((target / MANIFEST_FILE).read_text())
    data["detection"]["thresholds"]["log_kd"] = -1e9
    (target / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(StampError, match="bound to other values of detection.thresholds"):
        restamp(target)
    digest = restamp(target, force=True)
    graph = onnx.load(str(target / MODEL_FILE))
    assert [p.key for p in graph.metadata_props] == [BINDING_KEY]
    assert Manifest.load(target).sha256 == digest == sha256_file(target / MODEL_FILE)
    assert (
        Binding.model_validate_json(graph_binding(graph) or "").detection.thresholds["log_kd"]
        == -1e9
    )
