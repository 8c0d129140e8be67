"""End to end on the small models: evaluate -> results.json -> report.md and PNGs."""

import json
import statistics
from dataclasses import replace

import jsonschema
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from models.manifest import METRICS
from rcegate.cli import app
from tests.conftest import ROOT
from training.attacks import AttackSettings
from training.calibrate import Calibration
from training.data import load_mnist_5k
from training.evaluate import (
    EvaluationError,
    attack_result,
    evaluate,
    load_model_under_test,
    roc_auc,
)
from training.plots import write_figures
from training.report import render_report, write_report
from training.results import (
    AttackResult,
    Distortion,
    EvaluationResults,
    MetricResult,
)

FAST = AttackSettings(cw_binary_steps=1, cw_max_iter=5, pgd_steps=5, jsma_gamma=0.02)


@pytest.fixture(scope="module")
def evaluation(small_models):
    models = [load_model_under_test(m.artifact, m.checkpoint) for m in small_models.values()]
    return evaluate(models, ("fgsm", "pgd", "pgd-adaptive", "cw-wb"), 16, 8, FAST, seed=0)


def test_results_json_round_trips(evaluation, tmp_path):
    path = evaluation.results.write(tmp_path)
    assert EvaluationResults.read(path) == evaluation.results
    assert json.loads(path.read_text())["schema_version"] == 1


def test_results_cover_every_model_attack_and_metric(evaluation):
    results = evaluation.results
    assert set(results.models) == {"ce", "rce"}
    for objective, model in results.models.items():
        assert set(model.attacks) == {"fgsm", "pgd", "pgd-adaptive", "cw-wb"}
        assert model.attacks["fgsm"].images == 16 and model.attacks["cw-wb"].images == 8
        for name, attack in model.attacks.items():
            assert set(attack.metrics) == set(METRICS)  # the paper's, Mahalanobis, combined
            assert attack.kept <= attack.clean_correct <= attack.images
            assert attack.success_rate == attack.kept / max(attack.clean_correct, 1)
            scores = evaluation.scores[objective][name]
            for metric, figures in attack.metrics.items():
                normal, adversarial = scores.normal[metric], scores.adversarial[metric]
                assert len(normal) == len(adversarial) == attack.kept
                assert figures.threshold == model.thresholds[metric]
                if not attack.kept:
                    assert figures.roc_auc is None and figures.detection_rate is None
                    continue
                # Every figure follows from the kept pairs' scores and the threshold.
                assert figures.roc_auc == roc_auc(normal, adversarial)
                assert figures.detection_rate == float((adversarial < figures.threshold).mean())
                assert figures.clean_rejection_rate == float((normal < figures.threshold).mean())
        assert model.onnx_max_abs_error["log_kd"] < 1e-2


def test_report_has_the_paper_tables_and_figures(evaluation, tmp_path):
    evaluation.results.write(tmp_path)
    report = write_report(render_report(evaluation.results), tmp_path).read_text()
    assert "Table 2 analogue" in report and "Table 3 analogue" in report
    assert "| FGSM | CE |" in report and "| FGSM | RCE |" in report
    assert "Seconds / image" in report
    figures = write_figures(evaluation.results, evaluation.scores, tmp_path)
    assert {p.name for p in figures} == {"roc-ce.png", "hist-ce.png", "roc-rce.png", "hist-rce.png"}
    assert all(p.stat().st_size > 1000 for p in figures)
    # The report is a pure function of results.json.
    assert render_report(EvaluationResults.read(tmp_path / "results.json")) == report


COMMITTED_RESULTS = [
    ROOT / "reports" / name / "results.json" for name in ("mnist-5k", "fashion-mnist")
]


def _required(schema: dict, name: str) -> set[str]:
    return set(schema["$defs"][name]["required"]) if name in schema["$defs"] else set()


