"""`models.layout`: the one walker over `<model_dir>/<name>/<version>/`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.layout import (
    DEFAULT_MODEL_DIR,
    ArtifactError,
    latest_version,
    verified_manifest,
    version_directories,
    version_directory,
    versions,
)
from models.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from tests.conftest import DEFAULT_MODEL_DIR as COMMITTED_VERSION


def make_repository(root: Path) -> Path:
    """Empty version directories (names only matter to the walker) and staging leftovers."""
    for relative in ("b/2", "b/10", "a/1", "a/notes", ".a.staging/3", "a/.4.tmp", "c/x"):
        (root / relative).mkdir(parents=True)
    (root / "a" / "5").write_text("a file, not a version")
    return root


def test_version_directories_sorts_by_name_then_version_number(tmp_path: Path) -> None:
    root = make_repository(tmp_path)
    assert version_directories(root) == [root / "a" / "1", root / "b" / "2", root / "b" / "10"]


def test_versions_are_numeric_and_the_latest_is_the_highest_number(tmp_path: Path) -> None:
    root = make_repository(tmp_path)
    assert versions(root, "b") == [2, 10]
    assert latest_version(root, "b") == 10
    assert version_directory(root, "b") == root / "b" / "10"
    assert version_directory(root, "b", 2) == root / "b" / "2"
    assert versions(root, "c") == versions(root, "missing") == []


def test_a_model_without_versions_is_an_artifact_error(tmp_path: Path) -> None:
    root = make_repository(tmp_path)
    with pytest.raises(ArtifactError, match="no versions of model 'c' under"):
        latest_version(root, "c")


def test_the_default_repository_is_this_package_and_holds_the_committed_model() -> None:
    assert DEFAULT_MODEL_DIR == Path(__file__).resolve().parents[2] / "models"
    assert COMMITTED_VERSION in version_directories(DEFAULT_MODEL_DIR)


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """A copy of the committed default model at the same <name>/<version>."""
    target = tmp_path / COMMITTED_VERSION.parent.name / COMMITTED_VERSION.name
    shutil.copytree(COMMITTED_VERSION, target)
    return target


def test_verified_manifest_reads_a_consistent_version(copied: Path) -> None:
    assert verified_manifest(copied) == Manifest.load(COMMITTED_VERSION)


def test_verified_manifest_refuses_missing_files(copied: Path) -> None:
    (copied / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"has no {MODEL_FILE} \\+ {MANIFEST_FILE}"):
        verified_manifest(copied)


def test_verified_manifest_refuses_a_manifest_of_another_version(copied: Path) -> None:
    moved = copied.with_name("7")
    copied.rename(moved)
    with pytest.raises(ArtifactError, match=r"manifest says mnist-rce/2, directory is mnist-rce/7"):
        verified_manifest(moved)


def test_verified_manifest_refuses_a_graph_of_another_sha256(copied: Path) -> None:
    manifest = json.loads((copied / MANIFEST_FILE).read_text())
    manifest["sha256"] = "0" * 64
    (copied / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match its manifest's sha256"):
        verified_manifest(copied)
