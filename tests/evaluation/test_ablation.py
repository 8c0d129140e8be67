"""`rcegate ablation` end to end on a tiny budget: real training, calibration and attacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcegate.cli import app
from training.ablation import VARIANTS, AblationResults, Plan, render_report, reusable, verdicts
from training.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ablation")
    args = [
        "ablation", "--variants", "official,bank-100", "--depth", "8", "--steps", "4",
        "--images", "8", "--eps", "0,0.3", "--jobs", "1", "--threads", "1",
        "--work-dir", str(root / "runs"), "--out", str(root / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "runs", root / "out"


def test_variants_sharing_a_training_config_share_one_checkpoint(ablation) -> None:
    runs, out = ablation
    assert sorted(p.name for p in runs.glob("*.pt")) == [
        "mnist-5k-ce-d8-s4.pt",
        "mnist-5k-rce-d8-s4.pt",
    ]
    results = AblationResults.read(out / "results.json")
    assert set(results.variants) == {"official", "bank-100"}
    for objective in ("ce", "rce"):
        official = results.variants["official"].objectives[objective]
        small = results.variants["bank-100"].objectives[objective]
        assert official.checkpoint == small.checkpoint
        assert official.clean_accuracy == small.clean_accuracy  # same network
        assert small.bank_per_class == 100 < official.bank_per_class
        assert official.train_images == 4000 and official.steps == 4


def test_the_report_is_rendered_from_results_json(ablation) -> None:
    _, out = ablation
    results = AblationResults.read(out / "results.json")
    report = (out / "report.md").read_text()
    assert report == render_report(results)
    assert all(line in report for line in verdicts(results))
    assert (out / "robustness.png").stat().st_size > 1000
    for variant in results.variants.values():
        for r in variant.objectives.values():
            (clean, attacked) = r.robustness.curves["bim/pipeline"]
            assert (clean.eps, attacked.eps) == (0.0, 0.3)
            assert clean.success_rate == 0.0  # eps 0 changes no image
            assert 0.0 <= attacked.success_rate <= 1.0
            assert set(r.attacks) == {"fgsm", "bim", "illcm", "pgd"}


def test_a_checkpoint_is_reused_only_for_the_config_it_was_trained_with(ablation) -> None:
    runs, _ = ablation
    plan = Plan("mnist-5k", 8, 4, runs)
    config = plan.config(VARIANTS["official"], "rce")
    path = plan.checkpoint(config)
    assert reusable(path, config)
    assert not reusable(path, dataclasses.replace(config, seed=1))
    assert not reusable(path, dataclasses.replace(config, steps=8))
    assert plan.checkpoint(plan.config(VARIANTS["bn-eps"], "rce")).name.endswith("-bn-eps.pt")
    assert load_checkpoint(path)["config"]["revert"] == []


def test_verdicts_flip_with_the_evidence(ablation) -> None:
    _, out = ablation
    results = AblationResults.read(out / "results.json")
    official = results.variants["official"].objectives
    official["ce"].clean_accuracy, official["rce"].clean_accuracy = 0.99, 0.99
    assert "within 0.5 pp of CE: met" in verdicts(results)[0]
    official["rce"].clean_accuracy = 0.98
    assert "within 0.5 pp of CE: missed (-1.00 pp)" in verdicts(results)[0]


def test_unknown_variants_are_refused() -> None:
    result = CliRunner().invoke(app, ["ablation", "--variants", "official,bigger"])
    assert result.exit_code == 2 and "bigger" in result.output


def test_the_help_lists_every_variant_of_the_registry() -> None:
    result = CliRunner().invoke(app, ["ablation", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert all(name in text for name in VARIANTS), text