def test_results_schema_requires_every_documented_field_and_forbids_others():
    schema = EvaluationResults.model_json_schema()
    assert set(schema["required"]) == {
        "dataset", "created_at", "source_commit", "seed", "images_fast", "images_slow",
        "slow_attacks", "settings", "torch_threads", "models",
    }  # fmt: skip
    assert set(schema["properties"]) == set(schema["required"]) | {
        "schema_version",
        "training_cost",
    }
    assert _required(schema, "AttackResult") == {
        "params", "images", "clean_correct", "kept", "success_rate", "targeted_success_rate",
        "undetected_success_rate", "distortion", "seconds_per_image", "onnx_label_agreement",
        "metrics",
    }  # fmt: skip
    assert _required(schema, "MetricResult") == {
        "roc_auc", "detection_rate", "clean_rejection_rate", "accuracy_on_accepted",
        "accepted_fraction", "threshold",
    }  # fmt: skip
    assert _required(schema, "Distortion") == {"l2", "linf", "l2_max", "linf_max"}
    assert all(d.get("additionalProperties") is False for d in schema["$defs"].values())
    assert schema["additionalProperties"] is False
    # Figures that have no value without kept pairs are nullable; the others are not.
    metric = schema["$defs"]["MetricResult"]["properties"]
    assert {"type": "null"} in metric["roc_auc"]["anyOf"]
    assert metric["accepted_fraction"]["type"] == "number"
    assert schema["$defs"]["AttackResult"]["properties"]["kept"]["type"] == "integer"


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.parent.name)
def test_committed_results_validate_against_the_published_schema(path):
    document = json.loads(path.read_text())
    jsonschema.validate(document, EvaluationResults.model_json_schema())
    results = EvaluationResults.read(path)
    assert EvaluationResults.model_validate_json(results.model_dump_json()) == results


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d["models"]["rce"]["attacks"]["fgsm"].pop("kept"),
        lambda d: d.__setitem__("seed", "zero"),
        lambda d: d["models"]["ce"]["attacks"]["fgsm"]["metrics"]["log_kd"].__setitem__(
            "accepted_fraction", None
        ),
        lambda d: d["models"]["ce"].__setitem__("checkpoint", "runs/x.pt"),
        lambda d: d.__setitem__("notes", "added by hand"),
    ],
    ids=[
        "missing-field",
        "wrong-type",
        "null-where-not-nullable",
        "unknown-field",
        "unknown-top-level-field",
    ],
)
def test_schema_and_reader_refuse_a_malformed_results_file(corrupt):
    document = json.loads(COMMITTED_RESULTS[0].read_text())
    jsonschema.validate(document, EvaluationResults.model_json_schema())
    corrupt(document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, EvaluationResults.model_json_schema())
    with pytest.raises(ValidationError):
        EvaluationResults.model_validate(document)


