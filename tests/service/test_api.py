"""The native v1 API over the tiny real artifact: predictions, decisions, modes, metadata."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from models.manifest import METRICS, MODEL_FILE, OUTPUT_NAMES, Manifest
from service.detector import Decision, Detector
from tests.conftest import TinyArtifact
from tests.service.conftest import encode


def run_onnx(artifact: TinyArtifact, images: np.ndarray) -> dict[str, np.ndarray]:
    """The artifact run directly in ONNX Runtime: uint8 [N, 28, 28] -> every output."""
    session = ort.InferenceSession(
        str(artifact.path / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    batch = (images.astype(np.float32) / 255.0)[:, None]
    return dict(zip(OUTPUT_NAMES, session.run(None, {"images": batch}), strict=True))


def test_predict_multipart_matches_onnx_runtime(
    client: TestClient, tiny_artifact: TinyArtifact, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images = digits[0][:8]
    files = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(images)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"], body["mode"]) == ("tiny", 1, "annotate")
    expected = run_onnx(tiny_artifact, images)
    manifest = Manifest.load(tiny_artifact.path)
    # One answer per posted image, in order: a dropped or extra prediction fails here.
    assert [r["index"] for r in body["predictions"]] == list(range(len(images))) == list(range(8))
    for i, result in enumerate(body["predictions"]):
        assert (result["index"], result["filename"]) == (i, f"{i}.png")
        assert result["label"] == int(expected["label"][i])
        assert result["class_name"] == manifest.class_names[result["label"]]
        np.testing.assert_allclose(result["probabilities"], expected["probabilities"][i], atol=1e-5)
        for metric in METRICS:
            assert result["scores"][metric] == pytest.approx(float(expected[metric][i]), abs=1e-4)
        # At the deployed target FPR the service's decision is the graph's own.
        assert result["accepted"] == bool(expected["accepted"][i])
        assert result["decision"] == {
            "metric": "log_kd",
            "score": result["scores"]["log_kd"],
            "threshold": manifest.detection.thresholds["log_kd"],
            "target_fpr": manifest.detection.target_fpr,
        }
        assert result["resized"] is False
        assert result["original_size"] == {"width": 28, "height": 28}


def test_predict_raw_png_body_on_named_and_versioned_routes(
    client: TestClient, digit_png: bytes
) -> None:
    headers = {"content-type": "image/png"}
    named = client.post("/v1/models/tiny/predict", content=digit_png, headers=headers)
    versioned = client.post(
        "/v1/models/tiny/versions/1/predict", content=digit_png, headers=headers
    )
    assert named.status_code == versioned.status_code == 200
    assert named.json()["predictions"][0]["filename"] is None
    assert named.json()["predictions"] == versioned.json()["predictions"]


@pytest.mark.parametrize(
    ("fmt", "media", "kwargs"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {"quality": 95}),
        ("BMP", "image/bmp", {}),
        ("GIF", "image/gif", {}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("TIFF", "image/tiff", {}),
    ],
)
def test_predict_decodes_every_supported_format(
    client: TestClient,
    digits: tuple[np.ndarray, np.ndarray],
    fmt: str,
    media: str,
    kwargs: dict[str, object],
) -> None:
    data = encode(digits[0][1], fmt, **kwargs)
    reference = client.post(
        "/v1/predict", content=encode(digits[0][1]), headers={"content-type": "image/png"}
    )
    response = client.post("/v1/predict", content=data, headers={"content-type": media})
    assert response.status_code == 200
    got, want = response.json()["predictions"][0], reference.json()["predictions"][0]
    tolerance = 0.05 if fmt == "JPEG" else 1e-6
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=tolerance)


def test_predict_converts_rgb_and_resizes_with_a_flag(client: TestClient) -> None:
    rgb = np.zeros((56, 40, 3), np.uint8)
    rgb[10:40, 15:25] = 255
    response = client.post("/v1/predict", files=[("files", ("big.png", encode(rgb), "image/png"))])
    assert response.status_code == 200
    result = response.json()["predictions"][0]
    assert result["resized"] is True
    assert result["original_size"] == {"width": 40, "height": 56}


def test_predict_target_fpr_picks_the_calibrated_threshold(
    client: TestClient, tiny_artifact: TinyArtifact, digit_png: bytes
) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    thresholds = {}
    for fpr in (0.01, 0.2, 0.5):
        response = client.post(
            f"/v1/predict?target_fpr={fpr}",
            content=digit_png,
            headers={"content-type": "image/png"},
        )
        assert response.status_code == 200
        result = response.json()["predictions"][0]
        decision = result["decision"]
        assert decision["target_fpr"] == fpr
        assert decision["threshold"] == pytest.approx(manifest.threshold("log_kd", fpr))
        assert result["accepted"] == (decision["score"] >= decision["threshold"])
        thresholds[fpr] = decision["threshold"]
    # A higher target FPR rejects more clean data: the threshold can only rise.
    assert thresholds[0.01] <= thresholds[0.2] <= thresholds[0.5]


def test_a_score_exactly_at_the_threshold_is_accepted(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """accepted = score >= threshold (the paper's test, STYLE.md's vocabulary): with each
    image's own score as the threshold it is accepted; one float32 step above, rejected."""
    detector = client.app.state.repository.get("tiny")  # type: ignore[attr-defined]
    outputs = detector.run((digits[0][:4].astype(np.float32) / 255.0)[:, None])
    scores = outputs.scores[detector.metric]
    for i, score in enumerate(scores):
        above = float(np.nextafter(score, np.float32(np.inf)))
        at_score = Detector.accept(outputs, Decision(detector.metric, float(score), 0.05))
        below_threshold = Detector.accept(outputs, Decision(detector.metric, above, 0.05))
        assert at_score[i] and not below_threshold[i], (i, score)
    assert len(set(scores.tolist())) > 1  # four distinct ties, not one score four times


