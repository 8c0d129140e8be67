"""Gradient masking: the evaluation's gradient attacks must not depend on the softmax's scale.

Multiplying every logit by 2**14 changes no decision of a classifier (argmax, margins' signs)
but saturates its softmax, which is how a confidently trained CE model masks cross-entropy
gradients. An unmasked attack fools the scaled model exactly as often as the original one.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from rcegate.cli import app
from training.attacks import AttackSettings, run_attack
from training.data import to_tensor
from training.deployed import DeployedModel, detector_outputs
from training.evaluate import load_model_under_test
from training.robustness import (
    CurvePoint,
    MaskingResults,
    linf_attack,
    masking_checks,
    zero_gradient_fraction,
)

SCALE = 2.0**14  # a power of two: scaled gradients keep their exact bits, hence their signs
SETTINGS = AttackSettings(eps=0.15, bim_steps=5, pgd_eps=0.15, pgd_step=0.03, pgd_steps=5)


class ScaledLogits(nn.Module):
    def __init__(self, network: nn.Module, scale: float) -> None:
        super().__init__()
        self.network, self.scale = network, scale

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, features = self.network(images)
        return logits * self.scale, features


def _scaled(detector: DeployedModel) -> DeployedModel:
    return DeployedModel(
        ScaledLogits(detector.network, SCALE), detector.objective, detector.bank.numpy(),
        detector.bank_mask.numpy(), detector.sigma2, "log_kd",
    )  # fmt: skip


@pytest.fixture(scope="module")
def ce_model(small_models):
    return load_model_under_test(small_models["ce"].artifact, small_models["ce"].checkpoint)


@pytest.fixture(scope="module")
def sample(ce_model):
    test = ce_model.dataset.test
    images = to_tensor(test.images[:120]).numpy()
    clean = detector_outputs(ce_model.detector, images)
    index = np.flatnonzero(clean["label"] == test.labels[:120])[:40]
    return images[index], test.labels[index], {k: v[index] for k, v in clean.items()}


def _fooled(detector, attack, sample, settings):
    images, labels, clean = sample
    output = run_attack(
        attack, detector, images, labels, clean["label"], clean["probabilities"], {}, settings, 0
    )
    adv = detector_outputs(detector, output.adversarial)["label"]
    return output.adversarial, adv != labels


def test_scaling_saturates_the_softmax_and_zeroes_cross_entropy_gradients(ce_model, sample):
    images, labels, _ = sample
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    scaled = _scaled(ce_model.detector)

    def logits_of(detector):
        return lambda batch: detector.network(batch)[0]

    with torch.no_grad():
        probabilities = torch.softmax(logits_of(scaled)(x), dim=1)
    assert (probabilities.max(1).values == 1.0).float().mean() > 0.9
    assert zero_gradient_fraction(logits_of(ce_model.detector), x, y, "ce") == 0.0
    assert zero_gradient_fraction(logits_of(scaled), x, y, "ce") > 0.9
    assert zero_gradient_fraction(logits_of(scaled), x, y, "margin") == 0.0


@pytest.mark.parametrize("attack", ["fgsm", "bim", "illcm", "pgd"])
def test_margin_loss_attacks_do_not_see_the_logit_scale(ce_model, sample, attack):
    margin = replace(SETTINGS, attack_loss="margin")
    plain, _ = _fooled(ce_model.detector, attack, sample, margin)
    scaled, _ = _fooled(_scaled(ce_model.detector), attack, sample, margin)
    np.testing.assert_array_equal(plain, scaled)


@pytest.mark.parametrize("attack", ["fgsm", "bim", "pgd"])
def test_default_attacks_fool_a_saturated_model_as_often_as_the_original(ce_model, sample, attack):
    assert SETTINGS.attack_loss == "both"
    _, plain = _fooled(ce_model.detector, attack, sample, replace(SETTINGS, attack_loss="margin"))
    _, scaled = _fooled(_scaled(ce_model.detector), attack, sample, SETTINGS)
    assert plain.mean() > 0.3, "the attack must have something to show"
    # Every image the margin attack fools on the original model is fooled on the scaled one.
    assert (scaled | ~plain).all()


def test_cross_entropy_alone_is_masked_on_a_saturated_model(ce_model, sample):
    ce_only = replace(SETTINGS, attack_loss="ce")
    _, plain = _fooled(ce_model.detector, "bim", sample, ce_only)
    _, scaled = _fooled(_scaled(ce_model.detector), "bim", sample, ce_only)
    assert scaled.mean() < plain.mean() - 0.2


def test_independent_attack_matches_its_loss(ce_model, sample):
    images, _, clean = sample
    x, y = torch.from_numpy(images), torch.from_numpy(clean["label"]).long()

    def logits_of(batch):
        return ce_model.detector.network(batch)[0]

    adversarial = linf_attack(logits_of, x, y, 0.1, 3, "margin")
    assert (adversarial - x).abs().max() <= 0.1 + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    with torch.no_grad():
        assert (logits_of(adversarial).argmax(1) != y).float().mean() > 0.2


def _curve(rates):
    eps = np.linspace(0.0, 0.3, len(rates))
    return [
        CurvePoint(eps=e, accuracy=1 - r, success_rate=r) for e, r in zip(eps, rates, strict=True)
    ]


def _check(checks, start):
    (found,) = [c for c in checks if c.name.startswith(start)]
    return found


def test_checks_pass_for_an_unmasked_attack():
    curves = {
        "fgsm/pipeline": _curve([0.0, 0.3, 0.6, 0.8]),
        "fgsm/margin": _curve([0.0, 0.3, 0.62, 0.8]),
        "bim/pipeline": _curve([0.0, 0.5, 0.9, 1.0]),
        "bim/margin": _curve([0.0, 0.5, 0.9, 1.0]),
    }
    assert all(c.passed for c in masking_checks(curves))


def test_checks_flag_each_sign_of_masking():
    curves = {
        "fgsm/pipeline": _curve([0.0, 0.3, 0.5, 0.4]),  # falls at large eps
        "fgsm/margin": _curve([0.0, 0.5, 0.9, 1.0]),  # margin loss does far better
        "bim/pipeline": _curve([0.0, 0.2, 0.3, 0.35]),  # below single step, never ~100%
        "bim/margin": _curve([0.0, 0.6, 0.95, 1.0]),
    }
    checks = masking_checks(curves)
    assert not _check(checks, "fgsm/pipeline: success rises").passed
    assert _check(checks, "fgsm/margin: success rises").passed
    assert not _check(checks, "bim/pipeline: success >=").passed
    assert not _check(checks, "iterative").passed
    assert not _check(checks, "fgsm: margin loss").passed
    assert not _check(checks, "bim: margin loss").passed


def test_masking_check_command_writes_a_passing_report(small_models, tmp_path):
    models = [str(small_models[o].checkpoint) for o in ("ce", "rce")]
    out = tmp_path / "masking"
    args = ["masking-check", "--checkpoint", models[0], "--checkpoint", models[1],
            "--out", str(out), "--images", "30", "--eps", "0,0.3", "--bim-steps", "5"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = MaskingResults.read(out / "results.json")
    assert set(results.models) == {"ce", "rce"}
    assert results.eps == [0.0, 0.3]
    for model in results.models.values():
        assert set(model.curves) == {
            f"{a}/{v}" for a in ("fgsm", "bim") for v in ("pipeline", "ce", "margin")
        }
        assert model.curves["bim/pipeline"][-1].success_rate >= 0.9
    report = (out / "report.md").read_text()
    assert "![accuracy vs eps](robustness.png)" in report and "**FAIL**" not in report
    assert (out / "robustness.png").stat().st_size > 1000