def test_attack_result_figures_match_a_hand_computation():
    # Four attacked images: 0-2 classified correctly when clean; the attack flips 0 and 2
    # (kept), leaves 1 correct, and image 3 was already wrong (never kept).
    labels = np.array([0, 1, 2, 3])
    clean = {"label": np.array([0, 1, 2, 0]),
             "confidence": np.array([0.9, 0.8, 0.7, 0.6]),
             "non_me": np.array([2.0, 1.0, 1.5, 0.5]),
             "log_kd": np.array([-1.0, -2.0, -0.5, -3.0])}  # fmt: skip
    adv = {"label": np.array([1, 1, 0, 2]),
           "confidence": np.array([0.7, 0.5, 0.4, 0.3]),
           "non_me": np.array([0.2, 2.1, 1.0, 0.1]),
           "log_kd": np.array([-4.0, -1.5, -0.75, -5.0])}  # fmt: skip
    thresholds = {"confidence": 0.65, "non_me": 1.2, "log_kd": -1.75}
    images = np.zeros((4, 1, 2, 2), np.float32)
    adversarial = images + np.array(
        [[0.375, 0.5, 0, 0], [0, 0, 0, 0], [0.75, 0, 0, 1.0], [1, 1, 1, 1]], np.float32
    ).reshape(4, 1, 2, 2)
    result, scores = attack_result(
        "cw-l2", labels, images, adversarial, clean, adv, thresholds, "log_kd", seconds=2.0,
        targets=np.array([1, 2, 0, 1]), params={"kappa": 0.0}, onnx_label_agreement=1.0,
    )  # fmt: skip
    # Kept pairs (0, 2). log_kd: normal (-1, -0.5) vs adversarial (-4, -0.75): 3 of 4 pairs
    # ordered, AUC 3/4; -4 is below -1.75, -0.75 is not: detection 1/2. Mixed set (4 clean, 4
    # adversarial) accepted at -1.75: clean 0, 2 (correct), adversarial 1 (correct), 2 (wrong).
    # confidence: normal (0.9, 0.7) vs (0.7, 0.4): 3 ordered + 1 tie, AUC 3.5/4 = 0.875.
    # non_me: normal (2, 1.5) vs (0.2, 1): AUC 1, both adversarial rejected; accepted: clean 0,
    # 2 and adversarial 1, all correct.
    expected = AttackResult(
        params={"kappa": 0.0},
        images=4,
        clean_correct=3,
        kept=2,
        success_rate=2 / 3,
        targeted_success_rate=2 / 3,  # images 0 and 2 reached targets 1 and 0; image 1 did not
        undetected_success_rate=1 / 3,  # only kept image 2 is accepted by log_kd
        distortion=Distortion(
            l2=(0.625 + 1.25) / 2, linf=(0.5 + 1.0) / 2, l2_max=2.0, linf_max=1.0
        ),
        seconds_per_image=0.5,
        onnx_label_agreement=1.0,
        metrics={
            "confidence": MetricResult(
                roc_auc=0.875, detection_rate=0.5, clean_rejection_rate=0.0,
                accuracy_on_accepted=0.75, accepted_fraction=0.5, threshold=0.65,
            ),
            "non_me": MetricResult(
                roc_auc=1.0, detection_rate=1.0, clean_rejection_rate=0.0,
                accuracy_on_accepted=1.0, accepted_fraction=0.375, threshold=1.2,
            ),
            "log_kd": MetricResult(
                roc_auc=0.75, detection_rate=0.5, clean_rejection_rate=0.0,
                accuracy_on_accepted=0.75, accepted_fraction=0.5, threshold=-1.75,
            ),
        },
    )  # fmt: skip
    assert result == expected
    assert scores.normal["log_kd"].tolist() == [-1.0, -0.5]
    assert scores.adversarial["log_kd"].tolist() == [-4.0, -0.75]


def test_a_calibration_that_does_not_match_the_artifact_is_refused(small_models, tmp_path):
    model = small_models["rce"]
    calibration = Calibration.load(model.calibration)
    shifted = dict(calibration.thresholds, log_kd=calibration.thresholds["log_kd"] + 1.0)
    wrong = tmp_path / "wrong.calibration.pt"
    Calibration(**{**calibration.__dict__, "thresholds": shifted}).save(wrong)
    with pytest.raises(EvaluationError, match="differs from the artifact"):
        load_model_under_test(model.artifact, model.checkpoint, wrong)


def test_a_detector_whose_decision_differs_from_the_graph_is_refused(small_models, tmp_path):
    """Evaluation runs export's parity check: every output, `accepted` included. The same
    network, bank and thresholds deciding on confidence instead of the graph's log_kd differ
    from the graph in `accepted` alone, which the former check never compared."""
    model = small_models["rce"]
    calibration = Calibration.load(model.calibration)
    assert calibration.default_metric == "log_kd"
    other = tmp_path / "confidence.calibration.pt"
    Calibration(**{**calibration.__dict__, "default_metric": "confidence"}).save(other)
    with pytest.raises(EvaluationError, match="disagree on accepted"):
        load_model_under_test(model.artifact, model.checkpoint, other)


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


