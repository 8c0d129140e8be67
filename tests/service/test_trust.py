"""Trusted artifacts: every tampered, unsigned or unsafe version is refused with its reason, and
the healthy versions beside it keep serving."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.manifest import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest, sha256_file
from service.settings import Settings
from service.signing import generate_key, load_private_key, sign_artifact
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact
from tests.service.conftest import copy_model, started, wait_loaded

PNG = {"content-type": "image/png"}


def edit(directory: Path, change: object) -> None:
    """Apply `change(data)` to the manifest's JSON and write it back."""
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data, indent=2))


def serve(model_dir: Path, **overrides: object) -> TestClient:
    settings = Settings(model_dir=model_dir, default_model="tiny", **overrides)  # type: ignore[arg-type]
    return started(settings)


def refusals(client: TestClient) -> dict[str, str]:
    body = client.get("/v1/models").json()
    return {f"{r['name']}/{r['version']}": r["reason"] for r in body["refused"]}


def loaded(client: TestClient) -> list[tuple[str, int]]:
    return [(m["name"], m["version"]) for m in client.get("/v1/models").json()["models"]]


def _threshold(data: dict) -> None:  # type: ignore[type-arg]
    data["detection"]["thresholds"]["log_kd"] = -1e9


def _table(data: dict) -> None:  # type: ignore[type-arg]
    table = data["detection"]["calibration_table"]
    table["thresholds"]["log_kd"] = [-1e9 + i for i in range(len(table["fpr"]))]


def _metric(data: dict) -> None:  # type: ignore[type-arg]
    data["detection"]["default_metric"] = "confidence"


def _classes(data: dict) -> None:  # type: ignore[type-arg]
    names = data["dataset"]["class_names"]
    names[0], names[1] = names[1], names[0]


