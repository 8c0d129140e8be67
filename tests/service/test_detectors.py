"""The scores beyond the paper as served: Mahalanobis and the combined decision per request, the
default metric from the manifest, their constants refused when missing, non-finite or edited,
and artifacts from before them still served."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.manifest import MANIFEST_FILE, PAPER_METRICS, Manifest
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR, TinyArtifact
from tests.service.conftest import copy_model, encode, started, wait_loaded

PNG = {"content-type": "image/png"}


def _predict(client: TestClient, png: bytes, query: str = "") -> Any:
    return client.post(f"/v1/predict{query}", content=png, headers=PNG)


def test_each_metric_is_served_per_request_at_its_calibrated_threshold(
    client: TestClient, tiny_artifact: TinyArtifact, digit_png: bytes
) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    assert manifest.metrics == ("confidence", "non_me", "log_kd", "mahalanobis", "combined")
    default = _predict(client, digit_png).json()["predictions"][0]
    assert default["decision"]["metric"] == manifest.detection.default_metric
    for metric in manifest.metrics:
        response = _predict(client, digit_png, f"?metric={metric}")
        assert response.status_code == 200, response.text
        result = response.json()["predictions"][0]
        assert result["scores"] == default["scores"]  # the graph ran the same way
        assert result["decision"] == {
            "metric": metric,
            "score": result["scores"][metric],
            "threshold": manifest.detection.thresholds[metric],
            "target_fpr": manifest.detection.target_fpr,
        }
        assert result["accepted"] == (result["scores"][metric] >= result["decision"]["threshold"])
    at_half = _predict(client, digit_png, "?metric=mahalanobis&target_fpr=0.5").json()
    assert at_half["predictions"][0]["decision"]["threshold"] == pytest.approx(
        manifest.threshold("mahalanobis", 0.5)
    )
    assert _predict(client, digit_png, "?metric=kd").status_code == 422


def test_a_client_held_to_enforce_is_judged_by_the_default_metric_only(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(mode="enforce")  # clients are held to enforce: annotate not permitted
    refused = _predict(client, digit_png, "?metric=confidence")
    assert refused.status_code == 403
    assert refused.json() == {
        "error": {
            "status": 403,
            "code": "forbidden",
            "message": "metric confidence is not permitted for this client: it is judged by "
            "the model's default metric, log_kd",
        }
    }
    assert _predict(client, digit_png, "?metric=log_kd").status_code == 200
    # The operator may let clients choose (as looser target FPRs), and a deployment in
    # annotate mode lets them see everything anyway: any metric the model computes.
    loose = make_client(mode="enforce", client_looser_target_fpr=True)
    assert _predict(loose, digit_png, "?metric=confidence").status_code == 200
    annotate = make_client(mode="annotate")
    assert _predict(annotate, digit_png, "?metric=confidence&mode=enforce").status_code == 200


def test_the_default_model_decides_with_the_combined_metric_of_its_manifest(
    default_client: TestClient, default_test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    assert manifest.detection.default_metric == "combined"
    combined = manifest.detection.combined
    assert combined is not None and combined.metrics == ["log_kd", "mahalanobis"]
    info = default_client.get(f"/v1/models/{manifest.name}").json()["detection"]
    assert info["default_metric"] == "combined"
    assert info["metrics"] == list(manifest.metrics)
    assert info["combined_metrics"] == ["log_kd", "mahalanobis"]
    files = [("files", (f"{i}.png", encode(d), "image/png")) for i, d in enumerate(
        default_test_digits[0][:16]
    )]  # fmt: skip
    body = default_client.post("/v1/predict", files=files).json()
    for result in body["predictions"]:
        decision = result["decision"]
        assert decision["metric"] == "combined"
        assert decision["threshold"] == manifest.detection.thresholds["combined"]
        # The union: rejected iff K-density or Mahalanobis is below its clean quantile.
        each = [
            result["scores"][m] < combined.component_threshold(m, decision["threshold"])
            for m in combined.metrics
        ]
        assert result["accepted"] == (not any(each)) or math.isclose(
            decision["score"], decision["threshold"], abs_tol=1e-5
        )
    # No query string: the fast path past FastAPI's routing, named or not, decides with the
    # manifest's default; a query's metric goes through the routes and decides instead.
    named = default_client.post(f"/v1/models/{manifest.name}/predict", files=files[:2]).json()
    assert [r["decision"]["metric"] for r in named["predictions"]] == ["combined"] * 2
    chosen = default_client.post("/v1/predict?metric=log_kd", files=files[:2]).json()
    assert [r["decision"] for r in chosen["predictions"]] == [
        {
            "metric": "log_kd",
            "score": r["scores"]["log_kd"],
            "threshold": manifest.detection.thresholds["log_kd"],
            "target_fpr": manifest.detection.target_fpr,
        }
        for r in body["predictions"][:2]
    ]


@pytest.fixture(scope="module")
def paper_only(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: TinyArtifact) -> Path:
    """The tiny checkpoint exported with the paper's three scores only: an artifact as made
    before the Mahalanobis and combined scores (schema 1 manifests look the same)."""
    from training.calibrate import calibrate
    from training.checkpoints import load_trained_model
    from training.export import export_artifact

    model, config, dataset = load_trained_model(tiny_artifact.checkpoint)
    result = calibrate(
        model, config.objective, dataset, 0.05, 50, default_metric="log_kd",
        mahalanobis_layers=(), combine=(),
    )  # fmt: skip
    root = tmp_path_factory.mktemp("paper-only") / "models"
    return export_artifact(model, config, dataset, result, root, "paper", 1, force=True)


def test_an_artifact_without_the_new_scores_is_served_and_refuses_them(
    paper_only: Path, digit_png: bytes
) -> None:
    manifest = json.loads((paper_only / MANIFEST_FILE).read_text())
    assert "mahalanobis" not in manifest["outputs"] and manifest["detection"]["combined"] is None
    settings = Settings(model_dir=paper_only.parent.parent, default_model="paper")
    with started(settings) as client:
        wait_loaded(client)
        info = client.get("/v1/models/paper").json()["detection"]
        assert (info["metrics"], info["combined_metrics"]) == (list(PAPER_METRICS), None)
        result = _predict(client, digit_png).json()["predictions"][0]
        assert result["decision"]["metric"] == "log_kd"
        assert result["scores"]["mahalanobis"] is None and result["scores"]["combined"] is None
        refused = _predict(client, digit_png, "?metric=mahalanobis")
        assert refused.status_code == 422
        assert refused.json()["error"]["message"] == (
            "metric: model paper computes confidence, non_me, log_kd; got 'mahalanobis'"
        )
        scraped = client.get("/metrics").text
        assert 'rcegate_detection_score_count{metric="log_kd",model="paper"} 1.0' in scraped
        assert 'metric="mahalanobis"' not in scraped


def _edit(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))  # NaN and Infinity as JSON's common extension


def _first_layer(data: dict[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = data["detection"]["mahalanobis"]["layers"][0]
    return layer


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda d: d["detection"].update(mahalanobis=None),
            "detection.mahalanobis must be given iff mahalanobis is an output",
        ),
        (lambda d: _first_layer(d)["precision"][0].__setitem__(0, math.nan), "finite number"),
        (lambda d: _first_layer(d).update(centre=math.inf), "finite number"),
        (lambda d: _first_layer(d)["means"].pop(), "one mean per class"),
        (
            lambda d: d["detection"]["combined"]["knots"]["log_kd"].__setitem__(0, -math.inf),
            "finite number",
        ),
        (
            lambda d: _first_layer(d)["precision"][0].__setitem__(0, 1.5),
            "manifest disagrees with the graph's bound detection.mahalanobis",
        ),
    ],
    ids=["missing", "nan-precision", "infinite-centre", "missing-mean", "infinite-knot", "edited"],
)
def test_a_manifest_with_a_missing_non_finite_or_edited_mahalanobis_constant_is_refused(
    tmp_path: Path,
    tiny_artifact: TinyArtifact,
    edit: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    copy_model(tiny_artifact.path, tmp_path, "tiny", 1)
    broken = copy_model(tiny_artifact.path, tmp_path, "broken", 1)
    _edit(broken, edit)
    with started(Settings(model_dir=tmp_path, default_model="tiny")) as client:
        wait_loaded(client)
        (refused,) = client.get("/v1/models").json()["refused"]
        assert refused["name"] == "broken"
        assert reason in refused["reason"], refused["reason"]
        assert client.get("/health/ready").status_code == 200  # the good copy keeps serving


def test_oip_infer_takes_the_metric_parameter(
    client: TestClient, tiny_artifact: TinyArtifact
) -> None:
    pixels = np.zeros((1, 1, 28, 28), np.float32).ravel().tolist()
    document = {
        "inputs": [{"name": "images", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": pixels}],
        "parameters": {"metric": "mahalanobis"},
    }
    body = client.post("/v2/models/tiny/infer", json=document).json()
    assert body["parameters"]["metric"] == "mahalanobis"
    manifest = Manifest.load(tiny_artifact.path)
    assert body["parameters"]["threshold"] == manifest.detection.thresholds["mahalanobis"]
    assert [o["name"] for o in body["outputs"]] == manifest.outputs
    document["parameters"] = {"metric": "lid"}
    assert client.post("/v2/models/tiny/infer", json=document).status_code == 400
    config = client.get("/v2/models/tiny/config").json()
    assert config["parameters"]["rcegate.metrics"]["string_value"] == ",".join(manifest.metrics)