def test_models_of_different_datasets_or_test_splits_are_refused(tiny_artifact):
    model = load_model_under_test(tiny_artifact.path, tiny_artifact.checkpoint)
    # Another objective, so only the dataset check can refuse the pair.
    manifest = model.manifest.model_copy(update={"objective": "ce"})
    renamed = replace(model, manifest=manifest, dataset=replace(model.dataset, name="other"))
    resplit = replace(model, manifest=manifest, dataset=load_mnist_5k(seed=1))
    for other in (renamed, resplit):
        with pytest.raises(EvaluationError, match="same dataset and test split"):
            evaluate([model, other], ("fgsm",), 4, 4, FAST)


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
    results = EvaluationResults.read(tmp_path / "results.json")
    cost = results.training_cost
    assert cost is not None and cost.repeats == 1 and cost.images == 64
    assert cost.ratio == pytest.approx(cost.rce_median_seconds / cost.ce_median_seconds)
    assert "Training cost: RCE vs CE" in (tmp_path / "report.md").read_text()
    assert set(results.models["rce"].attacks) == {"fgsm", "bim"}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "roc-rce.png").is_file()
    assert np.isclose(results.settings["eps"], 0.1)


def test_report_command_rerenders_and_records_the_training_cost(evaluation, tmp_path):
    evaluation.results.write(tmp_path)
    assert evaluation.results.training_cost is None
    result = CliRunner().invoke(
        app,
        [
            "report", str(tmp_path / "results.json"),
            "--cost-repeats", "2", "--cost-images", "64", "--cost-depth", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = EvaluationResults.read(tmp_path / "results.json")
    assert results.models == evaluation.results.models
    cost = results.training_cost
    assert cost is not None and cost.depth == 8
    assert len(cost.rce_epoch_seconds) == len(cost.ce_epoch_seconds) == 2
    # The recorded figures are the medians of the recorded epochs and their ratio.
    assert cost.rce_median_seconds == statistics.median(cost.rce_epoch_seconds)
    assert cost.ce_median_seconds == statistics.median(cost.ce_epoch_seconds)
    assert cost.ratio == cost.rce_median_seconds / cost.ce_median_seconds
    report = (tmp_path / "report.md").read_text()
    assert f"Ratio RCE / CE: **{cost.ratio:.3f}**" in report
    assert render_report(results) == report


def _without_timing(results: EvaluationResults) -> dict[str, object]:
    models = results.model_dump(mode="json")["models"]
    for model in models.values():
        for attack in model["attacks"].values():
            attack.pop("seconds_per_image")
    return models  # type: ignore[no-any-return]


def test_evaluating_the_twins_apart_from_the_artifacts_merges_into_the_same_figures(
    small_models, tmp_path
):
    """No checkpoint (network from model.onnx, detector from the manifest), and CE and RCE in
    two processes merged into one results.json: the figures of a single run."""
    ce, rce = small_models["ce"], small_models["rce"]
    common = ["--attacks", "fgsm", "--images", "8", "--cost-repeats", "0"]
    together, apart = tmp_path / "together", tmp_path / "apart"
    runs = [
        ["--artifact", str(ce.artifact), "--artifact", str(rce.artifact), "--out", str(together)],
        ["--artifact", str(ce.artifact), "--out", str(apart)],
        ["--artifact", str(rce.artifact), "--out", str(apart), "--merge"],
    ]
    for args in runs:
        result = CliRunner().invoke(app, ["evaluate", *args, *common])
        assert result.exit_code == 0, result.output
    one, merged = (EvaluationResults.read(d / "results.json") for d in (together, apart))
    assert list(merged.models) == ["ce", "rce"]
    assert _without_timing(merged) == _without_timing(one)
    assert (apart / "roc-ce.png").is_file() and (apart / "roc-rce.png").is_file()
    # Another protocol in --out is not merged into.
    other = CliRunner().invoke(
        app,
        [
            "evaluate", "--artifact", str(rce.artifact), "--out", str(apart), "--merge",
            "--attacks", "fgsm", "--images", "4", "--cost-repeats", "0",
        ],
    )  # fmt: skip
    assert other.exit_code == 2 and "ran another protocol" in other.output