def _sigma(data: dict) -> None:  # type: ignore[type-arg]
    data["detection"]["sigma2"] = 1.0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_threshold, "manifest disagrees with the graph's bound detection.thresholds: "),
        (_table, "manifest disagrees with the graph's bound detection.calibration_table: "),
        (_metric, "manifest disagrees with the graph's bound detection.default_metric: "),
        (_classes, "manifest disagrees with the graph's bound class_names: "),
        (_sigma, "manifest disagrees with the graph's bound detection.sigma2: "),
    ],
    ids=["threshold", "calibration_table", "default_metric", "class_names", "sigma2"],
)
def test_edited_decision_constant_is_refused_while_the_original_serves(
    tmp_path: Path, tiny_artifact: TinyArtifact, digit_png: bytes, change: object, reason: str
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    edit(copy_model(tiny_artifact.path, tmp_path, "tiny", 2), change)
    with serve(tmp_path) as client:
        wait_loaded(client)
        assert refusals(client)["tiny/2"].startswith(reason)
        assert loaded(client) == [("tiny", 1)]
        answer = client.post("/v1/predict", content=digit_png, headers=PNG)
        assert answer.status_code == 200 and answer.json()["version"] == 1


def test_swapped_graph_with_a_matching_sha256_is_refused(
    tmp_path: Path, tiny_artifact: TinyArtifact
) -> None:
    swapped = copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    # Another model's graph (same inputs and outputs), with the manifest's sha256 updated.
    shutil.copyfile(DEFAULT_MODEL_DIR / MODEL_FILE, swapped / MODEL_FILE)
    edit(swapped, lambda d: d.update(sha256=sha256_file(swapped / MODEL_FILE)))
    with serve(tmp_path) as client:
        wait_loaded(client)
        reason = refusals(client)["tiny/1"]
        assert reason.startswith("manifest disagrees with the graph's bound detection.")
        assert client.get("/health/ready").status_code == 503


def test_graph_without_binding_is_refused_with_the_command_that_fixes_it(
    tmp_path: Path, tiny_artifact: TinyArtifact
) -> None:
    import onnx

    old = copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    graph = onnx.load(str(old / MODEL_FILE))
    del graph.metadata_props[:]
    onnx.save(graph, str(old / MODEL_FILE))
    edit(old, lambda d: d.update(sha256=sha256_file(old / MODEL_FILE)))
    with serve(tmp_path) as client:
        wait_loaded(client)
        assert refusals(client)["tiny/1"] == (
            "the graph carries no rcegate.binding metadata (an artifact from before binding): "
            "bind it with `rcegate stamp <name>/<version>`"
        )


def _fifo(directory: Path, outside: Path) -> None:
    (directory / MODEL_FILE).unlink()
    os.mkfifo(directory / MODEL_FILE)


def _dev_zero(directory: Path, outside: Path) -> None:
    (directory / MODEL_FILE).unlink()
    (directory / MODEL_FILE).symlink_to("/dev/zero")


def _model_outside(directory: Path, outside: Path) -> None:
    shutil.move(directory / MODEL_FILE, outside / MODEL_FILE)
    (directory / MODEL_FILE).symlink_to(outside / MODEL_FILE)


def _manifest_outside(directory: Path, outside: Path) -> None:
    shutil.move(directory / MANIFEST_FILE, outside / MANIFEST_FILE)
    (directory / MANIFEST_FILE).symlink_to(outside / MANIFEST_FILE)


def _version_outside(directory: Path, outside: Path) -> None:
    target = outside / "2"
    shutil.move(directory, target)
    directory.symlink_to(target, target_is_directory=True)


def _huge_manifest(directory: Path, outside: Path) -> None:
    edit(directory, lambda d: d.update(source_commit="x" * (2 << 20)))


def _long_field(directory: Path, outside: Path) -> None:
    edit(directory, lambda d: d["dataset"].update(name="x" * 100_000))


def _many_classes(directory: Path, outside: Path) -> None:
    edit(directory, lambda d: d["dataset"].update(class_names=["c"] * 20_000))


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_fifo, "model.onnx is not a regular file"),
        (_dev_zero, "model.onnx resolves outside the model repository"),
        (_model_outside, "model.onnx resolves outside the model repository"),
        (_manifest_outside, "manifest.json resolves outside the model repository"),
        (_version_outside, "tiny/2 resolves outside the model repository"),
        (_huge_manifest, "manifest.json has "),
        (_long_field, "manifest.json is invalid: dataset.name: String should have at most 256"),
        (_many_classes, "manifest.json is invalid: dataset.class_names: List should have at most"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_unsafe_files_are_refused_without_hanging_or_reading_them(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    breakage: object,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repository, outside = tmp_path / "repo", tmp_path / "outside"
    outside.mkdir()
    copy_model(tiny_artifact.path, repository, "tiny", 1)
    broken = copy_model(tiny_artifact.path, repository, "tiny", 2)
    breakage(broken, outside)  # type: ignore[operator]
    caplog.set_level(logging.ERROR, logger="service")
    with serve(repository) as client:
        wait_loaded(client)
        got = refusals(client)["tiny/2"]
        assert got.startswith(reason)
        assert len(got) < 1000  # the reason is bounded, whatever the manifest holds
        assert str(tmp_path) not in got  # and names no absolute path
        assert loaded(client) == [("tiny", 1)]
        assert client.get("/health/ready").status_code == 200
    lines = [r.getMessage() for r in caplog.records if "refused model tiny/2" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0]


def test_model_over_the_size_limit_is_refused(tmp_path: Path, tiny_artifact: TinyArtifact) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    size = (tmp_path / "tiny" / "1" / MODEL_FILE).stat().st_size
    with serve(tmp_path, max_model_bytes=1000) as client:
        wait_loaded(client)
        assert refusals(client)["tiny/1"] == (
            f"model.onnx has {size} bytes, over the limit of 1000"
        )


@pytest.fixture
def signer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    key = tmp_path_factory.mktemp("keys") / "signing.pem"
    return key, generate_key(key)


def test_signed_versions_load_and_unsigned_or_mis_signed_ones_are_refused(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    signer: tuple[Path, str],
    digit_png: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_path, public = signer
    private = load_private_key(key_path)
    repository = tmp_path / "repo"
    sign_artifact(copy_model(tiny_artifact.path, repository, "tiny", 1), private)
    copy_model(tiny_artifact.path, repository, "tiny", 2)  # a bogus newer version, unsigned
    other = tmp_path / "other.pem"
    generate_key(other)
    sign_artifact(copy_model(tiny_artifact.path, repository, "tiny", 3), load_private_key(other))
    edited = copy_model(tiny_artifact.path, repository, "tiny", 4)
    sign_artifact(edited, private)
    edit(edited, lambda d: d.update(created_at="2030-01-01T00:00:00Z"))  # after signing
    garbled = copy_model(tiny_artifact.path, repository, "tiny", 5)
    (garbled / SIGNATURE_FILE).write_text("not a signature\n")
    caplog.set_level(logging.ERROR, logger="service")
    with serve(repository, trusted_keys=[public]) as client:
        wait_loaded(client)
        assert refusals(client) == {
            "tiny/2": "unsigned: manifest.json.sig is missing and trusted keys are configured",
            "tiny/3": "bad signature: manifest.json.sig does not verify manifest.json with any "
            "trusted key",
            "tiny/4": "bad signature: manifest.json.sig does not verify manifest.json with any "
            "trusted key",
            "tiny/5": "bad signature: manifest.json.sig is not a base64 Ed25519 signature",
        }
        # The newest *signed* version is the default, not the bogus newer one.
        assert loaded(client) == [("tiny", 1)]
        answer = client.post("/v1/predict", content=digit_png, headers=PNG)
        assert answer.status_code == 200 and answer.json()["version"] == 1
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refused) == 4


def test_without_trusted_keys_an_unsigned_newer_version_becomes_the_default(
    tmp_path: Path, tiny_artifact: TinyArtifact, caplog: pytest.LogCaptureFixture
) -> None:
    """What signing is for: without keys, whoever can write to model_dir decides what serves."""
    for version in (1, 2):
        copy_model(tiny_artifact.path, tmp_path, "tiny", version)
    caplog.set_level(logging.WARNING, logger="service")
    with serve(tmp_path) as client:
        wait_loaded(client)
        assert [m["default"] for m in client.get("/v1/models").json()["models"]] == [False, True]
    assert any("no trusted keys" in r.getMessage() for r in caplog.records)


def test_invalid_trusted_key_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="Ed25519 public key has 32 bytes"):
        Settings(trusted_keys=["AAAA"])


def test_manifest_bounds_reject_oversized_fields() -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR).model_dump(mode="json")
    manifest["library_versions"] = {f"p{i}": "1" for i in range(100)}
    with pytest.raises(ValueError, match="library_versions"):
        Manifest.model_validate(manifest)
