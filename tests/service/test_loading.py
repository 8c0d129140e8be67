"""Model loading: verification refuses bad versions with a clear log line; the rest keep serving."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.manifest import MANIFEST_FILE, MODEL_FILE
from service.errors import NotReady
from service.repository import ModelRepository
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import copy_model, started, wait_loaded

PNG = {"content-type": "image/png"}


def refused_reasons(client: TestClient) -> dict[str, str]:
    body = client.get("/v1/models").json()
    return {f"{r['name']}/{r['version']}": r["reason"] for r in body["refused"]}


def test_tampered_model_is_refused_while_others_keep_serving(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    digit_png: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    for name, version in (("tiny", 2), ("other", 1)):
        target = copy_model(tiny_artifact.path, tmp_path, name, version)
        with (target / MODEL_FILE).open("ab") as handle:
            handle.write(b"\0")  # one byte appended: the graph may still load, the hash cannot
    caplog.set_level(logging.INFO, logger="service")
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        assert client.get("/health/ready").status_code == 200
        reasons = refused_reasons(client)
        assert sorted(reasons) == ["other/1", "tiny/2"]
        assert all(
            reason.startswith("sha256 mismatch: model.onnx is ") for reason in reasons.values()
        )
        assert [(m["name"], m["version"]) for m in client.get("/v1/models").json()["models"]] == [
            ("tiny", 1)
        ]
        # The newest *verified* version serves; the refused model is unknown, not broken.
        response = client.post("/v1/predict", content=digit_png, headers=PNG)
        assert response.status_code == 200 and response.json()["version"] == 1
        assert (
            client.post("/v1/models/other/predict", content=digit_png, headers=PNG).status_code
            == 404
        )
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        line.startswith("refused model other/1 from ") and "sha256 mismatch" in line
        for line in lines
    )


def test_newest_verified_version_serves_and_every_version_is_listed(
    tmp_path: Path, tiny_artifact: TinyArtifact, digit_png: bytes
) -> None:
    for version in (1, 3):
        copy_model(tiny_artifact.path, tmp_path, "tiny", version)
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        listed = client.get("/v1/models").json()["models"]
        assert [(m["version"], m["default"]) for m in listed] == [(1, False), (3, True)]
        assert client.post("/v1/predict", content=digit_png, headers=PNG).json()["version"] == 3
        one = client.post("/v1/models/tiny/versions/1/predict", content=digit_png, headers=PNG)
        assert one.json()["version"] == 1


def _edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("no_manifest", "manifest.json is missing"),
        ("bad_manifest", "manifest.json is invalid: "),
        ("wrong_name", "manifest says tiny/1, directory is broken/1"),
        ("no_model", "cannot read model.onnx: "),
        (
            "wrong_shape",
            "input 'images' has shape ['batch', 1, 28, 28], manifest says [batch, 1, 32, 32]",
        ),
    ],
)
def test_broken_model_is_refused_with_its_reason(
    tmp_path: Path, tiny_artifact: TinyArtifact, breakage: str, reason: str
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    broken = copy_model(tiny_artifact.path, tmp_path, "broken", 1)
    if breakage == "no_manifest":
        (broken / MANIFEST_FILE).unlink()
    elif breakage == "bad_manifest":
        (broken / MANIFEST_FILE).write_text("{not json")
    elif breakage == "wrong_name":
        _edit_manifest(broken, name="tiny")
    elif breakage == "no_model":
        (broken / MODEL_FILE).unlink()
    elif breakage == "wrong_shape":
        _edit_manifest(broken, input__height=32, input__width=32)
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        assert refused_reasons(client)["broken/1"].startswith(reason)
        assert client.get("/health/ready").status_code == 200


def test_corrupt_graph_with_matching_hash_is_refused(
    tmp_path: Path, tiny_artifact: TinyArtifact
) -> None:
    from models.manifest import sha256_file

    broken = copy_model(tiny_artifact.path, tmp_path, "broken", 1)
    (broken / MODEL_FILE).write_bytes(b"not a graph")
    _edit_manifest(broken, sha256=sha256_file(broken / MODEL_FILE))
    with started(Settings(model_dir=tmp_path, default_model="broken")) as client:
        wait_loaded(client)
        reason = refused_reasons(client)["broken/1"]
        assert reason.startswith("ONNX Runtime cannot load model.onnx: ")


def test_no_loadable_model_is_live_but_never_ready(tmp_path: Path) -> None:
    with started(Settings(model_dir=tmp_path)) as client:
        wait_loaded(client)
        assert client.get("/health/live").status_code == 200
        response = client.get("/health/ready")
        assert response.status_code == 503
        assert response.json() == {
            "error": {
                "status": 503,
                "code": "not_ready",
                # The open readiness endpoint names no filesystem path (the log does).
                "message": "no model could be loaded (see the server log)",
            }
        }


def test_cuda_provider_required_but_unavailable_is_refused(
    tmp_path: Path, tiny_artifact: TinyArtifact
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal path needs a CPU-only build")
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    with started(Settings(model_dir=tmp_path, default_model="tiny", providers="cuda")) as client:
        wait_loaded(client)
        assert refused_reasons(client)["tiny/1"].startswith("providers=cuda but this onnxruntime")


def test_repository_is_not_ready_before_loading(tmp_path: Path) -> None:
    repository = ModelRepository(Settings(model_dir=tmp_path))
    assert not repository.ready
    with pytest.raises(NotReady, match="models are still loading"):
        repository.get("tiny")
