"""The API page's predict example: the files the docs' curl commands name exist, and the service
answers the first command with the JSON docs/api.md shows (figures as rounded there)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ROOT

API = (ROOT / "docs" / "api.md").read_text()
TEXTS = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]


def example() -> dict[str, object]:
    block = re.search(r"<!-- output -->\n```json\n(\{\"model\".*?)```", API, re.S)
    assert block is not None, "docs/api.md lost its predict example"
    shown: dict[str, object] = json.loads(block[1])
    return shown


def test_the_curl_examples_name_files_of_the_checkout() -> None:
    named = [path for text in TEXTS for path in re.findall(r"@(samples/[\w.-]+)", text)]
    assert "samples/clean-7.png" in named and "samples/adversarial-5.png" in named
    for path in named:
        assert (ROOT / path).is_file(), path


def test_the_service_answers_the_readme_example_as_shown(default_client: TestClient) -> None:
    shown = example()
    files = [
        ("files", (p["filename"], (ROOT / "samples" / p["filename"]).read_bytes(), "image/png"))
        for p in shown["predictions"]  # type: ignore[attr-defined]
    ]
    answer = default_client.post("/v1/predict", files=files).json()
    assert (answer["model"], answer["version"], answer["mode"]) == (
        shown["model"],
        shown["version"],
        shown["mode"],
    )
    verdicts = [p["accepted"] for p in answer["predictions"]]
    assert verdicts == [True, False]  # one accept, one reject
    for got, want in zip(answer["predictions"], shown["predictions"], strict=True):  # type: ignore[call-overload]
        for key in ("index", "filename", "label", "class_name", "accepted", "resized"):
            assert got[key] == want[key], key
        assert got["decision"] == pytest.approx(want["decision"], abs=1e-4)
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
