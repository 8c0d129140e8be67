"""The Prometheus exposition after a few requests: the agreed series with the right counts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from models.manifest import Manifest
from tests.conftest import TinyArtifact
from tests.service.conftest import encode

PNG = {"content-type": "image/png"}


def samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(data: dict, name: str, **labels: str) -> float:
    return data.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_images_requests_and_batches(
    make_client: Callable[..., TestClient],
    tiny_artifact: TinyArtifact,
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    client = make_client()
    manifest = Manifest.load(tiny_artifact.path)
    files = [
        ("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(digits[0][:3])
    ]
    answers = [client.post("/v1/predict", files=files).json() for _ in range(2)]
    single = client.post("/v1/models/tiny/predict", content=encode(digits[0][5]), headers=PNG)
    answers.append(single.json())
    assert client.post("/v1/predict", content=b"junk", headers=PNG).status_code == 400
    assert client.get("/v1/models/nope").status_code == 404

    data = samples(client)
    # Images by decision and predicted class, exactly as answered.
    expected: dict[tuple[str, str], int] = {}
    for answer in answers:
        for result in answer["predictions"]:
            key = ("accepted" if result["accepted"] else "rejected", result["class_name"])
            expected[key] = expected.get(key, 0) + 1
    for (decision, cls), count in expected.items():
        labels = {"model": "tiny", "version": "1", "decision": decision, "predicted_class": cls}
        assert value(data, "rcegate_images_total", **labels) == count
    for metric in ("confidence", "non_me", "log_kd"):
        labels = {"model": "tiny", "metric": metric}
        assert value(data, "rcegate_detection_score_count", **labels) == 7
        assert value(data, "rcegate_threshold", **labels) == manifest.detection.thresholds[metric]
    assert value(data, "rcegate_target_fpr", model="tiny") == manifest.detection.target_fpr
    assert value(data, "rcegate_batch_size_count", model="tiny") == 3
    assert value(data, "rcegate_batch_size_sum", model="tiny") == 7
    assert value(data, "rcegate_inference_duration_seconds_count", model="tiny") == 3
    # Decoding counts every image it finished, including none of the junk one.
    assert value(data, "rcegate_decode_duration_seconds_count") == 7
    info = {
        "model": "tiny",
        "version": "1",
        "providers": ",".join(client.get("/v1/models/tiny").json()["providers"]),
        "metric": "log_kd",
    }
    assert value(data, "rcegate_model_info", **info) == 1
    # HTTP series are labelled by route template, never by the raw path.
    http = "rcegate_http_requests_total"
    assert value(data, http, route="/v1/predict", method="POST", status="200") == 2
    assert value(data, http, route="/v1/predict", method="POST", status="400") == 1
    assert value(data, http, route="/v1/models/{name}/predict", method="POST", status="200") == 1
    assert value(data, http, route="/v1/models/{name}", method="GET", status="404") == 1
    assert not any("nope" in dict(labels).get("route", "") for _, labels in data)
    duration = "rcegate_http_request_duration_seconds_count"
    assert value(data, duration, route="/v1/predict", method="POST") == 3
    # This scrape itself is in flight while the exposition is rendered.
    assert value(data, "rcegate_requests_in_flight") == 1


def test_served_score_histogram_has_an_edge_on_every_calibrated_threshold(
    tiny_artifact: TinyArtifact, client: TestClient, digit_png: bytes
) -> None:
    """The registered histogram's own buckets, as scraped: `bucket{le=T} / count` reads as the
    rejection rate at T only if T is an edge."""
    answer = client.post("/v1/models/tiny/predict", content=digit_png, headers=PNG).json()
    scores = answer["predictions"][0]["scores"]
    response = client.get("/metrics")
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name == "rcegate_detection_score_bucket" and s.labels["model"] == "tiny":
                buckets.setdefault(s.labels["metric"], {})[float(s.labels["le"])] = s.value
    manifest = Manifest.load(tiny_artifact.path)
    table = manifest.detection.calibration_table
    assert sorted(buckets) == sorted(manifest.detection.thresholds)
    for metric, threshold in manifest.detection.thresholds.items():
        edges = buckets[metric]
        # Edges are rendered from 6 significant digits (equal-looking edges would collide).
        for fpr_threshold in (
            threshold,
            table.threshold(metric, 0.01),
            table.threshold(metric, 0.1),
        ):
            assert float(f"{fpr_threshold:.6g}") in edges, (metric, fpr_threshold, sorted(edges))
        assert {-1000.0, 0.0, 1.0, float("inf")} <= set(edges)
        # One observation: every edge at or above its score counts it, every edge below not.
        for edge, count in edges.items():
            assert count == (1.0 if scores[metric] <= edge else 0.0), (metric, edge, count)
