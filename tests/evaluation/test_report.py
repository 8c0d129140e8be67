"""End to end on the small models: evaluate -> results.json -> report.md and PNGs."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from service.cli import app
from training.attacks import AttackSettings
from training.calibrate import Calibration
from training.evaluate import EvaluationError, evaluate, load_model_under_test
from training.plots import write_figures
from training.report import (
    EvaluationResults,
    read_results,
    render_report,
    write_report,
    write_results,
)

FAST = AttackSettings(cw_binary_steps=1, cw_max_iter=5, pgd_steps=5, jsma_gamma=0.02)


@pytest.fixture(scope="module")
def evaluation(small_models):
    models = [load_model_under_test(m.artifact, m.checkpoint) for m in small_models.values()]
    return evaluate(models, ("fgsm", "pgd", "pgd-adaptive", "cw-wb"), 16, 8, FAST, seed=0)


def test_results_json_round_trips(evaluation, tmp_path):
    path = write_results(evaluation.results, tmp_path)
    assert read_results(path) == evaluation.results
    assert json.loads(path.read_text())["schema_version"] == 1


def test_results_cover_every_model_attack_and_metric(evaluation):
    results = evaluation.results
    assert set(results.models) == {"ce", "rce"}
    for model in results.models.values():
        assert set(model.attacks) == {"fgsm", "pgd", "pgd-adaptive", "cw-wb"}
        assert model.attacks["fgsm"].images == 16 and model.attacks["cw-wb"].images == 8
        for attack in model.attacks.values():
            assert set(attack.metrics) == {"confidence", "non_me", "log_kd"}
            assert attack.kept <= attack.clean_correct <= attack.images
            assert attack.onnx_label_agreement is not None
            if attack.kept:
                assert 0.0 <= attack.metrics["log_kd"].roc_auc <= 1.0
        assert model.onnx_max_abs_error["log_kd"] < 1e-2


def test_report_has_the_paper_tables_and_figures(evaluation, tmp_path):
    write_results(evaluation.results, tmp_path)
    report = write_report(evaluation.results, tmp_path).read_text()
    assert "Table 2 analogue" in report and "Table 3 analogue" in report
    assert "| FGSM | CE |" in report and "| FGSM | RCE |" in report
    assert "Seconds / image" in report
    figures = write_figures(evaluation.results, evaluation.scores, tmp_path)
    assert {p.name for p in figures} == {"roc-ce.png", "hist-ce.png", "roc-rce.png", "hist-rce.png"}
    assert all(p.stat().st_size > 1000 for p in figures)
    # The report is a pure function of results.json.
    assert render_report(read_results(tmp_path / "results.json")) + "\n" == report


def test_results_schema_is_published():
    schema = EvaluationResults.model_json_schema()
    assert "models" in schema["properties"]


def test_a_calibration_that_does_not_match_the_artifact_is_refused(small_models, tmp_path):
    model = small_models["rce"]
    calibration = Calibration.load(model.calibration)
    shifted = dict(calibration.thresholds, log_kd=calibration.thresholds["log_kd"] + 1.0)
    wrong = tmp_path / "wrong.calibration.pt"
    Calibration(**{**calibration.__dict__, "thresholds": shifted}).save(wrong)
    with pytest.raises(EvaluationError, match="differs from the artifact"):
        load_model_under_test(model.artifact, model.checkpoint, wrong)


def test_a_checkpoint_that_does_not_reproduce_the_onnx_graph_is_refused(small_models, tmp_path):
    model = small_models["ce"]
    payload = torch.load(model.checkpoint, weights_only=True)
    payload["model"]["fc.bias"] = payload["model"]["fc.bias"] + 5 * torch.arange(10.0)
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(EvaluationError, match="disagree"):
        load_model_under_test(model.artifact, tampered, model.calibration)


def test_models_with_the_same_objective_are_refused(small_models):
    model = small_models["ce"]
    loaded = load_model_under_test(model.artifact, model.checkpoint)
    with pytest.raises(EvaluationError, match="one model per objective"):
        evaluate([loaded, loaded], ("fgsm",), 4, 4, FAST)


def test_evaluate_command_writes_the_report(small_models, tmp_path):
    ce, rce = small_models["ce"], small_models["rce"]
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--artifact", str(ce.artifact), "--checkpoint", str(ce.checkpoint),
            "--artifact", str(rce.artifact), "--checkpoint", str(rce.checkpoint),
            "--out", str(tmp_path), "--attacks", "fgsm,bim", "--images", "8",
            "--cost-repeats", "1", "--cost-images", "64",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = read_results(tmp_path / "results.json")
    cost = results.training_cost
    assert cost is not None and cost.repeats == 1 and cost.images == 64
    assert cost.ratio == pytest.approx(cost.rce_median_seconds / cost.ce_median_seconds)
    assert "Training cost: RCE vs CE" in (tmp_path / "report.md").read_text()
    assert set(results.models["rce"].attacks) == {"fgsm", "bim"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "roc-rce.png").is_file()
    assert np.isclose(results.settings["eps"], 0.1)


def test_report_command_rerenders_and_records_the_training_cost(evaluation, tmp_path):
    write_results(evaluation.results, tmp_path)
    assert evaluation.results.training_cost is None
    result = CliRunner().invoke(
        app,
        [
            "report", str(tmp_path / "results.json"),
            "--cost-repeats", "2", "--cost-images", "64", "--cost-depth", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = read_results(tmp_path / "results.json")
    assert results.models == evaluation.results.models
    cost = results.training_cost
    assert cost is not None and cost.depth == 8
    assert len(cost.rce_epoch_seconds) == len(cost.ce_epoch_seconds) == 2
    assert all(t > 0 for t in cost.rce_epoch_seconds + cost.ce_epoch_seconds)
    report = (tmp_path / "report.md").read_text()
    assert f"Ratio RCE / CE: **{cost.ratio:.3f}**" in report
    assert render_report(results) + "\n" == report
