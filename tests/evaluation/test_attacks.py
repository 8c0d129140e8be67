"""Every attack against real small models: within budget, and the adaptive ones really adapt."""

import numpy as np
import pytest
import torch

from training.attacks import ATTACKS, AttackSettings, run_attack
from training.evaluate import load_model_under_test, score_images
from training.train import to_tensor

SETTINGS = AttackSettings(
    eps=0.2, cw_binary_steps=2, cw_max_iter=15, pgd_eps=0.2, pgd_step=0.02, pgd_steps=20,
    jsma_gamma=0.05, batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def models(small_models):
    return {
        objective: load_model_under_test(m.artifact, m.checkpoint)
        for objective, m in small_models.items()
    }


def _correct_images(model, count):
    test = model.dataset.test
    images = to_tensor(test.images[:200]).numpy()
    clean = score_images(model.detector, images)
    index = np.flatnonzero(clean["label"] == test.labels[:200])[:count]
    return images[index], test.labels[index], {k: v[index] for k, v in clean.items()}


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_perturbs_within_its_budget(models, attack):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 6)
    threshold = model.manifest.detection.thresholds["log_kd"]
    output = run_attack(
        attack, model.detector, images, labels, clean["label"], clean["probabilities"],
        threshold, SETTINGS, seed=0,
    )  # fmt: skip
    adversarial = output.adversarial
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    delta = np.abs(adversarial - images).reshape(len(images), -1)
    if attack in ("fgsm", "bim", "illcm"):
        assert delta.max() <= SETTINGS.eps + 1e-5
    if attack in ("pgd", "pgd-adaptive"):
        assert delta.max() <= SETTINGS.pgd_eps + 1e-5
    if attack == "jsma":
        changed = (delta > 1e-6).mean(axis=1)
        assert changed.max() <= SETTINGS.jsma_gamma + 2 / delta.shape[1]
    adv_labels = score_images(model.detector, adversarial)["label"]
    # kappa 10 needs more than this test's 2 x 15 C&W iterations on a barely trained model.
    if attack != "cw-hc":
        assert (adv_labels != labels).any(), f"{attack} fooled no image"
    assert output.seconds > 0 and output.params


def test_cw_targets_differ_from_the_true_label(models):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 6)
    output = run_attack(
        "cw-l2", model.detector, images, labels, clean["label"], clean["probabilities"], 0.0,
        SETTINGS, seed=0,
    )  # fmt: skip
    assert output.targets is not None and (output.targets != labels).all()


def test_unknown_attack_is_refused(models):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 2)
    with pytest.raises(ValueError, match="unknown attack"):
        run_attack("deepfool", model.detector, images, labels, clean["label"],
                   clean["probabilities"], 0.0, SETTINGS, seed=0)  # fmt: skip


def _rejection(model, attack, images, labels, clean):
    threshold = model.manifest.detection.thresholds["log_kd"]
    output = run_attack(
        attack, model.detector, images, labels, clean["label"], clean["probabilities"],
        threshold, SETTINGS, seed=0,
    )  # fmt: skip
    adv = score_images(model.detector, output.adversarial)
    missed = adv["label"] != labels
    rejected = adv["log_kd"] < threshold
    return missed, rejected


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_adaptive_pgd_lowers_rejection_compared_with_plain_pgd(models, objective):
    model = models[objective]
    images, labels, clean = _correct_images(model, 24)
    plain_missed, plain_rejected = _rejection(model, "pgd", images, labels, clean)
    adaptive_missed, adaptive_rejected = _rejection(model, "pgd-adaptive", images, labels, clean)
    # Same L-inf budget and steps: the adaptive attack leaves more misclassified images that
    # the detector accepts, and fewer of its misclassified images are rejected.
    assert (adaptive_missed & ~adaptive_rejected).sum() > (plain_missed & ~plain_rejected).sum()
    assert adaptive_rejected[adaptive_missed].mean() < plain_rejected[plain_missed].mean()


def test_deployed_logits_are_what_art_attacks(models):
    from training.attacks import DeployedLogits

    model = models["rce"]
    images = torch.from_numpy(to_tensor(model.dataset.test.images[:8]).numpy())
    with torch.no_grad():
        raw, _ = model.detector.network(images)
        ours = DeployedLogits(model.detector.network, "rce")(images)
    assert torch.equal(ours, -raw)
