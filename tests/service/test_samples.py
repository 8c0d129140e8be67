"""The committed sample images (samples/, written by `rcegate samples`) against the committed
default model, through the service: the README's examples show exactly these outcomes."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT

SAMPLES = ROOT / "samples"
RECORD = json.loads((SAMPLES / "samples.json").read_text())


def test_the_samples_were_made_with_the_model_the_service_serves_by_default(
    default_client: TestClient,
) -> None:
    served = default_client.get("/v1/models/mnist-rce").json()
    assert (RECORD["model"], RECORD["version"], RECORD["sha256"]) == (
        served["name"],
        served["version"],
        served["sha256"],
    ), "the default model changed: regenerate with the command in samples/samples.json"


def test_the_samples_hold_clean_digits_and_an_adversarial_one() -> None:
    kinds = [s["kind"] for s in RECORD["samples"]]
    assert kinds.count("clean") >= 2 and kinds.count("adversarial") >= 1
    assert sorted(p.name for p in SAMPLES.glob("*.png")) == sorted(
        s["file"] for s in RECORD["samples"]
    )


@pytest.mark.parametrize("sample", RECORD["samples"], ids=lambda s: s["file"])
def test_the_service_answers_each_sample_as_recorded(
    default_client: TestClient, sample: dict[str, object]
) -> None:
    body = (SAMPLES / str(sample["file"])).read_bytes()
    response = default_client.post(
        "/v1/predict", content=body, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    (prediction,) = response.json()["predictions"]
    assert prediction["label"] == sample["label"]
    assert prediction["accepted"] is sample["accepted"]
    assert prediction["decision"]["score"] == pytest.approx(sample["score"], abs=1e-3)
    if sample["kind"] == "clean":
        assert prediction["accepted"] and prediction["label"] == sample["true_label"]
    else:
        assert not prediction["accepted"] and prediction["label"] != sample["true_label"]