def test_enforce_withholds_label_of_rejected_images_and_annotate_does_not(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    files = [
        ("files", ("digit.png", encode(digits[0][2]), "image/png")),
        ("files", ("noise.png", encode(noise), "image/png")),
    ]
    # target_fpr=0.5 accepts about half of clean data; the noise image must fall below it.
    annotate = client.post("/v1/predict?target_fpr=0.5&mode=annotate", files=files).json()
    enforce = client.post("/v1/predict?target_fpr=0.5&mode=enforce", files=files).json()
    assert enforce["mode"] == "enforce"
    rejected = [r for r in enforce["predictions"] if not r["accepted"]]
    assert rejected, "expected at least one rejected image"
    for shown, hidden in zip(annotate["predictions"], enforce["predictions"], strict=True):
        assert shown["accepted"] == hidden["accepted"]
        assert shown["label"] is not None and shown["probabilities"] is not None
        if hidden["accepted"]:
            assert hidden["label"] == shown["label"]
            assert hidden["probabilities"] == shown["probabilities"]
            assert shown["scores"] == hidden["scores"] and shown["decision"] == hidden["decision"]
        else:
            assert (hidden["label"], hidden["class_name"], hidden["probabilities"]) == (
                None,
                None,
                None,
            )
            # No score oracle (withhold_rejected, the default): only the verdict.
            assert hidden["scores"] is None
            assert hidden["decision"] == {**shown["decision"], "score": None, "threshold": None}


def test_mode_and_target_fpr_defaults_come_from_settings(make_client, digit_png: bytes) -> None:
    client = make_client(mode="enforce", target_fpr=0.3)
    body = client.post(
        "/v1/predict", content=digit_png, headers={"content-type": "image/png"}
    ).json()
    assert body["mode"] == "enforce"
    assert body["predictions"][0]["decision"]["target_fpr"] == 0.3
    info = client.get("/v1/models/tiny").json()
    assert info["detection"]["target_fpr"] == 0.3


def test_models_endpoints_report_manifest_metadata_and_providers(
    client: TestClient, tiny_artifact: TinyArtifact
) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    assert listing.json()["refused"] == []
    (info,) = listing.json()["models"]
    assert info == client.get("/v1/models/tiny").json()
    assert info == client.get("/v1/models/tiny/versions/1").json()
    assert (info["name"], info["version"], info["default"]) == ("tiny", 1, True)
    # CPU always; CUDA first on a machine where onnxruntime-gpu really loads it.
    assert info["providers"][-1] == "CPUExecutionProvider"
    assert info["class_names"] == manifest.class_names
    assert info["sha256"] == manifest.sha256
    assert info["input"] == {"channels": 1, "height": 28, "width": 28, "value_range": [0.0, 1.0]}
    assert info["detection"]["thresholds"] == manifest.detection.thresholds
    assert info["detection"]["target_fpr_range"] == list(
        manifest.detection.calibration_table.fpr_range
    )


def test_health_live_and_ready_after_self_test(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live", "detail": None}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "detail": "1 model version(s) loaded"}


def test_openapi_docs_describe_every_endpoint(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/predict",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/v1/models",
        "/v1/models/{name}",
        "/health/live",
        "/health/ready",
        "/metrics",
    ):
        assert path in paths
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body
    params = {p["name"] for p in paths["/v1/predict"]["post"]["parameters"]}
    assert params == {"target_fpr", "mode"}


def test_inference_runs_off_the_event_loop(
    client: TestClient, digit_png: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = client.app.state.repository.get("tiny")  # type: ignore[attr-defined]
    running, release = threading.Event(), threading.Event()
    original = detector.run_arrays

    def held(images: np.ndarray) -> object:
        running.set()
        release.wait(30)
        return original(images)

    monkeypatch.setattr(detector, "run_arrays", held)
    with ThreadPoolExecutor(2) as pool:
        headers = {"content-type": "image/png"}
        prediction = pool.submit(client.post, "/v1/predict", content=digit_png, headers=headers)
        try:
            assert running.wait(30)
            # ONNX Runtime is held inside a request; the event loop still answers others.
            assert pool.submit(client.get, "/health/live").result(timeout=10).status_code == 200
        finally:
            release.set()
        assert prediction.result(timeout=30).status_code == 200


def test_small_images_decode_the_same_on_the_event_loop_and_in_the_pool(
    make_client: Callable[..., TestClient], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pngs = [encode(image) for image in digits[0][:3]]
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    inline = make_client()  # 28x28 digits are under the inline limit of 4096 pixels
    pooled = make_client(inline_decode_pixels=0)
    answers = [c.post("/v1/predict", files=files).json()["predictions"] for c in (inline, pooled)]
    assert len(answers[0]) == 3
    assert answers[0] == answers[1]
    decoded = [
        c.get("/metrics").text.count("rcegate_decode_duration_seconds_count 3.0")
        for c in (inline, pooled)
    ]
    assert decoded == [1, 1]  # both paths decode and time every image
    pools = [c.app.state.plane._decode_pool._threads for c in (inline, pooled)]  # type: ignore[attr-defined]
    assert [len(p) > 0 for p in pools] == [False, True]  # the pool started only when used
