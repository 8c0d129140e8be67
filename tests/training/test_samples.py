"""`rcegate samples` on the committed default model: it reproduces the committed clean digits
byte for byte and makes an adversarial digit (the project's BIM) the graph mislabels and
rejects; a request it cannot meet fails with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from models.manifest import Manifest
from rcegate.cli import app
from tests.conftest import DEFAULT_MODEL_DIR, ROOT
from training.samples import Graph, decode_png


def test_samples_regenerates_the_committed_clean_digits_and_a_rejected_adversarial(
    tmp_path: Path,
) -> None:
    out = tmp_path / "samples"
    result = CliRunner().invoke(
        app, ["samples", "--model", str(DEFAULT_MODEL_DIR), "--out", str(out), "--clean", "2"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "samples.json").read_text())
    assert record["command"].startswith(f"rcegate samples --model {DEFAULT_MODEL_DIR} ")
    clean = [s for s in record["samples"] if s["kind"] == "clean"]
    (adversarial,) = [s for s in record["samples"] if s["kind"] == "adversarial"]
    assert len(clean) == 2
    for sample in clean:
        committed = ROOT / "samples" / sample["file"]
        assert (out / sample["file"]).read_bytes() == committed.read_bytes()
    # judged again, from the PNG as written, by the exported graph itself
    graph = Graph(DEFAULT_MODEL_DIR, Manifest.load(DEFAULT_MODEL_DIR))
    label, score, accepted = graph.judge(decode_png((out / adversarial["file"]).read_bytes())[None])
    assert not accepted[0] and score[0] < graph.threshold
    assert label[0] == adversarial["label"] != adversarial["true_label"]
    assert adversarial["attack"]["name"] == "bim" and "rejected" in result.output


def test_samples_asking_for_more_classes_than_exist_fails_and_writes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "samples"
    args = ["samples", "--model", str(DEFAULT_MODEL_DIR), "--out", str(out), "--clean", "11"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "error: only 10 clean test digits are accepted; asked for 11" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
